/**
 * The job page's test results (docs/results.md): the counts, a table of
 * cases (ListJobResults) filtered by outcome, suite and name, paged, and
 * the comparison with the previous job of the job's series
 * (CompareJobResults). Hidden while the job has no results; read again when
 * its counts change (cases parsed from the console arrive while it runs).
 */
import { durationMs } from "@bufbuild/protobuf/wkt";
import { type Job, type ResultCounts, type TestCase, TestOutcome, TestOutcomeSchema } from "../../../gen/treadmill/coordinator/v1/job_pb.js";
import { type CaseChange, JobService } from "../../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { errorText, type Api } from "../api.js";
import { h, link, notice, pager, tableRow } from "../dom.js";
import { enumWord, tagsText } from "../format.js";

const HEADERS = ["Suite", "Name", "Outcome", "Time", "Message"];
const PAGE_SIZE = 100;
const OUTCOME_FILTERS: [string, string, TestOutcome[]][] = [
  ["any", "", []],
  ["failed or errored", "failing", [TestOutcome.FAIL, TestOutcome.ERROR]],
  ["passed", "pass", [TestOutcome.PASS]],
  ["skipped", "skip", [TestOutcome.SKIP]],
];

/** "3/6 passed", with "(flaky)"; "" without results. For the jobs list. */
export function resultsText(job: Job): string {
  const c = job.results;
  if (!c || c.total === 0n) return "";
  return `${c.passed}/${c.total} passed${job.flaky ? " (flaky)" : ""}`;
}

/** A small badge of a job's results for the jobs list; null without results. */
export function resultsBadge(job: Job): HTMLElement | null {
  const text = resultsText(job);
  if (text === "") return null;
  const bad = (job.results?.failed ?? 0n) + (job.results?.errored ?? 0n) > 0n;
  return h("span", { class: `badge results ${bad ? "tone-bad" : "tone-ok"}`, title: countsText(job.results!) }, text);
}

function countsText(c: ResultCounts): string {
  return `${c.total} cases: ${c.passed} passed, ${c.failed} failed, ${c.skipped} skipped, ${c.errored} errored`;
}

function outcomeCell(outcome: TestOutcome): HTMLElement {
  const tone = outcome === TestOutcome.PASS ? "tone-ok" : outcome === TestOutcome.SKIP ? "tone-wait" : "tone-bad";
  return h("span", { class: `badge ${tone}` }, enumWord(TestOutcomeSchema, outcome));
}

function durationText(c: TestCase): string {
  if (!c.duration) return "";
  const msValue = durationMs(c.duration);
  return msValue < 1000 ? `${Math.round(msValue)} ms` : `${(msValue / 1000).toFixed(2)} s`;
}

function caseRow(c: TestCase): HTMLTableRowElement {
  const where = c.log ? h("div", { class: "muted" }, `${c.log.channel} bytes ${c.log.startOffset}–${c.log.endOffset}`) : null;
  return tableRow(
    HEADERS,
    [
      c.suite,
      h("span", {}, c.name, c.flaky ? h("span", { class: "badge tone-wait", title: "failed on an earlier attempt, passed on this one" }, " flaky") : null),
      outcomeCell(c.outcome),
      durationText(c),
      h("div", {}, c.message ? h("pre", { class: "case-message" }, c.message) : null, where),
    ],
    { "data-case-index": String(c.index) },
  );
}

/** The results section of one job's page: append `element`, call `update` with every new state of the job. */
export class JobResultsPanel {
  readonly element: HTMLElement;
  private readonly summary = h("p", { id: "results-counts" });
  private readonly status = h("div", { class: "status-area" });
  private readonly tbody = h("tbody", { id: "results-cases" });
  /** Made anew for every listing: its click loads the next page of that listing. */
  private more = h("button", { type: "button", hidden: true }, "Load more cases");
  private readonly comparison = h("section", { id: "results-compare", "aria-labelledby": "results-compare-title" });
  private readonly outcome = h("select", { id: "results-outcome" }, ...OUTCOME_FILTERS.map(([label, value]) => h("option", { value }, label)));
  private readonly suite = h("input", { id: "results-suite", placeholder: "exact suite" });
  private readonly name = h("input", { id: "results-name", placeholder: "part of the name" });
  private shownTotal = -1n;
  private compared = false;
  /** Ends the reads of the current listing (a new filter or a new count starts another). */
  private listing = new AbortController();

  constructor(
    private readonly api: Api,
    private readonly jobId: string,
    private readonly signal: AbortSignal,
  ) {
    const filters = h(
      "form",
      { class: "filters", role: "search", "aria-label": "Filter test cases" },
      h("div", { class: "field" }, h("label", { for: "results-outcome" }, "Outcome"), this.outcome),
      h("div", { class: "field" }, h("label", { for: "results-suite" }, "Suite"), this.suite),
      h("div", { class: "field" }, h("label", { for: "results-name" }, "Name"), this.name),
      h("button", { type: "submit" }, "Apply"),
    );
    filters.addEventListener("submit", (event) => {
      event.preventDefault();
      this.reload();
    });
    this.outcome.addEventListener("change", () => this.reload());
    this.element = h(
      "section",
      { id: "job-results", "aria-labelledby": "results-title", hidden: true },
      h("h2", { id: "results-title" }, "Test results"),
      this.summary,
      filters,
      this.status,
      h(
        "div",
        { class: "table-wrap" },
        h("table", { id: "results-table", class: "cards" }, h("caption", { class: "visually-hidden" }, "Test cases in report order"), h("thead", {}, h("tr", {}, ...HEADERS.map((t) => h("th", { scope: "col" }, t)))), this.tbody),
      ),
      this.more,
      this.comparison,
    );
  }

  /** A new state of the job: shows its counts, and reads its cases again when they changed. */
  update(job: Job): void {
    const c = job.results;
    if (!c || c.total === 0n) return;
    this.element.hidden = false;
    this.summary.textContent = `Attempt ${c.attempt}: ${countsText(c)}${c.complete ? "" : " so far"}${job.flaky ? " · flaky: a case failed on an earlier attempt and passed later" : ""}.`;
    if (c.total !== this.shownTotal) {
      this.shownTotal = c.total;
      this.reload();
    }
    if (c.complete && !this.compared && Object.keys(job.spec?.tags ?? {}).length > 0) {
      this.compared = true;
      void this.compare();
    }
  }

  private pagerFor(signal: AbortSignal): () => Promise<void> {
    const jobs = this.api.client(JobService);
    const filter = OUTCOME_FILTERS.find(([, value]) => value === this.outcome.value)?.[2] ?? [];
    const request = { jobId: this.jobId, outcomes: filter, suite: this.suite.value.trim(), nameContains: this.name.value.trim(), pageSize: PAGE_SIZE };
    let first = true;
    return pager(this.more, this.status, AbortSignal.any([signal, this.signal]), async (pageToken) => {
      const res = await jobs.listJobResults({ ...request, pageToken }, { signal: AbortSignal.any([signal, this.signal]), timeoutMs: 20_000 });
      if (signal.aborted) return "";
      const rows = res.cases.map(caseRow);
      if (first) this.tbody.replaceChildren(...(rows.length === 0 ? [h("tr", {}, h("td", { colspan: String(HEADERS.length) }, "No cases match."))] : rows));
      else this.tbody.append(...rows);
      first = false;
      return res.nextPageToken;
    });
  }

  private reload(): void {
    this.listing.abort();
    this.listing = new AbortController();
    this.status.replaceChildren();
    const more = h("button", { type: "button", hidden: true }, "Load more cases");
    this.more.replaceWith(more);
    this.more = more;
    void this.pagerFor(this.listing.signal)();
  }

  private async compare(): Promise<void> {
    try {
      const res = await this.api.client(JobService).compareJobResults({ jobId: this.jobId, limit: 50 }, { signal: this.signal, timeoutMs: 20_000 });
      const title = h("h3", { id: "results-compare-title" }, "Compared with the previous job of its series");
      if (!res.baseJob) {
        this.comparison.replaceChildren(title, h("p", { class: "muted" }, `No earlier finished job of the series ${tagsText(res.seriesLabels)} has results.`));
        return;
      }
      const list = (label: string, id: string, changes: CaseChange[], count: bigint) =>
        h(
          "div",
          { id },
          h("h4", {}, `${label}: ${count}`),
          changes.length === 0
            ? null
            : h(
                "ul",
                {},
                ...changes.map((ch) =>
                  h("li", {}, h("code", {}, `${ch.case?.suite ? `${ch.case.suite} / ` : ""}${ch.case?.name ?? ""}`), ` ${enumWord(TestOutcomeSchema, ch.baseOutcome) || "new"} → ${enumWord(TestOutcomeSchema, ch.case?.outcome ?? 0)}`),
                ),
              ),
          BigInt(changes.length) < count ? h("p", { class: "muted" }, `and ${count - BigInt(changes.length)} more`) : null,
        );
      this.comparison.replaceChildren(
        title,
        h("p", {}, "Base: ", link(`/jobs/${res.baseJob.id}`, h("code", {}, res.baseJob.id)), ` (series ${tagsText(res.seriesLabels)})`),
        list("Newly failing", "results-newly-failing", res.newlyFailing, res.newlyFailingCount),
        list("Newly passing", "results-newly-passing", res.newlyPassing, res.newlyPassingCount),
        list("Still failing", "results-still-failing", res.stillFailing, res.stillFailingCount),
      );
    } catch (err) {
      if (!this.signal.aborted) this.comparison.replaceChildren(notice("error", errorText(err)));
    }
  }
}
