/** `tml job run|list|get|cancel|wait|events|logs|snapshot|power-cycle|reset|power-off|power-on|results`. */
import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { DriverKindSchema } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import {
  ExitStatus,
  ExitStatusSchema,
  FinalizeReason,
  FinalizeReasonSchema,
  HostControlAction,
  type Job,
  JobEventKind,
  JobEventKindSchema,
  JobEventSchema,
  JobSchema,
  JobStage,
  JobStageSchema,
  JobState,
  JobStateSchema,
  LogStatus,
  ReasonClass,
  RetryConditionSchema,
  SnapshotSchema,
  SnapshotState,
} from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ControlHostResponseSchema, JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LeaseService } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import type { ConfigOf } from "../../lib/config.js";
import { keepStreaming, sleep } from "../../lib/retry.js";
import { keyValues, parseDuration, parseIntFlag, type ArgSpec, type FlagSchema } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import { tlsOptions, type CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { ago, enumValue, enumWords, iso, jsonOf, tagsText, word } from "../format.js";
import { logStatusText } from "../../lib/log-status.js";
import { DEFAULT_CHANNELS, JobLogAccess, LogFollowers, mergeByTime, readChannel, type LogLine } from "../logs.js";
import { askKey } from "../prompt.js";
import { CiRun, ciFlags, interactive, signalExitCode } from "../ci.js";
import { splitReference } from "./image.js";
import { jobArtifactCommands } from "./job-artifacts.js";
import { followLease } from "./lease.js";
import { countsText, resultsColumn, resultsCommands } from "./job-results.js";
import { fileRunFlags, printJobFile, runJobFile, submit } from "./job-file.js";

type Jobs = Client<typeof JobService>;

/** How long after a job ends its logs may still be arriving. */
const LOG_GRACE_MS = 10_000;
/** How long a finished snapshot waits for the supervisor's last line about it (a host that went away says none). */
const LAST_LINE_GRACE_MS = 3000;

/** "succeeded", "failed (exit code 2)", "canceled"... */
export function outcome(job: Job): string {
  if (job.state !== JobState.FINALIZED) return word(JobStateSchema, job.state);
  if (job.finalizeReason === FinalizeReason.WORKLOAD_EXITED) {
    const code = job.exitCode === undefined ? "" : ` (exit code ${job.exitCode})`;
    return job.exitStatus === ExitStatus.SUCCESS ? `succeeded${code}` : `failed${code}`;
  }
  return word(FinalizeReasonSchema, job.finalizeReason) + (job.statusMessage ? `: ${job.statusMessage}` : "");
}

/** 0 when the job succeeded, 1 otherwise (finalized jobs only). */
export function jobExitCode(job: Job): number {
  return job.finalizeReason === FinalizeReason.WORKLOAD_EXITED && job.exitStatus === ExitStatus.SUCCESS ? ExitCode.OK : ExitCode.JOB_FAILED;
}

/**
 * A followed job's last line: the outcome with the reason its record gives
 * when the exit code does not say it ("failed: workload killed by SIGKILL"),
 * and whose failure it was when it was the infrastructure's.
 */
function endLine(job: Job): string {
  let text = outcome(job);
  const failed = job.finalizeReason === FinalizeReason.WORKLOAD_EXITED && job.exitStatus !== ExitStatus.SUCCESS;
  if (failed && job.exitCode === undefined && job.statusMessage) text += `: ${job.statusMessage}`;
  if (job.reasonClass === ReasonClass.INFRASTRUCTURE) text += " (an infrastructure failure)";
  return text;
}

export function stateText(job: Job): string {
  if (job.state === JobState.INITIALIZING && job.stage !== 0) return `initializing (${word(JobStageSchema, job.stage)})`;
  if (job.state === JobState.RUNNING && job.stage === JobStage.HELD) return "held (its workload failed; its hosts are kept as they are)";
  if (job.state === JobState.FINALIZED) return outcome(job);
  return word(JobStateSchema, job.state);
}

/**
 * Calls `onJob` with the job now and after every change until it is
 * finalized (WatchJob, reopened with backoff when the stream breaks or ends
 * before the job: a replica stopping). The caller's abort rejects, as
 * Canceled; a permanent failure (classify) rejects with itself.
 */
export async function watchJob(jobs: Jobs, jobId: string, signal: AbortSignal, onJob: (job: Job) => void | Promise<void>): Promise<Job> {
  const finalized = new AbortController();
  let final: Job | undefined;
  await keepStreaming({
    open: (attempt) => jobs.watchJob({ jobId }, { signal: attempt.signal }),
    onMessage: async ({ job }, attempt) => {
      if (!job) return;
      attempt.healthy();
      await onJob(job);
      if (job.state !== JobState.FINALIZED) return;
      final = job;
      finalized.abort();
    },
    backoff: { initialMs: 250, maxMs: 5000 },
    signal: AbortSignal.any([signal, finalized.signal]),
  }).catch((err: unknown) => {
    throw ConnectError.from(err);
  });
  if (final === undefined) throw ConnectError.from(signal.reason, Code.Canceled);
  return final;
}

/** Writes log lines: console/stdout to stdout, stderr and supervisor to stderr. */
function logSink(ctx: CliContext) {
  return {
    write(line: LogLine) {
      if (line.channel === "stderr") ctx.io.stderr.write(line.data);
      else if (line.channel === "supervisor") {
        const text = Buffer.from(line.data).toString("utf8");
        ctx.io.stderr.write(
          text
            .split(/(?<=\n)/)
            .map((l) => ctx.out.errStyle(`[supervisor] ${l}`, "dim"))
            .join(""),
        );
      } else ctx.io.stdout.write(line.data);
    },
  };
}

/** A job's log access whose connections close when the command ends. */
function logAccess(ctx: CliContext, jobs: Jobs, jobId: string): JobLogAccess {
  const access = new JobLogAccess(jobs, jobId, tlsOptions(ctx.caFile));
  ctx.onClose(() => access.close());
  return access;
}

function parseSince(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const asTime = Date.parse(text);
  if (/^\d{4}-\d\d-\d\d/.test(text) && !Number.isNaN(asTime)) return asTime;
  return Date.now() - parseDuration("since", text);
}

function channelsOf(given: readonly string[], verbose: boolean): string[] {
  if (given.length > 0) return given.flatMap((c) => c.split(",")).filter((c) => c !== "");
  return verbose ? [...DEFAULT_CHANNELS, "supervisor"] : DEFAULT_CHANNELS;
}

/** The argument of every verb that acts on one job. */
const JOB_ARG = [{ name: "JOB", required: true, description: "the job's id" }] as const satisfies readonly ArgSpec[];

const runFlags = {
  file: { type: "string", short: "f", placeholder: "FILE", description: "submit the job file FILE (- for stdin) instead of IMAGE and flags (docs/job-files.md)" },
  set: { type: "list", placeholder: "KEY=VALUE", description: "with --file: a value of the file's ${KEY}" },
  tag: { type: "list", placeholder: "KEY=VALUE", description: "a host must carry this tag" },
  hosts: { type: "string", placeholder: "N", description: "how many hosts, co-allocated (default 1)" },
  site: { type: "string", placeholder: "SITE", description: "only hosts of this site" },
  driver: { type: "string", placeholder: "KIND", description: `only hosts with this driver (${enumWords(DriverKindSchema).join(", ")})` },
  param: { type: "list", placeholder: "NAME=VALUE", description: "a parameter for the workload" },
  secret: { type: "list", placeholder: "NAME=VALUE", description: "a secret parameter (never shown or logged)" },
  "secret-file": { type: "list", placeholder: "NAME=PATH", description: "a secret parameter read from a file" },
  expose: { type: "list", placeholder: "NAME=PORT", description: "expose a port of the job (see `tml port-forward`)" },
  label: { type: "list", placeholder: "KEY=VALUE", description: "a tag of the job itself, for `tml job list --label`" },
  description: { type: "string", placeholder: "TEXT", description: "free text shown in listings" },
  priority: { type: "string", placeholder: "N", description: "-100 to 100, higher first (default 0)" },
  timeout: { type: "string", placeholder: "DURATION", description: "longest run time, e.g. 30m (default: the server's)" },
  "hold-on-failure": {
    type: "string",
    placeholder: "DURATION",
    description: "when the workload fails, keep its hosts as they are this long for a post-mortem (a lease) instead of resetting them",
  },
  "queue-timeout": { type: "string", placeholder: "DURATION", description: "longest wait for hosts (default: the server's)" },
  restarts: { type: "string", placeholder: "N", description: "re-queue up to N times after an infrastructure failure" },
  lease: { type: "string", placeholder: "LEASE", description: "run inside this lease of yours, on its hosts (see `tml reserve`)" },
  input: { type: "list", placeholder: "NAME=artifact:JOB/NAME", description: "put an artifact of an earlier job in $TREADMILL_INPUTS_DIR/NAME" },
  "queue-anyway": { type: "bool", description: "queue the job even when every host that matches it is quarantined, offline, disabled or retired" },
  detach: { type: "bool", short: "d", description: "submit and print the job id; do not follow" },
  quiet: { type: "bool", short: "q", description: "print only the job's output, no state changes" },
  ...ciFlags,
} as const satisfies FlagSchema;

async function buildSpec(image: string, flags: ConfigOf<typeof runFlags>) {
  const parameters = [
    ...Object.entries(keyValues("param", flags.param)).map(([name, value]) => ({ name, value, secret: false })),
    ...Object.entries(keyValues("secret", flags.secret)).map(([name, value]) => ({ name, value, secret: true })),
  ];
  for (const [name, path] of Object.entries(keyValues("secret-file", flags["secret-file"]))) {
    let value: string;
    try {
      value = await readFile(path, "utf8");
    } catch (err) {
      throw new UsageError(`flag --secret-file ${name}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? "error"})`);
    }
    parameters.push({ name, value, secret: true });
  }
  const exposedPorts = Object.entries(keyValues("expose", flags.expose)).map(([name, port]) => ({
    name,
    port: parseIntFlag("expose", port, 1, 65535),
    description: "",
  }));
  let driverKind = 0;
  if (flags.driver !== undefined) {
    const v = enumValue(DriverKindSchema, flags.driver);
    if (v === undefined) throw new UsageError(`flag --driver must be one of ${enumWords(DriverKindSchema).join(", ")}, got "${flags.driver}"`);
    driverKind = v;
  }
  return {
    image,
    hosts: {
      tags: keyValues("tag", flags.tag),
      hostCount: flags.hosts === undefined ? 1 : parseIntFlag("hosts", flags.hosts, 1, 64),
      site: flags.site,
      driverKind,
    },
    priority: flags.priority === undefined ? 0 : parseIntFlag("priority", flags.priority, -100, 100),
    jobTimeout: flags.timeout === undefined ? undefined : durationFromMs(parseDuration("timeout", flags.timeout)),
    holdOnFailure: flags["hold-on-failure"] === undefined ? undefined : durationFromMs(parseDuration("hold-on-failure", flags["hold-on-failure"])),
    queueTimeout: flags["queue-timeout"] === undefined ? undefined : durationFromMs(parseDuration("queue-timeout", flags["queue-timeout"])),
    restartPolicy: flags.restarts === undefined ? undefined : { maxRestarts: parseIntFlag("restarts", flags.restarts, 0, 10) },
    parameters,
    exposedPorts,
    tags: keyValues("label", flags.label),
    description: flags.description ?? "",
    leaseId: flags.lease ?? "",
    inputs: Object.entries(keyValues("input", flags.input)).map(([name, source]) => ({ name, source })),
  };
}

/**
 * Keeps lease `leaseId` alive with a WatchLease keepalive stream, reopened
 * with backoff, until `signal` aborts or the lease has ended (a held job's
 * hold: the hold lasts while `tml job run` follows the job, and ends its
 * grace period after it stops).
 */
async function keepLeaseAlive(ctx: CliContext, leaseId: string, signal: AbortSignal): Promise<void> {
  await followLease(ctx, await ctx.client(LeaseService), leaseId, { keepalive: true, signal }).catch(() => undefined);
}

/**
 * Follows a job to its end: state changes on stderr (unless quiet), the live
 * log of `channels`, signals handled as docs/ci.md says (on a terminal,
 * Ctrl-C asks whether to cancel or detach; SIGTERM, or Ctrl-C without a
 * terminal, cancels and waits up to `ci.cancelWaitMs` for the end, or
 * detaches with `ci.detachOnSignal`; a second signal stops waiting).
 * Resolves with the exit code, once `ci` has written what it was asked to.
 */
export async function followJob(
  ctx: CliContext,
  jobs: Jobs,
  jobId: string,
  options: { channels: string[]; quiet: boolean; logs: boolean; ci?: CiRun },
): Promise<number> {
  const ci = options.ci ?? new CiRun(ctx, {});
  const watch = new AbortController();
  const followers = new LogFollowers(logAccess(ctx, jobs, jobId), options.channels, logSink(ctx), { signal: watch.signal });
  const status = (text: string) => {
    if (!options.quiet) ctx.out.note(ctx.out.errStyle(`--> ${text}`, "cyan"));
  };
  let detached = false;
  let cancelAsked = false;
  let prompting = false;
  /** The exit code once a signal stopped the run (130, 143). */
  let signalCode: number | undefined;
  let cancelTimer: NodeJS.Timeout | undefined;
  let waitedOut = false;
  const cancel = async (why: string) => {
    if (cancelAsked) return;
    cancelAsked = true;
    // Said even when quiet: a CI log must show why the job ended.
    ctx.out.note(ctx.out.errStyle(`--> canceling job ${jobId} (${why}); waiting up to ${ci.cancelWaitText} for it to end (${why} again: stop waiting)`, "cyan"));
    cancelTimer = setTimeout(() => {
      ctx.out.note(`tml: job ${jobId} did not end within ${ci.cancelWaitText} of its cancel; it ends on its own: \`tml job get ${jobId}\` shows it.`);
      waitedOut = true;
      detach();
    }, ci.cancelWaitMs);
    await jobs.cancelJob({ jobId, message: `canceled from tml (${why})` }, { timeoutMs: 15_000 }).catch((err) => {
      ctx.out.note(`Could not cancel job ${jobId}: ${ConnectError.from(err).rawMessage}`);
    });
  };
  let finishing = false;
  const detach = () => {
    detached = true;
    watch.abort();
    // The job ended and its files are being written: a second signal cuts their downloads short.
    if (finishing) ctx.abort.abort();
  };
  const onInterrupt = async (signal: NodeJS.Signals) => {
    if (cancelAsked || prompting) {
      detach();
      return;
    }
    if (signal === "SIGINT" && interactive(ctx.io)) {
      prompting = true;
      const key = await askKey(ctx.io, `\nJob ${jobId} is still running. Cancel it [c], detach [d], or keep following [any other key]? `).catch(
        () => "d",
      );
      prompting = false;
      signalCode = signalExitCode(signal);
      if (key === "c") await cancel("Ctrl-C");
      else if (key === "d") detach();
      else signalCode = undefined;
      return;
    }
    signalCode = signalExitCode(signal);
    if (ci.detachOnSignal) detach();
    else await cancel(signal);
  };
  const unsubscribe = ctx.onInterrupt((signal) => void onInterrupt(signal ?? "SIGINT"));
  let last = "";
  let hosts = "";
  let holdShown = false;
  const holding = new AbortController();
  let keepalive: Promise<void> | undefined;
  const endLog = ci.section(`Treadmill job ${jobId}: log`);
  try {
    const job = await watchJob(jobs, jobId, watch.signal, (job) => {
      const text = stateText(job);
      if (text !== last && job.state !== JobState.FINALIZED) status(`${text}${job.attempt > 1 ? ` (attempt ${job.attempt})` : ""}`);
      last = text;
      // Held: the timeline names the hold's lease and how to attach.
      const hold = job.stage === JobStage.HELD ? job.timeline.findLast((e) => e.kind === JobEventKind.LEASE) : undefined;
      if (hold !== undefined && !holdShown) {
        status(hold.message);
        if (job.leaseId !== "") {
          status("tml keeps the hold alive while it follows the job; once it stops (Ctrl-C, detach), the hold ends after its grace period");
          keepalive = keepLeaseAlive(ctx, job.leaseId, holding.signal);
        }
      }
      holdShown ||= hold !== undefined;
      const jobHosts = job.hostIds.join(", ");
      if (jobHosts !== "" && jobHosts !== hosts) {
        const ids = [...job.hostIds];
        // Names read better than ids; an id stands in when a name is not to be had.
        void hostNames(ctx, ids).then((names) => status(`on host${ids.length > 1 ? "s" : ""} ${names.join(", ")}`));
      }
      hosts = jobHosts;
      if (options.logs && job.logServerUrls.length > 0 && job.state !== JobState.QUEUED) followers.follow(job.attempt);
    });
    clearTimeout(cancelTimer);
    if (options.logs) await followers.finish(LOG_GRACE_MS);
    endLog();
    status(`job ${jobId} ${endLine(job)}${await logAfterEnd(jobs, job)}`);
    finishing = true;
    const written = await ci.finished(jobs, job, outcome(job));
    const code = signalCode ?? jobExitCode(job);
    return code === ExitCode.OK && !written ? ExitCode.ERROR : code;
  } catch (err) {
    clearTimeout(cancelTimer);
    if (detached) {
      await followers.stop();
      endLog();
      if (!cancelAsked) ctx.out.note(`Detached; job ${jobId} goes on. Follow it with \`tml job logs --follow ${jobId}\`, stop it with \`tml job cancel ${jobId}\`.`);
      else if (!waitedOut) ctx.out.note(`Stopped waiting; job ${jobId} is canceled and ends on its own: \`tml job get ${jobId}\` shows it.`);
      return signalCode ?? ExitCode.INTERRUPTED;
    }
    await followers.stop();
    throw err;
  } finally {
    holding.abort();
    await keepalive;
    unsubscribe();
  }
}

/** The host actions of `tml job power-cycle|reset|power-off|power-on`, one command each. */
const HOST_ACTIONS = [
  ["power-cycle", HostControlAction.POWER_CYCLE, "Power a running job's host off and on again"],
  ["reset", HostControlAction.RESET, "Reset a running job's host (a board's reset command, a VM's system_reset)"],
  ["power-off", HostControlAction.POWER_OFF, "Power off a running job's host; the job goes on until power-on, cancel or its timeout"],
  ["power-on", HostControlAction.POWER_ON, "Power a running job's host on again"],
] as const;

/**
 * `tml job power-cycle JOB [--host N]` and its siblings: JobService.ControlHost,
 * answered once the host's supervisor did it. Under one request id, so that a
 * retry after a lost answer does not act twice.
 */
const hostControlCommands: Command[] = HOST_ACTIONS.map(([name, action, summary]) =>
  defineCommand({
    path: ["job", name],
    summary,
    args: JOB_ARG,
    flags: {
      host: { type: "string", placeholder: "N", description: "which host of a multi-host job, from 0 (default 0)" },
    },
    examples: [`tml job ${name} $JOB`, `tml job ${name} $JOB --host 1`],
    async run(ctx, { args, flags }) {
      const jobs = await ctx.client(JobService);
      const request = {
        jobId: args.JOB,
        hostIndex: flags.host === undefined ? 0 : parseIntFlag("host", flags.host, 0, 63),
        action,
        requestId: randomUUID(),
      };
      // The supervisor answers once the board's commands ran (a power cycle may take a while).
      const answer = await jobs.controlHost(request, { timeoutMs: 180_000 });
      ctx.out.data(jsonOf(ControlHostResponseSchema, answer), () => ctx.out.line(`Job ${args.JOB}: ${answer.message} (host ${answer.hostName}).`));
      return ExitCode.OK;
    },
  }),
);

export const jobCommands: Command[] = [
  defineCommand({
    path: ["job", "run"],
    summary: "Submit a job, follow its state and live log, exit with its status",
    description:
      "Submits the job, prints its state changes (on stderr) and its console, stdout and stderr (the\n" +
      "supervisor's channel too with --verbose) until it ends, then exits 0 if it succeeded, 1 if not.\n" +
      "Ctrl-C asks whether to cancel the job or detach; SIGTERM, or Ctrl-C without a terminal, cancels it\n" +
      "and waits for its end (--detach-on-signal: leaves it running); a second signal stops waiting.\n" +
      "Exit codes: 0 succeeded, 1 the job did not succeed, 2 usage, 3 tml or Treadmill failed, 4 auth,\n" +
      "130/143 stopped by SIGINT/SIGTERM (docs/ci.md). --junit and --artifacts write the job's results\n" +
      "and artifacts once it ended; in CI a summary goes to $GITHUB_STEP_SUMMARY and GitLab sections to the log.",
    args: [{ name: "IMAGE", required: false, description: "name:tag from `tml image list`, or a manifest digest (not with --file)" }],
    flags: runFlags,
    examples: [
      "tml job run example/hello:latest",
      "tml job run zephyr/blinky:v1 --tag board=nrf52840dk --timeout 10m",
      "tml job run ci/tests:pr-123 --param SUITE=smoke --secret-file API_KEY=./key.txt --restarts 2",
      "tml job run ci/tests:latest --detach",
      "tml job run -f job.yaml --set commit=$(git rev-parse HEAD)",
      "tml job run ci/tests:latest --junit results.xml --artifacts out/",
    ],
    async run(ctx, { args, flags }) {
      if (flags.detach === true && (flags.junit !== undefined || flags.artifacts !== undefined)) throw new UsageError("--junit and --artifacts need the job followed to its end, not --detach");
      const ci = new CiRun(ctx, flags);
      if (flags.file !== undefined) return runJobFile(ctx, fileRunFlags(args.IMAGE, { ...flags, file: flags.file }), ci);
      if (args.IMAGE === undefined) throw new UsageError("`tml job run` needs an IMAGE or --file FILE");
      const spec = await buildSpec(splitReference(args.IMAGE, "IMAGE").text, flags);
      const jobs = await ctx.client(JobService);
      // No host that matches can run it now: submit says which and why, and how to queue it anyway.
      const job = await submit(jobs, { spec, requestId: randomUUID(), queueAnyway: flags["queue-anyway"] === true });
      if (flags.detach === true) {
        ctx.out.data(jsonOf(JobSchema, job), () => ctx.out.line(job.id));
        return ExitCode.OK;
      }
      if (ctx.out.format !== "table") {
        // Scripts asked for data: follow quietly, then print the final job.
        const code = await followJob(ctx, jobs, job.id, { channels: [], quiet: true, logs: false, ci });
        const final = await jobs.getJob({ jobId: job.id }, { timeoutMs: 15_000 });
        ctx.out.data(jsonOf(JobSchema, final.job!), () => undefined);
        return code;
      }
      if (flags.quiet !== true) ctx.out.note(ctx.out.errStyle(`--> job ${job.id} submitted (${job.spec?.image ?? args.IMAGE})`, "cyan"));
      return followJob(ctx, jobs, job.id, { channels: channelsOf([], ctx.verbose), quiet: flags.quiet === true, logs: true, ci });
    },
  }),
  defineCommand({
    path: ["job", "list"],
    summary: "List jobs, newest first",
    flags: {
      state: { type: "list", placeholder: "STATE", description: `only jobs in this state (${enumWords(JobStateSchema).join(", ")})` },
      label: { type: "list", placeholder: "KEY=VALUE", description: "only jobs with this tag" },
      host: { type: "string", placeholder: "HOST_ID", description: "only jobs on this host" },
      owner: { type: "string", placeholder: "USER_ID", description: "only jobs of this user (admins)" },
      health: { type: "string", choices: ["only", "none"], description: "only health jobs (only) or only other jobs (none)" },
      limit: { type: "string", placeholder: "N", description: "at most N jobs (default 50; 0: all)" },
    },
    examples: ["tml job list", "tml job list --state running --state queued", "tml job list --label ci=pr-123 -o json", "tml job list --health only"],
    async run(ctx, { flags }) {
      const states = (flags.state ?? []).map((s) => {
        const v = enumValue(JobStateSchema, s);
        if (v === undefined) throw new UsageError(`flag --state must be one of ${enumWords(JobStateSchema).join(", ")}, got "${s}"`);
        return v;
      });
      const limit = flags.limit === undefined ? 50 : parseIntFlag("limit", flags.limit, 0, 1_000_000);
      const jobs = await ctx.client(JobService);
      const found: Job[] = [];
      let pageToken = "";
      do {
        const page = await jobs.listJobs(
          {
            filter: {
              states,
              tags: keyValues("label", flags.label),
              hostId: flags.host ?? "",
              ownerUserId: flags.owner ?? "",
              healthJobs: flags.health === undefined ? undefined : flags.health === "only",
            },
            pageSize: limit === 0 ? 1000 : Math.min(1000, limit - found.length),
            pageToken,
          },
          { timeoutMs: 30_000 },
        );
        found.push(...page.jobs);
        pageToken = page.nextPageToken;
      } while (pageToken !== "" && (limit === 0 || found.length < limit));
      ctx.out.data(
        found.map((j) => jsonOf(JobSchema, j)),
        () =>
          ctx.out.table(
            found,
            [
              { header: "ID", value: (j) => j.id },
              { header: "STATE", value: (j) => stateText(j) },
              { header: "IMAGE", value: (j) => j.spec?.image ?? "-" },
              { header: "HOSTS", value: (j) => (j.hostIds.length === 0 ? "-" : String(j.hostIds.length)) },
              { header: "SUBMITTED", value: (j) => ago(j.createTime) },
              { header: "RESULTS", value: resultsColumn },
              { header: "KIND", value: (j) => (j.healthCheckId !== "" ? "health" : "user") },
              { header: "DESCRIPTION", value: (j) => j.spec?.description || "-" },
            ],
            "No jobs.",
          ),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["job", "get"],
    summary: "Show one job",
    args: JOB_ARG,
    examples: ["tml job get 0190f5c2-7c1e-7000-8000-000000000000", "tml job get $JOB -o json | jq -r .state", "tml job get $JOB -o yaml > job.yaml"],
    async run(ctx, { args }) {
      const jobs = await ctx.client(JobService);
      const { job } = await jobs.getJob({ jobId: args.JOB }, { timeoutMs: 15_000 });
      if (!job) throw new CliError("the server returned no job");
      if (ctx.out.format === "yaml") {
        await printJobFile(ctx, job);
        return ExitCode.OK;
      }
      ctx.out.data(jsonOf(JobSchema, job), () => {
        const spec = job.spec;
        ctx.out.fields([
          ["ID", job.id],
          ["State", stateText(job)],
          ["Image", spec ? `${spec.image} (${job.manifestDigest})` : undefined],
          ["Attempt", String(job.attempt)],
          ["Hosts", job.hostIds.join(", ") || "-"],
          ["Host tags", spec?.hosts ? tagsText(spec.hosts.tags) : undefined],
          ["Priority", spec ? String(spec.priority) : undefined],
          ["Retry", spec?.retry ? retryText(spec.retry) : undefined],
          ["Parameters", spec?.parameters.map((p) => (p.secret ? `${p.name}=(secret)` : `${p.name}=${p.value}`)).join(", ")],
          ["Labels", spec && Object.keys(spec.tags).length > 0 ? tagsText(spec.tags) : undefined],
          ["Description", spec?.description],
          ["Health check", job.healthCheckId || undefined],
          ["Lease", job.leaseId || undefined],
          ["Re-run of", job.rerunOfJobId || undefined],
          ["Re-runs", job.rerunJobIds.join(", ") || undefined],
          ["Submitted", iso(job.createTime)],
          ["Started", iso(job.startTime)],
          ["Finished", iso(job.finalizeTime)],
          ["Result", job.state === JobState.FINALIZED ? outcome(job) : undefined],
          ["Log", logStatusText(job)],
          ["Results", job.results ? `${countsText(job.results)} (attempt ${job.results.attempt}${job.flaky ? ", flaky" : ""})` : undefined],
          ["Exit status", job.exitStatus ? word(ExitStatusSchema, job.exitStatus) : undefined],
          ["Message", job.statusMessage],
          ["Cancel requested", job.cancelRequested ? "yes" : undefined],
        ]);
      });
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["job", "cancel"],
    summary: "Cancel a job",
    args: JOB_ARG,
    flags: {
      message: { type: "string", placeholder: "TEXT", description: "why, for the job's timeline" },
      wait: { type: "bool", short: "w", description: "wait until the job is finalized" },
    },
    examples: ["tml job cancel $JOB", 'tml job cancel $JOB --message "wrong branch" --wait'],
    async run(ctx, { args, flags }) {
      const jobs = await ctx.client(JobService);
      let { job } = await jobs.cancelJob({ jobId: args.JOB, message: flags.message ?? "" }, { timeoutMs: 15_000 });
      if (flags.wait === true && job?.state !== JobState.FINALIZED) job = await watchJob(jobs, args.JOB, ctx.abort.signal, () => undefined);
      ctx.out.data(job ? jsonOf(JobSchema, job) : {}, () =>
        ctx.out.line(job?.state === JobState.FINALIZED ? `Job ${args.JOB} ${outcome(job)}.` : `Job ${args.JOB} is being canceled.`),
      );
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["job", "wait"],
    summary: "Wait until a job ends; exit 0 if it succeeded, 1 if not",
    args: JOB_ARG,
    flags: { timeout: { type: "string", placeholder: "DURATION", description: "give up after this long (exit 3)" } },
    examples: ["tml job wait $JOB && echo passed", "tml job wait $JOB --timeout 1h"],
    async run(ctx, { args, flags }) {
      const jobs = await ctx.client(JobService);
      const signal =
        flags.timeout === undefined
          ? ctx.abort.signal
          : AbortSignal.any([ctx.abort.signal, AbortSignal.timeout(parseDuration("timeout", flags.timeout))]);
      let job: Job;
      try {
        job = await watchJob(jobs, args.JOB, signal, () => undefined);
      } catch (err) {
        if (signal.aborted && !ctx.abort.signal.aborted) throw new CliError(`job ${args.JOB} did not end within ${flags.timeout}`, ExitCode.ERROR);
        throw err;
      }
      ctx.out.data(jsonOf(JobSchema, job), () => ctx.out.line(`Job ${job.id} ${outcome(job)}.`));
      return jobExitCode(job);
    },
  }),
  defineCommand({
    path: ["job", "events"],
    summary: "Show a job's timeline",
    args: JOB_ARG,
    flags: { follow: { type: "bool", short: "f", description: "keep printing new events until the job ends" } },
    examples: ["tml job events $JOB", "tml job events $JOB --follow"],
    async run(ctx, { args, flags }) {
      const jobs = await ctx.client(JobService);
      const columns = [
        { header: "TIME", value: (e: Job["timeline"][number]) => iso(e.time) ?? "-" },
        { header: "EVENT", value: (e: Job["timeline"][number]) => word(JobEventKindSchema, e.kind) },
        {
          header: "STATE",
          value: (e: Job["timeline"][number]) => word(JobStateSchema, e.state) + (e.stage ? ` (${word(JobStageSchema, e.stage)})` : ""),
        },
        { header: "ATTEMPT", value: (e: Job["timeline"][number]) => String(e.attempt) },
        { header: "MESSAGE", value: (e: Job["timeline"][number]) => e.message || "-" },
      ];
      if (flags.follow !== true) {
        const { job } = await jobs.getJob({ jobId: args.JOB }, { timeoutMs: 15_000 });
        const events = job?.timeline ?? [];
        ctx.out.data(
          events.map((e) => jsonOf(JobEventSchema, e)),
          () => ctx.out.table(events, columns, "No events."),
        );
        return ExitCode.OK;
      }
      let printed = 0;
      let header = false;
      await watchJob(jobs, args.JOB, ctx.abort.signal, (job) => {
        for (const e of job.timeline.slice(printed)) {
          if (ctx.out.format === "table") {
            if (!header) ctx.out.line(ctx.out.style(columns.map((c) => c.header).join("  "), "bold"));
            header = true;
            ctx.out.line(columns.map((c) => c.value(e)).join("  "));
          } else ctx.out.line(JSON.stringify(jsonOf(JobEventSchema, e)));
        }
        printed = Math.max(printed, job.timeline.length);
      });
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["job", "logs"],
    summary: "Print a job's log; --follow keeps printing until the job ends",
    args: JOB_ARG,
    flags: {
      channel: { type: "list", short: "c", placeholder: "NAME", description: "channels to print (default console, stdout, stderr)" },
      follow: { type: "bool", short: "f", description: "keep printing new output until the job ends" },
      since: { type: "string", placeholder: "WHEN", description: "only output captured since a time (RFC 3339) or a duration ago (10m)" },
      attempt: { type: "string", placeholder: "N", description: "an earlier attempt of a restarted job (default: the latest)" },
    },
    examples: ["tml job logs $JOB", "tml job logs $JOB --follow", "tml job logs $JOB --channel supervisor --since 10m"],
    async run(ctx, { args, flags }) {
      const jobs = await ctx.client(JobService);
      const jobId = args.JOB;
      const channels = channelsOf(flags.channel, false);
      const sinceMs = parseSince(flags.since);
      const attempt = flags.attempt === undefined ? 0 : parseIntFlag("attempt", flags.attempt, 1, 1000);
      const logs = logAccess(ctx, jobs, jobId);
      if (flags.follow === true) {
        const watch = new AbortController();
        const followers = new LogFollowers(logs, channels, logSink(ctx), { sinceMs, signal: watch.signal });
        ctx.onInterrupt(() => watch.abort());
        try {
          await watchJob(jobs, jobId, watch.signal, (job) => {
            if (job.logServerUrls.length > 0 && job.state !== JobState.QUEUED) followers.follow(attempt === 0 ? job.attempt : attempt);
          });
          await followers.finish(LOG_GRACE_MS);
        } catch (err) {
          await followers.stop();
          if (watch.signal.aborted) return ExitCode.INTERRUPTED;
          throw err;
        }
        await noteUnsettledLog(ctx, jobs, jobId);
        if (followers.error) throw followers.error;
        return ExitCode.OK;
      }
      const sink = logSink(ctx);
      const signal = ctx.abort.signal;
      try {
        for await (const line of mergeByTime(channels.map((channel) => readChannel(logs, { channel, attempt, follow: false, sinceMs, signal })))) {
          sink.write(line);
        }
      } finally {
        // Also when the log servers cannot be read: the note may say why.
        await noteUnsettledLog(ctx, jobs, jobId);
      }
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["job", "snapshot"],
    summary: "Turn a running job's state into a new private image",
    args: [
      { name: "JOB", required: true, description: "the job's id (running, on one host)" },
      { name: "NAME:TAG", required: false, description: "the new image's name and tag (a name alone means :latest)" },
    ],
    flags: {
      name: { type: "string", placeholder: "NAME:TAG", description: "the new image's name and tag, instead of the argument" },
      wait: { type: "bool", short: "w", description: "wait until the image is registered, showing progress" },
      timeout: { type: "string", placeholder: "D", description: "with --wait: how long to wait (default 30m); the snapshot goes on after" },
    },
    examples: ["tml job snapshot $JOB me/debug-state:1 --wait", "tml job snapshot $JOB me/debug-state:1 && tml job events $JOB"],
    async run(ctx, { args, flags }) {
      const given = args["NAME:TAG"] ?? flags.name;
      if (given === undefined) throw new UsageError("`tml job snapshot` needs the new image's NAME:TAG");
      const ref = splitReference(given, "NAME:TAG");
      if (ref.name === "") throw new UsageError("NAME:TAG must be a name, not a digest");
      const timeoutMs = flags.timeout === undefined ? 30 * 60_000 : parseDuration("timeout", flags.timeout);
      const jobs = await ctx.client(JobService);
      const request = { jobId: args.JOB, name: ref.name, tag: ref.tag, requestId: randomUUID() };
      let { snapshot } = await jobs.snapshotJob(request, { timeoutMs: 30_000 });
      if (flags.wait === true && snapshot?.state === SnapshotState.PENDING) {
        const id = snapshot.id;
        ctx.out.note(ctx.out.errStyle(`--> snapshot ${id} of job ${args.JOB} requested`, "cyan"));
        // Progress: the supervisor's lines about this snapshot on the job's `supervisor` channel.
        const progress = new AbortController();
        const prefix = `snapshot ${id}: `;
        // The supervisor's last line ("done: ..." or "failed: ...") may reach
        // the log server after the snapshot's end reaches us: it is waited for.
        let lastLine: () => void = () => undefined;
        const lastShown = new Promise<void>((resolve) => (lastLine = resolve));
        const shown = (async () => {
          const lines = readChannel(logAccess(ctx, jobs, args.JOB), { channel: "supervisor", attempt: snapshot!.attempt, follow: true, signal: progress.signal });
          for await (const line of lines) {
            for (const text of Buffer.from(line.data).toString("utf8").split("\n")) {
              if (!text.startsWith(prefix)) continue;
              const said = text.slice(prefix.length);
              ctx.out.note(ctx.out.errStyle(`--> ${said}`, "cyan"));
              if (/^(done|failed): /.test(said)) lastLine();
            }
          }
        })().catch(() => undefined);
        ctx.onInterrupt(() => progress.abort());
        try {
          ({ snapshot } = await jobs.snapshotJob({ ...request, wait: true }, { timeoutMs, signal: progress.signal }));
          await Promise.race([lastShown, shown, sleep(LAST_LINE_GRACE_MS, progress.signal).catch(() => undefined)]);
        } catch (err) {
          const error = ConnectError.from(err);
          if (error.code === Code.DeadlineExceeded) {
            throw new CliError(`Snapshot ${id} is still running after ${flags.timeout ?? "30m"}; follow it with \`tml job events ${args.JOB}\`.`);
          }
          if (progress.signal.aborted) return ExitCode.INTERRUPTED;
          throw err;
        } finally {
          progress.abort();
          await shown;
        }
      }
      ctx.out.data(snapshot ? jsonOf(SnapshotSchema, snapshot) : {}, () => {
        if (snapshot?.state === SnapshotState.SUCCEEDED) {
          ctx.out.line(`Job ${args.JOB} is now image ${ref.text} (${snapshot.manifestDigest}), private to you.`);
        } else if (snapshot?.state === SnapshotState.PENDING) {
          ctx.out.line(`Snapshot ${snapshot.id} of job ${args.JOB} as ${ref.text} requested; \`tml job events ${args.JOB}\` shows when it is done.`);
        }
      });
      if (snapshot?.state === SnapshotState.FAILED) {
        throw new CliError(`The snapshot of job ${args.JOB} failed: ${snapshot.message || "no reason given"}.`);
      }
      return ExitCode.OK;
    },
  }),
  ...hostControlCommands,
  ...resultsCommands,
  ...jobArtifactCommands,
];

/**
 * For the last line of `tml job run`: what is wrong with the log of a job
 * that just ended ("; log INCOMPLETE, ..."), or "" when it is complete. The
 * job's record is read again: the log may have settled while its last lines
 * were being printed.
 */
async function logAfterEnd(jobs: Jobs, job: Job): Promise<string> {
  if (job.logStatus === LogStatus.COMPLETE || job.logStatus === LogStatus.UNSPECIFIED) return "";
  const now = (await jobs.getJob({ jobId: job.id }, { timeoutMs: 15_000 }).catch(() => ({ job }))).job ?? job;
  if (now.logStatus === LogStatus.SHIPPING) return `; its log is still being shipped from its host (\`tml job logs ${job.id}\` shows the rest later)`;
  if (now.logStatus === LogStatus.INCOMPLETE) return `; log ${logStatusText(now)}`;
  return "";
}

/** After printing a job's log: says so on stderr when the log is still being shipped or incomplete. */
async function noteUnsettledLog(ctx: CliContext, jobs: Jobs, jobId: string): Promise<void> {
  const { job } = await jobs.getJob({ jobId }, { timeoutMs: 15_000 }).catch(() => ({ job: undefined }));
  if (job?.logStatus === LogStatus.SHIPPING) {
    ctx.out.note(ctx.out.errStyle(`tml: the log of job ${jobId} is still being shipped from its host; run this again later for the rest (${job.logStatusMessage})`, "dim"));
  } else if (job?.logStatus === LogStatus.INCOMPLETE) {
    ctx.out.note(ctx.out.errStyle(`tml: the log of job ${jobId} is ${logStatusText(job)}`, "dim"));
  }
}

/** "workload-failure, host-start-failure: up to 2 each, on another host" (JobSpec.retry). */
function retryText(retry: NonNullable<NonNullable<Job["spec"]>["retry"]>): string {
  const on = retry.on.map((c) => word(RetryConditionSchema, c)).join(", ");
  return `${on}: up to ${retry.max}${retry.on.length > 1 ? " each" : ""}${retry.otherHost ? ", on another host" : ""}`;
}

/** The names of hosts by id (the id itself when the host cannot be read). */
async function hostNames(ctx: CliContext, ids: string[]): Promise<string[]> {
  const hosts = await ctx.client(HostService);
  return Promise.all(
    ids.map((id) =>
      hosts.getHost({ host: { case: "hostId", value: id } }, { timeoutMs: 5000 }).then(
        (r) => r.host?.name || id,
        () => id,
      ),
    ),
  );
}
