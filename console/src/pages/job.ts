import {
  ExitStatusSchema,
  FinalizeReasonSchema,
  HostControlAction,
  JobEventKindSchema,
  JobStageSchema,
  JobState,
  LogStatus,
  type Job,
} from "../../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LogService } from "../../../gen/treadmill/log/v1/log_service_pb.js";
import { logStatusText } from "../../../lib/log-status.js";
import { sleep } from "../../../lib/retry.js";
import { errorText, keepWatching, type Api } from "../api.js";
import { facts, h, link, notice, table } from "../dom.js";
import { hostNames, userNames } from "../directory.js";
import { enumWord, iso, jobStatus, jobTone, stateWord, tagsText, when } from "../format.js";
import { followChannel } from "../log-follow.js";
import { LogView } from "../log-view.js";
import { jobArtifacts } from "./job-artifacts.js";
import type { PageContext } from "../main.js";
import { JobResultsPanel } from "./job-results.js";
import { jobFileSection } from "./job-file.js";

const CHANNELS = ["console", "stdout", "stderr", "supervisor"];
/** How often a finalized job whose log is still being shipped is read again. */
const LOG_STATUS_POLL_MS = 5000;

/** The host actions of a running job's page (JobService.ControlHost): label, action, id of the button. */
const HOST_ACTIONS = [
  ["Power-cycle", HostControlAction.POWER_CYCLE, "power-cycle"],
  ["Reset", HostControlAction.RESET, "reset"],
  ["Power off", HostControlAction.POWER_OFF, "power-off"],
  ["Power on", HostControlAction.POWER_ON, "power-on"],
] as const;

/** One job: its facts and timeline (WatchJob), cancel, host control, console, and its live log. */
export async function jobPage({ app, api, main, signal, params }: PageContext): Promise<void> {
  const jobId = params[0];
  document.title = `Job ${jobId.slice(-8)} · Treadmill`;
  const jobs = api.client(JobService);
  const [users, hosts] = await Promise.all([userNames(api, signal), hostNames(api, signal)]);

  const heading = h("h1", { tabindex: "-1" }, "Job ", h("code", {}, jobId));
  const badge = h("span", { class: "badge", id: "job-state", role: "status" }, "loading…");
  const status = h("div", { class: "status-area" });
  const cancel = h("button", { type: "button", class: "danger", id: "cancel-job", hidden: true }, "Cancel job");
  const consoleLink = h("a", { class: "button", id: "open-console", href: `/jobs/${encodeURIComponent(jobId)}/console`, hidden: true }, "Open console");
  // Shown while the job runs (only its owner and admins see this page): acts on the chosen host.
  const hostIndex = h("select", { id: "control-host", "aria-label": "Host to control" });
  const controlButtons = HOST_ACTIONS.map(([label, action, id]) => {
    const button = h("button", { type: "button", id: `host-${id}` }, label);
    button.addEventListener("click", () => void control(action, label));
    return button;
  });
  const hostControl = h(
    "div",
    { class: "actions", id: "host-control", role: "group", "aria-label": "Host control", hidden: true },
    h("label", { for: "control-host" }, "Host"),
    hostIndex,
    ...controlButtons,
  );
  const details = h("section", { "aria-labelledby": "details-title" }, h("h2", { id: "details-title" }, "Details"));
  const parameters = h("section", { "aria-labelledby": "params-title" }, h("h2", { id: "params-title" }, "Parameters"));
  const timeline = h("section", { "aria-labelledby": "timeline-title" }, h("h2", { id: "timeline-title" }, "Timeline"));

  const results = new JobResultsPanel(api, jobId, signal);
  const artifacts = jobArtifacts(api, jobId, CHANNELS, signal);
  const view = new LogView("Job log");
  const channelSelect = h("select", { id: "log-channel" }, ...CHANNELS.map((c) => h("option", { value: c }, c)));
  const logStatus = h("span", { class: "live", id: "log-status", role: "status" }, "");
  const logSection = h(
    "section",
    { class: "log-section", "aria-labelledby": "log-title" },
    h("div", { class: "page-head" }, h("h2", { id: "log-title" }, "Log"), h("label", { for: "log-channel" }, "Channel"), channelSelect, logStatus),
    view.element,
  );
  main.append(
    h("div", { class: "page-head" }, heading, badge, h("div", { class: "actions" }, consoleLink, cancel)),
    hostControl,
    status,
    h("div", { class: "columns" }, details, h("div", {}, parameters, timeline)),
    results.element,
    artifacts.element,
    logSection,
  );
  view.render();
  const showFile = jobFileSection({ app, api, main }, jobId);

  let job: Job | undefined;
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      const res = await jobs.cancelJob({ jobId, message: "canceled from the web console" }, { timeoutMs: 15_000 });
      if (res.job) show(res.job);
      status.replaceChildren(notice("info", "Cancel requested."));
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
    } finally {
      cancel.disabled = false;
    }
  });

  const control = async (action: HostControlAction, label: string) => {
    for (const b of controlButtons) b.disabled = true;
    status.replaceChildren(notice("info", `${label} of host ${hostIndex.selectedOptions[0]?.textContent ?? ""} requested…`));
    try {
      // getRandomValues, not randomUUID: the console may be served over plain http (no secure context).
      const requestId = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
      const res = await jobs.controlHost({ jobId, hostIndex: Number(hostIndex.value), action, requestId }, { timeoutMs: 180_000 });
      status.replaceChildren(notice("info", `Host ${res.hostName}: ${res.message}.`));
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
    } finally {
      for (const b of controlButtons) b.disabled = false;
    }
  };

  const logs = new LogFollower(api, jobId, view, logStatus, signal);
  channelSelect.addEventListener("change", () => logs.switchChannel(channelSelect.value, job));

  const show = (next: Job) => {
    job = next;
    badge.textContent = jobStatus(next);
    badge.className = `badge ${jobTone(next)}`;
    badge.dataset.state = stateWord(next.state);
    const finalized = next.state === JobState.FINALIZED;
    cancel.hidden = finalized;
    consoleLink.hidden = next.state !== JobState.RUNNING;
    hostControl.hidden = next.state !== JobState.RUNNING || next.hostIds.length === 0;
    if (hostIndex.options.length !== next.hostIds.length) {
      hostIndex.replaceChildren(...next.hostIds.map((id, i) => h("option", { value: String(i) }, hosts.get(id) ?? id)));
    }
    renderDetails(details, next, users, hosts);
    renderParameters(parameters, next);
    showFile(next);
    if (next.timeline.length > 0) renderTimeline(timeline, next, hosts);
    logs.update(next);
    results.update(next);
    artifacts.update(next);
  };

  const watching = new AbortController();
  signal.addEventListener("abort", () => watching.abort(), { once: true });
  await keepWatching(
    watching.signal,
    (s) => jobs.watchJob({ jobId }, { signal: s }),
    (change) => {
      if (!change.job) return;
      show(change.job);
      if (change.job.state === JobState.FINALIZED) watching.abort(); // a finalized job's state never changes again
    },
    (ok, detail) => {
      if (!ok && detail) status.replaceChildren(notice("error", detail));
      else status.replaceChildren();
    },
  );
  // ... but its log may still be on its way from a host (a log server was down): its status settles later.
  while (job?.logStatus === LogStatus.SHIPPING && !signal.aborted) {
    await sleep(LOG_STATUS_POLL_MS, signal).catch(() => undefined);
    if (signal.aborted) return;
    try {
      const res = await jobs.getJob({ jobId }, { signal, timeoutMs: 15_000 });
      if (res.job) show(res.job);
    } catch {
      // Read again at the next turn.
    }
  }
}

/** Follows the selected channel of the job's current attempt; a new attempt starts a new section. */
class LogFollower {
  #channel = "console";
  #attempt = 0;
  #abort: AbortController | undefined;
  #finalChecked = false;

  constructor(
    private readonly api: Api,
    private readonly jobId: string,
    private readonly view: LogView,
    private readonly status: HTMLElement,
    private readonly signal: AbortSignal,
  ) {}

  update(job: Job): void {
    if (job.logServerUrls.length === 0) {
      this.status.textContent = job.state === JobState.FINALIZED ? "this job has no log" : "waiting for the job to start";
      return;
    }
    if (job.attempt !== this.#attempt) {
      if (this.#attempt !== 0) this.view.write(`\r\n\x1b[2m--- attempt ${job.attempt} ---\x1b[0m\r\n`);
      this.#attempt = job.attempt;
      this.#start();
    }
    if (job.state === JobState.FINALIZED && !this.#finalChecked) {
      this.#finalChecked = true;
      void this.#stopIfMissing();
    }
  }

  switchChannel(channel: string, job: Job | undefined): void {
    this.#channel = channel;
    this.view.reset();
    if (job && job.logServerUrls.length > 0) {
      this.#start();
      if (job.state === JobState.FINALIZED) void this.#stopIfMissing();
    }
  }

  #start(): void {
    this.#abort?.abort();
    const abort = new AbortController();
    this.#abort = abort;
    const signal = AbortSignal.any([abort.signal, this.signal]);
    const decoder = new TextDecoder();
    this.status.textContent = "connecting…";
    followChannel(this.api, {
      jobId: this.jobId,
      attempt: this.#attempt,
      channel: this.#channel,
      signal,
      onData: (bytes) => this.view.write(decoder.decode(bytes, { stream: true })),
      onStatus: (s, detail) => {
        if (!signal.aborted) this.status.textContent = s === "live" ? "live" : s === "ended" ? (detail ?? "ended") : `reconnecting: ${detail ?? ""}`;
      },
    }).catch((err: unknown) => {
      if (!signal.aborted) this.status.textContent = errorText(err);
    });
  }

  /** After the job's end: a channel that never got a frame is not waited for. */
  async #stopIfMissing(): Promise<void> {
    const abort = this.#abort;
    const channel = this.#channel;
    try {
      const access = await this.api.client(JobService).getJobLogAccess({ jobId: this.jobId }, { signal: this.signal, timeoutMs: 15_000 });
      const token = access.readToken?.token ?? "";
      for (const url of access.logServerUrls) {
        try {
          const res = await this.api.remote(LogService, url, () => token).listChannels({ jobId: this.jobId }, { signal: this.signal, timeoutMs: 15_000 });
          if (!res.channels.some((c) => c.channel === channel && c.attempt === this.#attempt) && abort === this.#abort) {
            abort?.abort();
            this.status.textContent = `no output on ${channel}`;
          }
          return;
        } catch {
          // Try the next log server.
        }
      }
    } catch {
      // Keep following.
    }
  }
}

function renderDetails(section: HTMLElement, job: Job, users: Map<string, string>, hosts: Map<string, string>): void {
  const spec = job.spec;
  const hostLinks = job.hostIds.map((id, i) => [i > 0 ? ", " : "", link(`/hosts#host-${id}`, hosts.get(id) ?? id)]).flat();
  const log = logStatusText(job) ?? "";
  section.replaceChildren(
    section.firstChild!,
    facts([
      ["State", stateWord(job.state)],
      ["Stage", enumWord(JobStageSchema, job.stage)],
      ["Finalize reason", enumWord(FinalizeReasonSchema, job.finalizeReason)],
      ["Exit status", enumWord(ExitStatusSchema, job.exitStatus)],
      ["Exit code", job.exitCode !== undefined ? String(job.exitCode) : ""],
      ["Status", job.statusMessage],
      ["Log", log === "" ? "" : h("span", { id: "job-log-status", class: job.logStatus === LogStatus.INCOMPLETE ? "tone-bad" : "" }, log)],
      ["Image", spec?.image ?? ""],
      ["Manifest", h("code", {}, job.manifestDigest)],
      ["Attempt", String(job.attempt)],
      ["Hosts", hostLinks.length > 0 ? h("span", { id: "job-hosts" }, ...hostLinks) : ""],
      ["Owner", users.get(job.ownerUserId) ?? job.ownerUserId],
      ["Lease", job.leaseId ? link(`/leases/${job.leaseId}`, h("code", { id: "job-lease" }, job.leaseId)) : ""],
      ["Needs", [tagsText(spec?.hosts?.tags ?? {}), spec?.hosts?.hostCount && spec.hosts.hostCount > 1 ? `${spec.hosts.hostCount} hosts` : ""].filter(Boolean).join(" · ")],
      ["Labels", tagsText(spec?.tags ?? {})],
      ["Description", spec?.description ?? ""],
      ["Submitted", h("time", { datetime: iso(job.createTime) }, when(job.createTime))],
      ["Started", job.startTime ? h("time", { datetime: iso(job.startTime) }, when(job.startTime)) : ""],
      ["Finalized", job.finalizeTime ? h("time", { datetime: iso(job.finalizeTime) }, when(job.finalizeTime)) : ""],
      ["Cancel requested", job.cancelRequested && job.state !== JobState.FINALIZED ? "yes" : ""],
    ]),
  );
}

function renderParameters(section: HTMLElement, job: Job): void {
  const params = job.spec?.parameters ?? [];
  section.replaceChildren(
    section.firstChild!,
    params.length === 0
      ? h("p", { class: "muted" }, "None.")
      : table(
          "Parameters",
          ["Name", "Value"],
          params.map((p) => [h("code", {}, p.name), p.secret ? h("span", { class: "secret", title: "secret: never shown" }, "•••••• (secret)") : h("code", { class: "value" }, p.value)]),
          { id: "job-parameters" },
        ),
  );
}

function renderTimeline(section: HTMLElement, job: Job, hosts: Map<string, string>): void {
  section.replaceChildren(
    section.firstChild!,
    h(
      "ol",
      { class: "timeline", id: "job-timeline" },
      ...job.timeline.map((e) =>
        h(
          "li",
          {},
          h("time", { datetime: iso(e.time) }, when(e.time)),
          " ",
          h("strong", {}, enumWord(JobEventKindSchema, e.kind)),
          e.state ? ` → ${stateWord(e.state)}` : "",
          e.stage ? ` (${enumWord(JobStageSchema, e.stage)})` : "",
          e.hostId ? ` on ${hosts.get(e.hostId) ?? e.hostId}` : "",
          e.message ? h("div", { class: "muted" }, e.message) : null,
        ),
      ),
    ),
  );
}
