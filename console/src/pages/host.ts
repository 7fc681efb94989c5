import { DriverKindSchema, HostAdminStateSchema, type Host, HostHealth, HostHealthSchema } from "../../../gen/treadmill/coordinator/v1/host_pb.js";
import { type GetHostStatsResponse, HostService, type HostStatsWindow } from "../../../gen/treadmill/coordinator/v1/host_service_pb.js";
import type { Job } from "../../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { errorText } from "../api.js";
import { type Child, facts, h, link, notice, pager, table, tableRow } from "../dom.js";
import { userNames } from "../directory.js";
import { percentText, spanText } from "../../../lib/figures.js";
import { enumWord, healthTone, iso, jobStatus, jobTone, shortId, stateWord, tagsText, when } from "../format.js";
import type { PageContext } from "../main.js";
import { hostActions } from "./host-actions.js";
import { imageCell } from "./jobs.js";
import { reserveForm } from "./leases.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const JOB_HEADERS = ["Job", "Image", "State", "Owner", "Submitted"];
const PAGE_SIZE = 25;

/**
 * One host (`/hosts/NAME` or `/hosts/ID`): its health and why, its
 * statistics over 24 hours and 7 days and its health timeline
 * (GetHostStats), and the jobs that ran on it, newest first, a page at a
 * time (ListJobs by host: every job for an admin, a user's own otherwise),
 * and a form to reserve it (CreateLease by its name).
 */
export async function hostPage({ app, api, main, signal, params }: PageContext): Promise<void> {
  const ref = params[0];
  document.title = `Host ${ref} · Treadmill`;
  const hosts = api.client(HostService);
  const status = h("div", { class: "status-area" });
  const heading = h("h1", { tabindex: "-1" }, "Host ", h("span", { id: "host-name" }, ref));
  const health = h("span", { class: "badge", id: "host-health", role: "status" }, "loading…");
  const online = h("span", { class: "badge", id: "host-online" });
  const refresh = h("button", { type: "button", id: "refresh-host" }, "Refresh");
  const details = h("section", { "aria-labelledby": "host-details-title" }, h("h2", { id: "host-details-title" }, "Details"));
  const statistics = h("section", { "aria-labelledby": "host-stats-title" }, h("h2", { id: "host-stats-title" }, "Statistics"));
  const timeline = h("section", { "aria-labelledby": "host-timeline-title" }, h("h2", { id: "host-timeline-title" }, "Health timeline"));
  const history = h("section", { "aria-labelledby": "host-jobs-title" }, h("h2", { id: "host-jobs-title" }, "Jobs"));
  main.append(
    h("div", { class: "page-head" }, heading, health, online, h("div", { class: "actions" }, refresh)),
    status,
    h("div", { class: "columns" }, details, statistics),
    timeline,
    history,
  );

  const load = async (): Promise<Host | undefined> => {
    try {
      const stats = await hosts.getHostStats({ host: UUID.test(ref) ? { case: "hostId", value: ref } : { case: "name", value: ref } }, { signal, timeoutMs: 15_000 });
      status.replaceChildren();
      show(stats);
      return stats.host;
    } catch (err) {
      if (!signal.aborted) status.replaceChildren(notice("error", errorText(err)));
      return undefined;
    }
  };
  const show = (stats: GetHostStatsResponse) => {
    const host = stats.host!;
    document.title = `Host ${host.name} · Treadmill`;
    heading.querySelector("#host-name")!.textContent = host.name;
    health.textContent = enumWord(HostHealthSchema, host.health) || "unknown";
    health.className = `badge ${healthTone(host.health)}`;
    health.dataset.health = health.textContent;
    online.textContent = host.online ? "online" : "offline";
    online.className = `badge ${host.online ? "tone-ok" : "tone-bad"}`;
    details.replaceChildren(details.firstChild!, hostFacts(host, stats));
    statistics.replaceChildren(statistics.firstChild!, statsTable(stats.windows));
    timeline.replaceChildren(timeline.firstChild!, ...healthTimeline(stats));
  };
  refresh.addEventListener("click", () => void load());

  const host = await load();
  if (!host || signal.aborted) return;
  if (api.session.current?.admin) history.before(hostActions(api, host, status, () => void load()));
  history.before(reserveForm(app, api, { hostName: host.name }));
  const names = await userNames(api, signal);
  const jobs = api.client(JobService);
  const tbody = h("tbody", {});
  const more = h("button", { type: "button", hidden: true }, "Load older jobs");
  history.append(
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "host-jobs", class: "cards" },
        h("caption", { class: "visually-hidden" }, `Jobs on ${host.name}, newest first`),
        h("thead", {}, h("tr", {}, ...JOB_HEADERS.map((t) => h("th", { scope: "col" }, t)))),
        tbody,
      ),
    ),
    more,
  );
  let shown = 0;
  const loadPage = pager(more, status, signal, async (pageToken) => {
    const res = await jobs.listJobs({ filter: { hostId: host.id }, pageSize: PAGE_SIZE, pageToken }, { signal, timeoutMs: 20_000 });
    if (shown === 0 && res.jobs.length === 0) tbody.append(h("tr", {}, h("td", { colspan: String(JOB_HEADERS.length) }, "No jobs on this host.")));
    for (const job of res.jobs) tbody.append(jobRow(job, names));
    shown += res.jobs.length;
    return res.nextPageToken;
  });
  await loadPage();
}

function hostFacts(host: Host, stats: GetHostStatsResponse): HTMLElement {
  const check = stats.lastHealthCheck;
  return facts([
    ["Health", [enumWord(HostHealthSchema, host.health), host.healthReason ? ` (${host.healthReason})` : ""].join("")],
    ["Health since", h("time", { datetime: iso(host.healthChangeTime) }, when(host.healthChangeTime))],
    [
      "Last health check",
      check
        ? h("span", { id: "host-last-check" }, check.passed ? "passed " : "failed ", when(check.time), " (", link(`/jobs/${check.jobId}`, h("code", { title: check.jobId }, shortId(check.jobId))), ")", check.passed || !check.message ? "" : `: ${check.message}`)
        : "never",
    ],
    ["Admin state", [enumWord(HostAdminStateSchema, host.adminState), host.adminStateReason ? ` (${host.adminStateReason})` : ""].join("")],
    ["Driver", enumWord(DriverKindSchema, host.driverKind)],
    ["Site", host.site],
    ["Tags", tagsText(host.tags)],
    ["Capacity", String(host.capacity)],
    ["Current jobs", host.currentJobIds.length === 0 ? "none" : h("span", {}, ...host.currentJobIds.flatMap((id, i) => [i > 0 ? ", " : "", link(`/jobs/${id}`, h("code", { title: id }, shortId(id)))]))],
    ["Supervisor", host.supervisorVersion],
    ["Last seen", h("time", { datetime: iso(host.lastSeenTime) }, when(host.lastSeenTime) || "never")],
    ["ID", h("code", {}, host.id)],
  ]);
}

/** Hours or days of a window, as a column header: "Last 24 h", "Last 7 days". */
function windowName(w: HostStatsWindow): string {
  const hours = Number(w.length?.seconds ?? 0n) / 3600;
  return hours <= 48 ? `Last ${hours} h` : `Last ${hours / 24} days`;
}

function healthTime(w: HostStatsWindow, health: HostHealth): string {
  const d = w.healthDurations.find((x) => x.health === health)?.duration;
  return d ? spanText(Number(d.seconds) * 1000) : "-";
}

function statsTable(windows: HostStatsWindow[]): HTMLElement {
  const rows: [string, (w: HostStatsWindow) => Child][] = [
    ["Jobs run", (w) => String(w.jobsRun)],
    ["Succeeded", (w) => String(w.jobsSucceeded)],
    ["Job failures", (w) => String(w.jobFailures)],
    ["User failures", (w) => String(w.userFailures)],
    ["Infrastructure failures", (w) => `${w.infrastructureFailures} (${percentText(w.infrastructureFailureRate)})`],
    ["Online", (w) => percentText(w.onlineShare)],
    ...HostHealthSchema.values
      .filter((v) => v.number !== 0)
      .map((v): [string, (w: HostStatsWindow) => Child] => [`Time ${enumWord(HostHealthSchema, v.number)}`, (w) => healthTime(w, v.number)]),
  ];
  const headers = ["", ...windows.map(windowName)];
  return table("Statistics", headers, rows.map(([label, value]) => [h("strong", {}, label), ...windows.map(value)]), { id: "host-stats" });
}

/** The last 7 days as a bar of the health states, then each change, newest first. */
function healthTimeline(stats: GetHostStatsResponse): HTMLElement[] {
  const week = stats.windows[stats.windows.length - 1];
  const total = week ? week.healthDurations.reduce((sum, d) => sum + Number(d.duration?.seconds ?? 0n), 0) : 0;
  const bar = h(
    "div",
    { class: "health-bar", role: "img", "aria-label": week ? `Health over the ${windowName(week).toLowerCase()}: ${week.healthDurations.map((d) => `${enumWord(HostHealthSchema, d.health)} ${spanText(Number(d.duration?.seconds ?? 0n) * 1000)}`).join(", ")}` : "" },
    ...(week?.healthDurations ?? []).map((d) =>
      h("span", { class: `health-${enumWord(HostHealthSchema, d.health)}`, style: `flex-grow: ${total > 0 ? Number(d.duration?.seconds ?? 0n) / total : 0}`, title: `${enumWord(HostHealthSchema, d.health)}: ${spanText(Number(d.duration?.seconds ?? 0n) * 1000)}` }),
    ),
  );
  const list = h(
    "ol",
    { class: "timeline", id: "host-timeline" },
    ...stats.healthChanges.map((e) =>
      h(
        "li",
        { "data-health": enumWord(HostHealthSchema, e.health) },
        h("time", { datetime: iso(e.time) }, when(e.time)),
        " ",
        h("strong", { class: healthTone(e.health) }, enumWord(HostHealthSchema, e.health)),
        ` by ${e.actor}`,
        e.jobId ? h("span", {}, " (job ", link(`/jobs/${e.jobId}`, h("code", { title: e.jobId }, shortId(e.jobId))), ")") : "",
        e.reason ? h("div", { class: "muted" }, e.reason) : null,
      ),
    ),
  );
  if (stats.healthChanges.length === 0) list.append(h("li", { class: "muted" }, "No change of its health in the last 7 days."));
  return [bar, list];
}

function jobRow(job: Job, names: Map<string, string>): HTMLTableRowElement {
  return tableRow(
    JOB_HEADERS,
    [
      link(`/jobs/${job.id}`, h("code", { title: job.id }, shortId(job.id))),
      imageCell(job),
      h("span", { class: `badge ${jobTone(job)}` }, jobStatus(job)),
      names.get(job.ownerUserId) ?? shortId(job.ownerUserId),
      h("time", { datetime: iso(job.createTime) }, when(job.createTime)),
    ],
    { "data-job-id": job.id, "data-state": stateWord(job.state) },
  );
}
