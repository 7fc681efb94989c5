/**
 * The chaos run of issue #18, shared by the benchmark (test/bench/chaos.ts)
 * and its short form in `npm run test:interop` (test/interop/chaos.test.ts).
 *
 * A site of separate processes, assembled as docs/site.md says (site.ts),
 * runs a steady flow of short jobs, each printing a known set of numbered,
 * checksummed lines, with a restart policy. Meanwhile phase 1 SIGKILLs each
 * component in turn and starts it again a few seconds later, and phase 2
 * keeps some components (the log server, the cache) down for minutes. Each
 * kill waits for a job running where it strikes; after every restart the
 * run waits for the component to serve again and for a job assigned since
 * (to that host, for a host's supervisor or board) to succeed: jobs must
 * keep flowing. Then every job must finish, every job's log settle, and
 * each job is checked:
 *
 * - lost: accepted by SubmitJob, yet never finalized, or gone;
 * - run twice: a workload started more than once within one attempt, or in
 *   an attempt the job's record does not have. Counted from the supervisors'
 *   own log lines (the process driver's `job started`, the board driver's
 *   `board booted`, each with the job and attempt): a process job's sandbox
 *   has no network and no file system of the host, so the workload cannot
 *   tally itself outside Treadmill, and the supervisors' logs are the
 *   record nearest to what physically ran;
 * - log: the final attempt's console must hold every line exactly once, in
 *   order, each with its job's id and a correct checksum; an earlier
 *   attempt's (cut short by a fault) must repeat no line and hold no foreign
 *   or corrupt one;
 * - failed: a job that did not succeed. Every workload succeeds when left
 *   alone, so each is a job failed by an outage (shorter than the
 *   supervisors' provisioning budget, `--image-fetch-budget-ms`, 5 minutes
 *   by default: a longer outage may fail jobs by design).
 *
 * It also tallies the attempts ended by infrastructure (and restarted by the
 * policy), by reason, and times each component's return to serving.
 */
import { randomBytes, randomInt } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ExitStatus, FinalizeReason, JobEventKind, JobState, LogStatus, ReasonClass, type Job } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LogService } from "../../gen/treadmill/log/v1/log_service_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { JobSpecSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { sleep } from "../../lib/retry.js";
import { buildBusyboxImage, buildFirmwareImage } from "../../testbed/images.js";
import { pushTestImage } from "../../testbed/provision.js";
import { startSite, type Site } from "./site.js";

/** Phase 1 of the benchmark: each component in turn, PostgreSQL in the middle and at the end (as in the runs). */
export const FULL_KILLS = [
  "coordinator",
  "log-server",
  "image-store",
  "image-cache",
  "proxy",
  "supervisor-1",
  "postgres",
  "supervisor-2",
  "sim-board",
  "supervisor-board",
  "postgres",
];

/** Phase 1 of the short run: each component once. */
export const SHORT_KILLS = FULL_KILLS.slice(0, -1);

export interface ChaosOptions {
  /**
   * Jobs of the chaos run, spread over the faults' expected length; when
   * the faults take longer, more at the same pace until they are over.
   */
  jobs: number;
  /** Numbered lines each job prints. */
  lines: number;
  /** About how long each job runs (it pauses after every 50 lines); default 5000. */
  jobMs?: number;
  /** Phase 1: components SIGKILLed in turn, each started again `killDownMs` later. */
  kills: string[];
  killDownMs: number;
  /** Phase 2: components kept down for a long while, in turn. */
  outages: { name: string; downMs: number }[];
  /** The jobs' restart policy. */
  maxRestarts: number;
  /** Every Nth job runs on the simulated board (0: none). */
  boardEvery: number;
  /** Jobs of a fault-free pass before the chaos, submitted at once (0: none): the baseline. */
  baselineJobs: number;
  /** Time between submissions; default: the jobs spread over the chaos's expected length. */
  submitIntervalMs?: number;
  /** Deadline for a component to serve again once started. */
  serveTimeoutMs: number;
  /** Deadline for a job assigned after a restart to succeed. */
  flowTimeoutMs: number;
  /** Deadline for every job to be finalized, and then for every log to settle, after the chaos. */
  finishTimeoutMs: number;
  /** Keep the site's directory (logs) after the run. */
  keepDir: boolean;
  /** Progress lines (with the run's elapsed time). */
  progress: (line: string) => void;
}

/** One kill (phase 1) or outage (phase 2) of a component. */
export interface Bounce {
  name: string;
  phase: 1 | 2;
  /** Down on purpose: SIGKILL to start. */
  downMs: number;
  /** Start to serving (health, registration or attachment), when it came back. */
  backMs: number | undefined;
  /** For PostgreSQL: its start to the coordinator's health SERVING again. */
  coordinatorBackMs?: number;
  /** Serving to the first success of a job assigned since, to its host for a supervisor or the board (undefined: none within the deadline). */
  flowMs: number | undefined;
  /** Jobs finalized while it was down. */
  finishedWhileDown: number;
  /** Jobs running when it was killed (on its host, for a supervisor or the board). */
  runningAtKill: number;
}

export interface LogProblem {
  jobId: string;
  attempt: number;
  missing: number;
  repeated: number;
  corrupt: number;
  /** Lines out of order. */
  disordered: number;
}

/** Figures of a set of jobs run to their end. */
export interface Pass {
  jobs: number;
  /** First submission to the last finalization. */
  wallMs: number;
  /** Assignment of the final attempt to its finalization, p50 and p95. */
  runP50Ms: number;
  runP95Ms: number;
  /** Submission to finalization, p50 and p95. */
  turnaroundP50Ms: number;
  turnaroundP95Ms: number;
}

export interface ChaosResult {
  /** The site's directory; its components' logs in `logs/` (gone unless kept). */
  dir: string;
  submitted: number;
  /** Submissions never accepted (the coordinator never answered OK). */
  notSubmitted: number;
  finished: number;
  /** Accepted, never finalized or gone (GetJob NOT_FOUND). */
  lost: string[];
  /** (job, attempt) started more than once, or started in an attempt the job never had. */
  runTwice: { jobId: string; attempt: number; starts: number }[];
  /** Starts counted, all jobs and attempts. */
  starts: number;
  logProblems: LogProblem[];
  /** Jobs whose log status is not COMPLETE at the end, by status. */
  logNotComplete: Record<string, number>;
  /** Attempts ended by infrastructure (restarted, or final), by reason. */
  infraEnds: Record<string, number>;
  /** Jobs that did not succeed, with their reason and message. */
  failed: { jobId: string; reason: string; message: string }[];
  /** Jobs that needed more than one attempt. */
  restartedJobs: number;
  bounces: Bounce[];
  /** Components that did not serve again within the deadline. */
  notBack: string[];
  coldStartMs: Record<string, number>;
  chaos: Pass;
  baseline: Pass | undefined;
  submitIntervalMs: number;
  jobMs: number;
  /** Of the jobs submitted, those sent where a kill would strike or to see a host take jobs again. */
  probes: number;
}

const LINES_SCRIPT = `n=1
while [ "$n" -le "$TREADMILL_PARAM_lines" ]; do
  echo "job $TREADMILL_JOB_ID line $n $(( (TREADMILL_PARAM_seed + n) * 2654435761 % 4294967291 ))"
  if [ $((n % 50)) -eq 0 ]; then sleep "$TREADMILL_PARAM_pause"; fi
  n=$((n + 1))
done
`;

/** The checksum each line carries (the scripts' arithmetic, in 64 bits). */
export function lineSum(seed: number, n: number): string {
  return String((BigInt(seed + n) * 2654435761n) % 4294967291n);
}

/** The board's firmware cannot know its job: its lines name the board, with seed 0. */
function firmwareScript(lines: number, pause: string): string {
  return `n=1
while [ "$n" -le ${lines} ]; do
  echo "board line $n $(( n * 2654435761 % 4294967291 ))"
  if [ $((n % 50)) -eq 0 ]; then sleep ${pause}; fi
  n=$((n + 1))
done
echo TREADMILL_EXIT=0
`;
}

/** Priority of the jobs the run sends where a kill strikes (ahead of the steady ones). */
const PROBE_PRIORITY = 10;

/** The components whose kill hurts the jobs of one host, by the host's name in docs/site.md. */
const HOST_OF: Record<string, string> = { "supervisor-1": "sup-1", "supervisor-2": "sup-2", "supervisor-board": "board-1", "sim-board": "board-1" };

const REASONS = (reason: FinalizeReason) => FinalizeReason[reason].toLowerCase();

/**
 * Checks one attempt's console: lines `job <id> line <n> <sum>` (or `board
 * line <n> <sum>`). Other lines (the board's banner) pass unless they look
 * like ours. `complete`: every line 1..lines must be there.
 */
export function checkConsole(text: string, expect: { label: string; seed: number; lines: number; complete: boolean }): Omit<LogProblem, "jobId" | "attempt"> {
  const seen = new Map<number, number>();
  let corrupt = 0;
  let disordered = 0;
  let last = 0;
  const rows = text.split(/\r?\n/);
  rows.forEach((raw, i) => {
    const line = raw.replace(/\r/g, "");
    if (!/ line /.test(line) && !line.startsWith(expect.label.split(" ")[0])) return;
    const m = /^(.*) line (\d+) (\d+)$/.exec(line);
    // The last row of an attempt cut short may be cut too.
    const torn = !expect.complete && i === rows.length - 1;
    if (m === null || m[1] !== expect.label || lineSum(expect.seed, Number(m[2])) !== m[3] || Number(m[2]) > expect.lines) {
      if (!torn) corrupt++;
      return;
    }
    const n = Number(m[2]);
    seen.set(n, (seen.get(n) ?? 0) + 1);
    if (n !== last + 1) disordered++;
    last = n;
  });
  const repeated = [...seen.values()].reduce((sum, count) => sum + count - 1, 0);
  const missing = expect.complete ? expect.lines - seen.size : 0;
  return { missing, repeated, corrupt, disordered: expect.complete ? disordered : 0 };
}

function percentile(samples: number[], p: number): number {
  if (samples.length === 0) return NaN;
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function passOf(jobs: Job[], firstSubmitMs: number): Pass {
  const ms = (t: Job["createTime"]) => (t === undefined ? NaN : timestampMs(t));
  const run = jobs.map((j) => ms(j.finalizeTime) - ms(j.assignTime)).filter((v) => !Number.isNaN(v));
  const turnaround = jobs.map((j) => ms(j.finalizeTime) - ms(j.createTime)).filter((v) => !Number.isNaN(v));
  return {
    jobs: jobs.length,
    wallMs: Math.max(...jobs.map((j) => ms(j.finalizeTime))) - firstSubmitMs,
    runP50Ms: percentile(run, 50),
    runP95Ms: percentile(run, 95),
    turnaroundP50Ms: percentile(turnaround, 50),
    turnaroundP95Ms: percentile(turnaround, 95),
  };
}

const succeeded = (job: Job) => job.state === JobState.FINALIZED && job.finalizeReason === FinalizeReason.WORKLOAD_EXITED && job.exitStatus === ExitStatus.SUCCESS;

/** Polls `check` every `everyMs` until it holds; false at the deadline. */
async function until(check: () => boolean | Promise<boolean>, timeoutMs: number, everyMs = 500): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return true;
    if (Date.now() > deadline) return false;
    await sleep(everyMs);
  }
}

/**
 * The jobs of one set (a tag of their own), as ListJobs last showed them,
 * refreshed every second in the background (errors while the coordinator
 * or its database is down are skipped).
 */
class JobBoard {
  readonly jobs = new Map<string, Job>();
  private readonly stopped = new AbortController();
  private readonly done: Promise<void>;

  constructor(
    private readonly client: Client<typeof JobService>,
    private readonly tags: Record<string, string>,
  ) {
    this.done = this.loop();
  }

  private async loop(): Promise<void> {
    while (!this.stopped.signal.aborted) {
      await this.refresh().catch(() => undefined);
      await sleep(1000, this.stopped.signal).catch(() => undefined);
    }
  }

  async refresh(): Promise<void> {
    let pageToken = "";
    const seen = new Map<string, Job>();
    do {
      const page = await this.client.listJobs({ filter: { tags: this.tags }, pageSize: 1000, pageToken }, { timeoutMs: 10_000 });
      for (const job of page.jobs) seen.set(job.id, job);
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    for (const [id, job] of seen) this.jobs.set(id, job);
  }

  count(predicate: (job: Job) => boolean): number {
    return [...this.jobs.values()].filter(predicate).length;
  }

  async stop(): Promise<void> {
    this.stopped.abort();
    await this.done;
  }
}

/**
 * Submits jobs one at a time on a schedule, each retried until the
 * coordinator accepts it. `count` jobs; with `extend`, more at the same pace
 * until `rush()`, so that jobs flow through every fault however long the
 * faults take. `rush()`: the rest of the `count` at once.
 */
class Submitter {
  readonly accepted: string[] = [];
  readonly submitTimes: number[] = [];
  notSubmitted = 0;
  private rushed = false;
  private wake: (() => void) | undefined;
  readonly done: Promise<void>;

  constructor(
    private readonly client: Client<typeof JobService>,
    count: number,
    spec: (i: number) => MessageInitShape<typeof JobSpecSchema>,
    requestId: (i: number) => string,
    intervalMs: number,
    private readonly giveUpMs: number,
    extend = false,
  ) {
    this.done = (async () => {
      const start = Date.now();
      for (let i = 0; i < count || (extend && !this.rushed); i++) {
        const due = start + i * intervalMs;
        if (!this.rushed && Date.now() < due) {
          await Promise.race([sleep(due - Date.now()), new Promise<void>((resolve) => (this.wake = resolve))]);
        }
        await this.submit(spec(i), requestId(i));
      }
    })();
  }

  /** Submits one job (retried until accepted or the give-up time); its id, or undefined. */
  async submit(spec: MessageInitShape<typeof JobSpecSchema>, requestId: string): Promise<string | undefined> {
    const deadline = Date.now() + this.giveUpMs;
    for (;;) {
      try {
        // The same request id every time: a submission whose answer was lost is not a second job.
        const { job } = await this.client.submitJob({ spec, requestId }, { timeoutMs: 15_000 });
        this.accepted.push(job!.id);
        this.submitTimes.push(Date.now());
        return job!.id;
      } catch {
        if (Date.now() > deadline) {
          this.notSubmitted++;
          return undefined;
        }
        await sleep(1000);
      }
    }
  }

  /** The rest of the `count` jobs at once, and no more. */
  rush(): void {
    this.rushed = true;
    this.wake?.();
  }
}

/** Runs the chaos run of `options` on a fresh site; the site is stopped at the end (its directory kept when asked). */
export async function runChaos(options: ChaosOptions): Promise<ChaosResult> {
  const started = Date.now();
  const say = (line: string) => options.progress(`[${((Date.now() - started) / 1000).toFixed(0).padStart(5)} s] ${line}`);
  const site = await startSite({ quiet: true });
  say(`site in ${site.dir}; each component's output in ${site.dir}/logs/<name>.log`);
  let keep = options.keepDir;
  try {
    const result = await chaosOn(site, options, say);
    keep ||= failedGoals(result).length > 0;
    return result;
  } catch (err) {
    keep = true;
    throw err;
  } finally {
    await site.stop({ keepDir: keep });
    if (keep) say(`kept the site's directory: ${site.dir} (logs in ${site.dir}/logs)`);
  }
}

async function chaosOn(site: Site, options: ChaosOptions, say: (line: string) => void): Promise<ChaosResult> {
  const admin: Transport = await site.admin();
  const client = createClient(JobService, admin);
  const runId = randomBytes(4).toString("hex");
  // Jobs submitted steadily over the faults' expected length (each fault:
  // its down time, about 5 s back to serving, a job to succeed after, and
  // about 5 s more).
  const jobMs = options.jobMs ?? 5000;
  const expectedMs = [...options.kills.map(() => options.killDownMs), ...options.outages.map((o) => o.downMs)].reduce(
    (sum, downMs) => sum + downMs + jobMs + 10_000,
    0,
  );
  const intervalMs = options.submitIntervalMs ?? Math.max(200, Math.floor(expectedMs / options.jobs));
  const pause = (jobMs / Math.max(1, Math.floor(options.lines / 50)) / 1000).toFixed(1);

  const imagesDir = await mkdtemp(join(tmpdir(), "treadmill-chaos-images-"));
  try {
    await pushTestImage(admin, await buildBusyboxImage({ dir: imagesDir, title: "chaos lines", entrypoint: ["/bin/sh", "-c", LINES_SCRIPT] }), "chaos/lines:1");
    if (options.boardEvery > 0) {
      await pushTestImage(admin, await buildFirmwareImage({ dir: imagesDir, script: firmwareScript(options.lines, pause), title: "chaos lines" }), "chaos/firmware:1");
    }
  } finally {
    await rm(imagesDir, { recursive: true, force: true });
  }
  // Each host by id, and each process host tagged `host=<name>`, so that a
  // job can be sent where a kill will strike (the scheduler takes hosts in
  // name order: steady jobs alone might never reach the second one).
  const hosts = createClient(HostService, admin);
  const hostIds = new Map<string, string>();
  for (const name of new Set(Object.values(HOST_OF))) {
    const host = (await hosts.getHost({ host: { case: "name", value: name } })).host!;
    hostIds.set(name, host.id);
    if (host.driverKind === DriverKind.PROCESS) {
      await hosts.updateHost({ hostId: host.id, host: { tags: { ...host.tags, host: name } }, updateMask: { paths: ["tags"] } });
    }
  }

  const isBoard = (i: number) => options.boardEvery > 0 && i % options.boardEvery === options.boardEvery - 1;
  /** A job of the run: on the board, or a process job (on the host named, or any). */
  const jobSpec = (set: string, where: "board" | "process", host?: string, priority = 0): MessageInitShape<typeof JobSpecSchema> => {
    const common = { priority, restartPolicy: { maxRestarts: options.maxRestarts }, tags: { chaos: runId, set } };
    if (where === "board") {
      return { ...common, image: "chaos/firmware:1", hosts: { hostCount: 1, site: site.vars.SITE, driverKind: DriverKind.BOARD, tags: { board: "sim" } } };
    }
    return {
      ...common,
      image: "chaos/lines:1",
      hosts: { hostCount: 1, site: site.vars.SITE, driverKind: DriverKind.PROCESS, tags: host === undefined ? {} : { host } },
      parameters: [
        { name: "lines", value: String(options.lines) },
        { name: "seed", value: String(randomInt(0, 1 << 20)) },
        { name: "pause", value: pause },
      ],
    };
  };
  const specOf = (set: string) => (i: number) => jobSpec(set, isBoard(i) ? "board" : "process");

  // The baseline: the same jobs at the same pace, with no fault.
  let baseline: Pass | undefined;
  if (options.baselineJobs > 0) {
    say(`baseline: ${options.baselineJobs} jobs with no fault, one every ${intervalMs} ms`);
    const board = new JobBoard(client, { chaos: runId, set: "baseline" });
    const submitter = new Submitter(client, options.baselineJobs, specOf("baseline"), (i) => `${runId}-baseline-${i}`, intervalMs, 60_000);
    await submitter.done;
    const all = await until(async () => {
      await board.refresh().catch(() => undefined);
      return board.count((j) => j.state === JobState.FINALIZED) >= submitter.accepted.length;
    }, options.finishTimeoutMs, 1000);
    await board.stop();
    if (!all) throw new Error(`the baseline's ${options.baselineJobs} jobs did not finish within ${options.finishTimeoutMs} ms with no fault`);
    const jobs = [...board.jobs.values()];
    if (jobs.some((j) => !succeeded(j))) throw new Error(`a baseline job failed with no fault: ${JSON.stringify(jobs.filter((j) => !succeeded(j)).map((j) => [j.id, j.statusMessage]))}`);
    baseline = passOf(jobs, submitter.submitTimes[0]);
    say(`baseline: ${jobs.length} jobs in ${(baseline.wallMs / 1000).toFixed(1)} s`);
  }

  say(`chaos: ${options.jobs} jobs of ${options.lines} lines for about ${(jobMs / 1000).toFixed(1)} s each, one every ${intervalMs} ms, max_restarts ${options.maxRestarts}`);
  const board = new JobBoard(client, { chaos: runId, set: "chaos" });
  const submitter = new Submitter(client, options.jobs, specOf("chaos"), (i) => `${runId}-chaos-${i}`, intervalMs, 10 * 60_000, true);
  const finalized = () => board.count((j) => j.state === JobState.FINALIZED);

  const bounces: Bounce[] = [];
  const notBack: string[] = [];
  let probes = 0;
  const bounce = async (name: string, phase: 1 | 2, downMs: number) => {
    // A host's component (a supervisor, the board) strikes that host's jobs;
    // a probe (a job of the run, ahead of the queue) is sent there when
    // none runs there, and after the restart, to see the host run jobs again.
    const hostName = HOST_OF[name] === "board-1" && options.boardEvery === 0 ? undefined : HOST_OF[name];
    const host = hostName === undefined ? undefined : hostIds.get(hostName);
    const probe = () =>
      submitter.submit(
        hostName === "board-1" ? jobSpec("chaos", "board", undefined, PROBE_PRIORITY) : jobSpec("chaos", "process", hostName, PROBE_PRIORITY),
        `${runId}-probe-${++probes}`,
      );
    const there = (j: Job) => host === undefined || j.hostIds.includes(host);
    const runningThere = () => board.count((j) => j.state === JobState.RUNNING && there(j));
    // A kill hurts most while a job runs where it strikes.
    if (runningThere() === 0) await probe();
    await until(() => runningThere() > 0, options.flowTimeoutMs);
    const runningAtKill = runningThere();
    const before = finalized();
    await site.kill(name, "SIGKILL");
    say(`phase ${phase}: ${name} killed with ${runningAtKill} jobs running${host ? " on its host" : ""}, down for ${(downMs / 1000).toFixed(0)} s`);
    await sleep(downMs); // the outage itself
    const finishedWhileDown = finalized() - before;
    const spawned = performance.now();
    await site.start(name);
    const record: Bounce = { name, phase, downMs, backMs: undefined, flowMs: undefined, finishedWhileDown, runningAtKill };
    bounces.push(record);
    try {
      await site.waitServing(name, options.serveTimeoutMs);
      record.backMs = performance.now() - spawned;
      if (name === "postgres") {
        await site.waitServing("coordinator", options.serveTimeoutMs);
        record.coordinatorBackMs = performance.now() - spawned;
      }
    } catch (err) {
      notBack.push(name);
      say(`phase ${phase}: ${name} did not serve again: ${(err as Error).message}`);
      return;
    }
    // Jobs flow again: a job assigned since it serves (to its host, for a host's component) succeeds.
    const backAt = Date.now();
    const servingAt = performance.now();
    await probe();
    const flowed = await until(
      () => [...board.jobs.values()].some((j) => succeeded(j) && j.assignTime !== undefined && timestampMs(j.assignTime) >= backAt && there(j)),
      options.flowTimeoutMs,
    );
    if (flowed) record.flowMs = performance.now() - servingAt;
    say(
      `phase ${phase}: ${name} serving ${((record.backMs ?? 0) / 1000).toFixed(1)} s after its start` +
        (record.coordinatorBackMs !== undefined ? `, the coordinator ${(record.coordinatorBackMs / 1000).toFixed(1)} s` : "") +
        (flowed
          ? `; a job assigned since${host ? " to its host" : ""} succeeded ${((record.flowMs ?? 0) / 1000).toFixed(1)} s later`
          : `; NO job assigned since${host ? " to its host" : ""} succeeded within ${options.flowTimeoutMs} ms`) +
        ` (${finalized()}/${submitter.accepted.length} finalized)`,
    );
  };

  const chaosStart = Date.now();
  for (const name of options.kills) await bounce(name, 1, options.killDownMs);
  for (const outage of options.outages) await bounce(outage.name, 2, outage.downMs);
  say(`faults over after ${((Date.now() - chaosStart) / 1000).toFixed(0)} s; submitting the rest of the jobs at once`);
  submitter.rush();
  await submitter.done;

  // Every job to its end, then every log settled.
  const accepted = submitter.accepted;
  let lastSaid = Date.now();
  const allFinal = await until(async () => {
    if (Date.now() - lastSaid > 30_000) {
      lastSaid = Date.now();
      say(`waiting for jobs: ${finalized()}/${accepted.length} finalized`);
    }
    return accepted.every((id) => board.jobs.get(id)?.state === JobState.FINALIZED);
  }, options.finishTimeoutMs, 1000);
  say(allFinal ? `every job finalized` : `NOT every job finalized within ${options.finishTimeoutMs} ms`);
  const settled = (j: Job) => j.logStatus === LogStatus.COMPLETE || j.logStatus === LogStatus.INCOMPLETE;
  const allSettled = await until(() => accepted.every((id) => board.jobs.get(id)?.state !== JobState.FINALIZED || settled(board.jobs.get(id)!)), options.finishTimeoutMs, 1000);
  say(allSettled ? `every finalized job's log settled` : `NOT every log settled within ${options.finishTimeoutMs} ms`);
  await board.stop();

  // Each job as its record, timeline and log say.
  const lost: string[] = [];
  const failed: ChaosResult["failed"] = [];
  const logProblems: LogProblem[] = [];
  const logNotComplete: Record<string, number> = {};
  const infraEnds: Record<string, number> = {};
  const finals: Job[] = [];
  const attemptsOf = new Map<string, number>();
  let restartedJobs = 0;
  for (const id of accepted) {
    const job = await getJobRetrying(client, id);
    if (job === undefined || job.state !== JobState.FINALIZED) {
      lost.push(id);
      continue;
    }
    finals.push(job);
    attemptsOf.set(id, job.attempt);
    if (job.attempt > 1) restartedJobs++;
    for (const e of job.timeline.filter((e) => e.kind === JobEventKind.RESTARTED)) {
      const reason = /ended (\S+?):/.exec(e.message)?.[1] ?? "unknown";
      infraEnds[reason] = (infraEnds[reason] ?? 0) + 1;
    }
    if (!succeeded(job)) {
      failed.push({ jobId: id, reason: REASONS(job.finalizeReason), message: job.statusMessage });
      if (job.reasonClass === ReasonClass.INFRASTRUCTURE) infraEnds[REASONS(job.finalizeReason)] = (infraEnds[REASONS(job.finalizeReason)] ?? 0) + 1;
    }
    if (job.logStatus !== LogStatus.COMPLETE) {
      const status = LogStatus[job.logStatus].toLowerCase();
      logNotComplete[status] = (logNotComplete[status] ?? 0) + 1;
    }
    const seed = job.spec?.parameters.find((p) => p.name === "seed")?.value;
    const expect = job.spec?.image === "chaos/firmware:1" ? { label: "board", seed: 0 } : { label: `job ${id}`, seed: Number(seed) };
    for (let attempt = 1; attempt <= job.attempt; attempt++) {
      const final = attempt === job.attempt && succeeded(job);
      const text = await readConsole(client, id, attempt);
      const check = checkConsole(text, { ...expect, lines: options.lines, complete: final });
      if (check.missing + check.repeated + check.corrupt + check.disordered > 0) logProblems.push({ jobId: id, attempt, ...check });
    }
  }

  // What physically started, from the supervisors' own logs.
  const starts = new Map<string, number>();
  const ours = new Set(accepted);
  for (const name of site.components.filter((c) => c.startsWith("supervisor"))) {
    const text = await readFile(site.logFile(name), "utf8").catch(() => "");
    for (const line of text.split("\n")) {
      if (!line.includes('"job started"') && !line.includes('"board booted"')) continue;
      let entry: { subsystem?: string; msg?: string; jobId?: string; attempt?: number };
      try {
        entry = JSON.parse(line) as typeof entry;
      } catch {
        continue;
      }
      if (entry.subsystem !== "driver" || entry.jobId === undefined || !ours.has(entry.jobId)) continue;
      const key = `${entry.jobId} ${entry.attempt}`;
      starts.set(key, (starts.get(key) ?? 0) + 1);
    }
  }
  const runTwice = [...starts]
    .map(([key, count]) => ({ jobId: key.split(" ")[0], attempt: Number(key.split(" ")[1]), starts: count }))
    .filter((s) => s.starts > 1 || s.attempt > (attemptsOf.get(s.jobId) ?? Infinity));

  return {
    dir: site.dir,
    submitted: accepted.length,
    notSubmitted: submitter.notSubmitted,
    finished: finals.length,
    lost,
    runTwice,
    starts: [...starts.values()].reduce((a, b) => a + b, 0),
    logProblems,
    logNotComplete,
    infraEnds,
    failed,
    restartedJobs,
    bounces,
    notBack,
    coldStartMs: site.coldStartMs,
    chaos: passOf(finals, submitter.submitTimes[0]),
    baseline,
    submitIntervalMs: intervalMs,
    jobMs,
    probes,
  };
}

/** GetJob, retried while the coordinator is unavailable; undefined when the job is gone. */
async function getJobRetrying(client: Client<typeof JobService>, jobId: string): Promise<Job | undefined> {
  for (let tries = 0; ; tries++) {
    try {
      return (await client.getJob({ jobId }, { timeoutMs: 10_000 })).job;
    } catch (err) {
      if (ConnectError.from(err).code === Code.NotFound) return undefined;
      if (tries >= 30) throw err;
      await sleep(1000);
    }
  }
}

/** One attempt's `console` channel, from the job's first log server that answers; empty when it has none. */
async function readConsole(client: Client<typeof JobService>, jobId: string, attempt: number): Promise<string> {
  const access = await client.getJobLogAccess({ jobId });
  let lastError: unknown;
  for (const url of access.logServerUrls) {
    const transport = coordinatorTransport(url, access.readToken?.token ?? "");
    try {
      const logs = createClient(LogService, transport);
      const parts: Buffer[] = [];
      for await (const r of logs.read({ jobId, attempt, channel: "console", start: { case: "fromSeq", value: 1n } }, { timeoutMs: 30_000 })) {
        if (r.payload.case === "frame") parts.push(Buffer.from(r.payload.value.data));
      }
      return Buffer.concat(parts).toString("utf8");
    } catch (err) {
      if (ConnectError.from(err).code === Code.NotFound) return "";
      lastError = err;
    }
  }
  throw lastError ?? new Error(`job ${jobId} has no log server`);
}

/** The goals the run missed, one sentence each (none: every goal met). */
export function failedGoals(r: ChaosResult): string[] {
  const missed: string[] = [];
  if (r.notSubmitted > 0) missed.push(`${r.notSubmitted} jobs were never accepted by SubmitJob`);
  if (r.lost.length > 0) missed.push(`${r.lost.length} jobs lost: ${r.lost.slice(0, 5).join(", ")}`);
  if (r.runTwice.length > 0) missed.push(`${r.runTwice.length} attempts run twice: ${JSON.stringify(r.runTwice.slice(0, 5))}`);
  if (r.logProblems.length > 0) missed.push(`${r.logProblems.length} logs miss or repeat lines: ${JSON.stringify(r.logProblems.slice(0, 5))}`);
  if (r.failed.length > 0) missed.push(`${r.failed.length} jobs failed by an outage: ${JSON.stringify(r.failed.slice(0, 5))}`);
  if (r.notBack.length > 0) missed.push(`components not back: ${r.notBack.join(", ")}`);
  const stalled = r.bounces.filter((b) => b.backMs !== undefined && b.flowMs === undefined).map((b) => b.name);
  if (stalled.length > 0) missed.push(`jobs stopped flowing after the restart of ${stalled.join(", ")}`);
  return missed;
}
