import { create } from "@bufbuild/protobuf";
import { JobState, JobStateSchema, type Job } from "../../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobChangeKind, JobFilterSchema, JobService, type JobFilter } from "../../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { errorText, keepWatching } from "../api.js";
import { h, link, notice, pager, tableRow } from "../dom.js";
import { iso, jobStatus, jobTone, parseTags, shortId, stateWord, when } from "../format.js";
import type { PageContext } from "../main.js";
import { hostNames, userNames } from "../directory.js";
import { resultsBadge } from "./job-results.js";

const HEADERS = ["Job", "Image", "State", "Owner", "Hosts", "Submitted", "Labels", "Description"];
const PAGE_SIZE = 50;
const ACTIVE = [JobState.QUEUED, JobState.ASSIGNED, JobState.INITIALIZING, JobState.RUNNING, JobState.TERMINATING];

/** The jobs list: ListJobs for history, WatchJobs for live changes; filters in the query string. */
export async function jobsPage({ app, api, main, signal, query }: PageContext): Promise<void> {
  document.title = "Jobs · Treadmill";
  const jobs = api.client(JobService);
  const [names, hosts] = await Promise.all([userNames(api, signal), hostNames(api, signal)]);

  const stateSelect = h(
    "select",
    { id: "filter-state", name: "state" },
    h("option", { value: "" }, "any"),
    h("option", { value: "active" }, "active (not finalized)"),
    ...JobStateSchema.values.filter((v) => v.number !== 0).map((v) => h("option", { value: stateWord(v.number) }, stateWord(v.number))),
  );
  stateSelect.value = query.get("state") ?? "";
  const ownerInput = h("input", { id: "filter-owner", name: "owner", placeholder: "me, a user name or id", value: query.get("owner") ?? "" });
  // Labels are the job's own tags (JobSpec.tags); `tag` is the parameter's older name.
  const labelInput = h("input", { id: "filter-label", name: "label", placeholder: "board=a suite=smoke", value: query.get("label") ?? query.get("tag") ?? "" });
  const kindSelect = h(
    "select",
    { id: "filter-kind", name: "kind" },
    h("option", { value: "" }, "any"),
    h("option", { value: "health" }, "health checks"),
    h("option", { value: "user" }, "user jobs"),
  );
  kindSelect.value = query.get("kind") ?? "";
  const filters = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter jobs" },
    h("div", { class: "field" }, h("label", { for: "filter-state" }, "State"), stateSelect),
    h("div", { class: "field" }, h("label", { for: "filter-owner" }, "Owner"), ownerInput),
    h("div", { class: "field" }, h("label", { for: "filter-label" }, "Label"), labelInput),
    h("div", { class: "field" }, h("label", { for: "filter-kind" }, "Kind"), kindSelect),
    h("button", { type: "submit" }, "Apply"),
  );
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    const q = new URLSearchParams();
    if (stateSelect.value) q.set("state", stateSelect.value);
    if (ownerInput.value.trim()) q.set("owner", ownerInput.value.trim());
    if (labelInput.value.trim()) q.set("label", labelInput.value.trim());
    if (kindSelect.value) q.set("kind", kindSelect.value);
    app.navigate(`/jobs${q.size > 0 ? `?${q}` : ""}`);
  });
  stateSelect.addEventListener("change", () => filters.requestSubmit());
  kindSelect.addEventListener("change", () => filters.requestSubmit());

  const live = h("span", { class: "live", role: "status" }, "connecting…");
  const status = h("div", { class: "status-area" });
  const tbody = h("tbody", {});
  const more = h("button", { type: "button", hidden: true }, "Load older jobs");
  main.append(
    h("div", { class: "page-head" }, h("h1", { tabindex: "-1" }, "Jobs"), live, link("/jobs/new", "Submit a job")),
    filters,
    status,
    h(
      "div",
      { class: "table-wrap" },
      h("table", { id: "jobs-table", class: "cards" }, h("caption", { class: "visually-hidden" }, "Jobs, newest first"), h("thead", {}, h("tr", {}, ...HEADERS.map((t) => h("th", { scope: "col" }, t)))), tbody),
    ),
    more,
  );

  let filter: JobFilter;
  try {
    filter = buildFilter(query, api.session.current?.userId ?? "", names);
  } catch (err) {
    status.append(notice("error", errorText(err)));
    live.textContent = "";
    return;
  }

  const byId = new Map<string, Job>();
  let frame = 0;
  const redraw = () => {
    frame = 0;
    const sorted = [...byId.values()].sort((a, b) => (a.id < b.id ? 1 : -1));
    tbody.replaceChildren(...(sorted.length === 0 ? [h("tr", {}, h("td", { colspan: String(HEADERS.length) }, "No jobs match."))] : sorted.map((job) => jobRow(job, names, hosts))));
  };
  const put = (job: Job) => {
    const known = byId.get(job.id);
    if (known && (known.updateTime?.seconds ?? 0n) > (job.updateTime?.seconds ?? 0n)) return;
    if (filter.states.length > 0 && !filter.states.includes(job.state)) byId.delete(job.id);
    else byId.set(job.id, job);
    frame ||= requestAnimationFrame(redraw);
  };

  const loadPage = pager(more, status, signal, async (pageToken) => {
    const res = await jobs.listJobs({ filter, pageSize: PAGE_SIZE, pageToken }, { signal, timeoutMs: 20_000 });
    for (const job of res.jobs) put(job);
    frame ||= requestAnimationFrame(redraw);
    return res.nextPageToken;
  });
  await loadPage();
  void keepWatching(
    signal,
    (s) => jobs.watchJobs({ filter, includeExisting: true }, { signal: s }),
    (change) => {
      if (change.kind !== JobChangeKind.SYNCED && change.job) put(change.job);
    },
    (ok, detail) => {
      live.textContent = ok ? "live" : (detail ?? "disconnected");
      live.classList.toggle("off", !ok);
    },
  );
}

function buildFilter(query: URLSearchParams, me: string, names: Map<string, string>): JobFilter {
  const filter = create(JobFilterSchema, {});
  const state = query.get("state") ?? "";
  if (state === "active") filter.states = [...ACTIVE];
  else if (state !== "") {
    const value = JobStateSchema.values.find((v) => stateWord(v.number) === state);
    if (!value) throw new Error(`state "${state}" is not a job state`);
    filter.states = [value.number];
  }
  const owner = (query.get("owner") ?? "").trim();
  if (owner === "me") filter.ownerUserId = me;
  else if (owner !== "") {
    const byName = [...names.entries()].find(([, name]) => name === owner)?.[0];
    filter.ownerUserId = byName ?? owner;
  }
  const kind = query.get("kind") ?? "";
  if (kind === "health") filter.healthJobs = true;
  else if (kind === "user") filter.healthJobs = false;
  const label = (query.get("label") ?? query.get("tag") ?? "").trim();
  if (label !== "") {
    try {
      filter.tags = parseTags(label);
    } catch (err) {
      throw new Error(`label filter: ${(err as Error).message}`, { cause: err });
    }
  }
  return filter;
}

/** A job's image, marked when the job is a health check's (Job.health_check_id). */
export function imageCell(job: Job): HTMLElement {
  const image = job.spec?.image ?? "";
  return job.healthCheckId
    ? h("span", {}, image, " ", h("span", { class: "badge tone-run", title: `health check ${job.healthCheckId}` }, "health check"))
    : h("span", {}, image);
}

/** Labels (the job's tags), each a link to the jobs that carry it. */
function labelLinks(labels: Record<string, string>): (HTMLElement | string)[] {
  return Object.entries(labels)
    .sort(([a], [b]) => a.localeCompare(b))
    .flatMap(([k, v], i) => [i > 0 ? " " : "", link(`/jobs?label=${encodeURIComponent(`${k}=${v}`)}`, h("span", { class: "label" }, `${k}=${v}`))]);
}

function jobRow(job: Job, names: Map<string, string>, hosts: Map<string, string>): HTMLTableRowElement {
  return tableRow(
    HEADERS,
    [
      link(`/jobs/${job.id}`, h("code", { title: job.id }, shortId(job.id))),
      imageCell(job),
      h("span", {}, h("span", { class: `badge ${jobTone(job)}` }, jobStatus(job)), " ", resultsBadge(job)),
      names.get(job.ownerUserId) ?? shortId(job.ownerUserId),
      job.hostIds.map((id) => hosts.get(id) ?? shortId(id)).join(", "),
      h("time", { datetime: iso(job.createTime) }, when(job.createTime)),
      h("span", { class: "labels" }, ...labelLinks(job.spec?.tags ?? {})),
      job.spec?.description ?? "",
    ],
    { "data-job-id": job.id, "data-state": stateWord(job.state) },
  );
}
