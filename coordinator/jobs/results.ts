/**
 * Test results (docs/results.md, issue #23): the supervisor's
 * JobResultsReport batches (registered with the stream's handlers) and
 * JobService's ListJobResults and CompareJobResults.
 *
 * - A report is recorded once by its report_id (job_result_reports), so a
 *   batch re-sent after a reconnect adds nothing; its cases get the next
 *   indexes of the attempt, up to resultsCasesPerAttempt (the rest are
 *   counted as dropped, said once on the timeline). A passing case that
 *   failed on an earlier attempt is flaky, and so is the job. Its problems
 *   (unreadable files, TAP garbage) become RESULTS events; the last batch
 *   marks the attempt's results complete, with a RESULTS event giving the
 *   counts. The job's state is never touched: results may arrive after the
 *   job is FINALIZED.
 * - Reading: as GetJob (the caller's JobService checks access first).
 *   CompareJobResults finds the series' previous job by labels
 *   (resultsSeriesIgnoredLabels are left out) and matches cases by suite
 *   and name.
 */
import { recordFeedEvent } from "../db/queries/feed.js";
import { create, fromJson } from "@bufbuild/protobuf";
import {
  type CaseChange,
  type CompareJobResultsRequest,
  type CompareJobResultsResponse,
  CompareJobResultsResponseSchema,
  type ListJobResultsRequest,
  type ListJobResultsResponse,
  ListJobResultsResponseSchema,
} from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { JobSpecSchema, type ResultCounts, type TestCase, TestCaseSchema, TestOutcome } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { type AttachResponse, AttachResponseSchema, type JobResultsReport } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { MESSAGE_MAX_BYTES, NAME_MAX_CHARS, clipBytes } from "../../lib/results/case.js";
import { durationOfMs } from "../../lib/results/wire.js";
import type { HostCaller } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import { recordEvents, type EventInput } from "../db/queries/events.js";
import type { JobRow } from "../db/queries/jobs.js";
import {
  type CaseInput,
  type CaseRow,
  type CountsRow,
  claimBatch,
  compareCases,
  countsOf,
  listCases,
  seriesBase,
  storeBatch,
} from "../db/queries/results.js";
import { checkId, checkText, decodePageToken, encodePageToken, invalid, pageSize } from "../shared/common.js";
import type { JobConfig } from "./config.js";
import { jobMessage } from "./store.js";
import { loadJob } from "../db/queries/jobs.js";
import type { SupervisorHandlers } from "./stream-handlers.js";

/** Cases one report may carry (the supervisor sends a few thousand). */
export const MAX_CASES_PER_REPORT = 10_000;
/** Problems of one report that reach the timeline. */
const MAX_PROBLEMS_PER_REPORT = 20;

const printable = (text: string) =>
  // eslint-disable-next-line no-control-regex
  text.replace(/[\u0000-\u0008\u000b-\u001f\u007f]+/g, " ");

export class JobResults {
  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: Pick<JobConfig, "resultsCasesPerAttempt" | "resultsSeriesIgnoredLabels">,
  ) {}

  /** JobResultsReport, handled at its turn in the stream (it reads nothing the stream's reports write). */
  registerHandlers(handlers: SupervisorHandlers): void {
    handlers.on("jobResultsReport", { afterCommits: false, handle: (host, r) => this.onReport(host, r) });
  }

  /**
   * Records a batch and answers the AckReport to send. Malformed:
   * InvalidArgument (it ends the stream). A batch of an attempt that did
   * not run on this host is acknowledged and changes nothing.
   */
  async onReport(host: HostCaller, r: JobResultsReport): Promise<AttachResponse> {
    checkId("job_results_report.job_id", r.jobId);
    if (r.attempt < 1) throw invalid("job_results_report.attempt must be at least 1");
    checkText("job_results_report.report_id", r.reportId, 64);
    if (r.reportId === "") throw invalid("job_results_report.report_id must be set");
    if (r.cases.length > MAX_CASES_PER_REPORT) throw invalid(`job_results_report.cases has ${r.cases.length} cases, more than ${MAX_CASES_PER_REPORT}`);
    const cases: CaseInput[] = r.cases.map((c, i) => caseInput(c, i));
    const problems = r.problems.slice(0, MAX_PROBLEMS_PER_REPORT).map((p) => printable(p).trim().slice(0, 1024));

    await this.ctx.sql.begin(async (tx) => {
      const batch = await claimBatch(tx, { reportId: r.reportId, jobId: r.jobId, attempt: r.attempt, hostId: host.hostId });
      // Not an attempt of this host, or a repeat: acknowledged, nothing changes.
      if (!batch?.counts) return;
      const { counts } = batch;
      const room = Math.max(0, this.config.resultsCasesPerAttempt - Number(counts.total));
      const kept = cases.slice(0, room);
      const dropped = cases.length - kept.length;
      const add = { total: kept.length, passed: 0, failed: 0, skipped: 0, errored: 0, dropped, complete: r.last };
      for (const c of kept) {
        if (c.outcome === TestOutcome.PASS) add.passed++;
        else if (c.outcome === TestOutcome.FAIL) add.failed++;
        else if (c.outcome === TestOutcome.SKIP) add.skipped++;
        else add.errored++;
      }
      const flakyNow = await storeBatch(tx, r.jobId, r.attempt, Number(counts.total), kept, add);

      const event = (message: string): EventInput => ({
        jobId: r.jobId,
        kind: "results",
        state: batch.state as EventInput["state"],
        attempt: r.attempt,
        hostId: host.hostId,
        actor: `host:${host.hostName}`,
        ownerId: batch.owner_id,
        message,
      });
      const events = problems.map((p) => event(`results: ${p}`));
      if (dropped > 0 && Number(counts.dropped) === 0) {
        events.push(event(`results: more than ${this.config.resultsCasesPerAttempt} test cases in attempt ${r.attempt}: the rest are dropped`));
      }
      if (r.last && !counts.complete) {
        const total = Number(counts.total) + add.total;
        const sum = (k: "passed" | "failed" | "skipped" | "errored") => Number(counts[k]) + add[k];
        const more = Number(counts.dropped) + dropped;
        events.push(
          event(
            `results: ${total} test case${total === 1 ? "" : "s"}: ${sum("passed")} passed, ${sum("failed")} failed, ${sum("skipped")} skipped, ${sum("errored")} errored` +
              (more > 0 ? ` (${more} more dropped)` : ""),
          ),
        );
        // The feed's job.results event (docs/events.md), once per attempt.
        await recordFeedEvent(tx, {
          kind: "job.results",
          jobId: r.jobId,
          payload: {
            job_id: r.jobId,
            attempt: r.attempt,
            passed: sum("passed"),
            failed: sum("failed"),
            skipped: sum("skipped"),
            errors: sum("errored"),
            flaky: counts.flaky || flakyNow > 0,
          },
        });
      }
      if (events.length > 0) await recordEvents(tx, events);
    });
    return create(AttachResponseSchema, {
      payload: { case: "ackReport", value: { reportId: r.reportId, jobId: r.jobId, attempt: r.attempt, terminal: false } },
    });
  }

  /** ListJobResults of a job the caller may see. */
  async list(job: JobRow, req: ListJobResultsRequest): Promise<ListJobResultsResponse> {
    if (req.attempt < 0) throw invalid("attempt must not be negative");
    const outcomes = req.outcomes.map((o, i) => {
      if (o === TestOutcome.UNSPECIFIED || TestOutcome[o] === undefined) throw invalid(`outcomes[${i}] must be PASS, FAIL, SKIP or ERROR`);
      return o as number;
    });
    checkText("suite", req.suite, NAME_MAX_CHARS);
    checkText("name_contains", req.nameContains, 256);
    const limit = pageSize(req.pageSize);
    const counts = await countsOf(this.ctx.sql, job.id, req.attempt);
    if (!counts) return create(ListJobResultsResponseSchema, { attempt: req.attempt });
    const filters = { job: job.id, attempt: counts.attempt, suite: req.suite, outcomes: [...outcomes].sort(), name: req.nameContains };
    const key = decodePageToken(req.pageToken, filters, 1);
    const after = key === undefined ? -1 : Number(key[0]);
    if (!Number.isInteger(after)) throw invalid("page_token is malformed");
    const rows = await listCases(this.ctx.sql, job.id, counts.attempt, { suite: req.suite, outcomes, nameContains: req.nameContains }, after, limit + 1);
    const page = rows.slice(0, limit);
    return create(ListJobResultsResponseSchema, {
      attempt: counts.attempt,
      cases: page.map(caseMessage),
      nextPageToken: rows.length > limit ? encodePageToken(filters, [String(page[page.length - 1]!.idx)]) : "",
      counts: countsMessage(counts),
    });
  }

  /** CompareJobResults of a job the caller may see. */
  async compare(job: JobRow, req: CompareJobResultsRequest): Promise<CompareJobResultsResponse> {
    if (req.limit < 0) throw invalid("limit must not be negative");
    const limit = req.limit === 0 ? 100 : Math.min(req.limit, 1000);
    const ignored = new Set(this.config.resultsSeriesIgnoredLabels);
    const spec = fromJson(JobSpecSchema, job.spec, { ignoreUnknownFields: true });
    const series = Object.fromEntries(Object.entries(spec.tags).filter(([k]) => !ignored.has(k)));
    const answer = create(CompareJobResultsResponseSchema, { seriesLabels: series });
    const counts = await countsOf(this.ctx.sql, job.id, 0);
    if (!counts) return answer;
    answer.attempt = counts.attempt;
    // A job without labels belongs to no series.
    if (Object.keys(series).length === 0) return answer;
    const baseId = await seriesBase(this.ctx.sql, job, series, [...ignored]);
    const base = baseId === undefined ? undefined : await loadJob(this.ctx.sql, baseId);
    const baseCounts = base && (await countsOf(this.ctx.sql, base.id, 0));
    if (!base || !baseCounts) return answer;
    answer.baseJob = jobMessage(base);
    answer.baseAttempt = baseCounts.attempt;
    const rows = await compareCases(this.ctx.sql, job.id, counts.attempt, base.id, baseCounts.attempt, limit);
    for (const row of rows) {
      const change: CaseChange = { $typeName: "treadmill.coordinator.v1.CaseChange", case: caseMessage(row), baseOutcome: row.base_outcome ?? TestOutcome.UNSPECIFIED };
      if (row.kind === "newly_failing") {
        answer.newlyFailing.push(change);
        answer.newlyFailingCount = BigInt(row.count);
      } else if (row.kind === "newly_passing") {
        answer.newlyPassing.push(change);
        answer.newlyPassingCount = BigInt(row.count);
      } else {
        answer.stillFailing.push(change);
        answer.stillFailingCount = BigInt(row.count);
      }
    }
    return answer;
  }
}

/** A reported case as stored: text made printable and clipped (a report is never refused for its text). */
function caseInput(c: TestCase, i: number): CaseInput {
  if (c.outcome === TestOutcome.UNSPECIFIED || TestOutcome[c.outcome] === undefined) {
    throw invalid(`job_results_report.cases[${i}].outcome must be PASS, FAIL, SKIP or ERROR`);
  }
  const us = c.duration ? Number(c.duration.seconds) * 1e6 + Math.round(c.duration.nanos / 1000) : null;
  const log = c.log && c.log.channel !== "" ? c.log : undefined;
  return {
    suite: printable(c.suite).slice(0, NAME_MAX_CHARS),
    name: printable(c.name).slice(0, NAME_MAX_CHARS),
    outcome: c.outcome,
    durationUs: us === null || us < 0 || !Number.isFinite(us) ? null : us,
    message: clipBytes(c.message.replaceAll("\u0000", ""), MESSAGE_MAX_BYTES),
    logChannel: log ? printable(log.channel).slice(0, 64) : null,
    logStart: log ? Number(log.startOffset) : null,
    logEnd: log ? Number(log.endOffset) : null,
  };
}

function caseMessage(row: CaseRow): TestCase {
  return create(TestCaseSchema, {
    attempt: row.attempt,
    index: BigInt(row.idx),
    suite: row.suite,
    name: row.name,
    outcome: row.outcome,
    duration: row.duration_us === null ? undefined : durationOfMs(Number(row.duration_us) / 1000),
    message: row.message,
    log: row.log_channel === null ? undefined : { channel: row.log_channel, startOffset: BigInt(row.log_start ?? 0), endOffset: BigInt(row.log_end ?? 0) },
    flaky: row.flaky,
  });
}

function countsMessage(c: CountsRow): ResultCounts {
  return {
    $typeName: "treadmill.coordinator.v1.ResultCounts",
    attempt: c.attempt,
    total: BigInt(c.total),
    passed: BigInt(c.passed),
    failed: BigInt(c.failed),
    skipped: BigInt(c.skipped),
    errored: BigInt(c.errored),
    complete: c.complete,
  };
}
