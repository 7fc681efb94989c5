import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { ExitStatus, FinalizeReason, JobStage, JobState } from "../gen/treadmill/coordinator/v1/job_pb.js";
import type { StartJob } from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { LogShipper } from "./log-shipper.js";
import type { Logger } from "../lib/logger.js";
import {
  ControlRefused,
  DriverAbortError,
  DriverError,
  type Driver,
  type HostAction,
  type DriverStage,
  type JobExit,
  type OutputChannel,
  type JobImage,
  type Prepared,
  type RunningJob,
} from "./drivers/driver.js";
import type { ClientTls } from "../lib/grpc/trust.js";
import { startExposer, type Exposer } from "./exposer.js";
import { ImageError, ImageUnavailableError, type ImageProvisioner, type ProvisionedImage } from "./images.js";
import type { JobLogs } from "./job-logs.js";
import type { AttemptResults, JobResults } from "./job-results.js";
import { type ArtifactsReport, fetchInputs, uploadArtifacts } from "./artifacts.js";
import { ConsoleArtifacts } from "./console-artifacts.js";

/** How a job ended here, before the coordinator's verdict. */
export interface Termination {
  reason: FinalizeReason;
  exitStatus: ExitStatus;
  exitCode?: number;
  message: string;
  at: Date;
  /** The job was held after its workload failed: the workload's outcome stands over the stop that ended the hold. */
  held?: boolean;
}

/** A running job, for a snapshot (JobRunner.snapshotSource). */
export interface SnapshotSource {
  running: RunningJob;
  image: JobImage;
  /** The job's current image:read token (minted for the job's owner): a snapshot mounts the image's layers with it. */
  imageToken(): string;
  /** A line on the job's `supervisor` channel (dropped once the log is finished). */
  say(text: string): void;
  /** Keeps the job's files until `work` settles; returns `work`. */
  hold<T>(work: Promise<T>): Promise<T>;
}

/** A change of a job, for the coordinator (JobStateReport). */
export interface RunnerReport {
  state: JobState;
  stage: JobStage;
  message: string;
  termination?: Termination;
}

const stages: Record<DriverStage, JobStage> = {
  allocating: JobStage.ALLOCATING,
  provisioning: JobStage.PROVISIONING,
  booting: JobStage.BOOTING,
};

const driverReasons: Record<DriverError["reason"], FinalizeReason> = {
  image: FinalizeReason.IMAGE_ERROR,
  start: FinalizeReason.HOST_START_FAILURE,
  internal: FinalizeReason.INTERNAL_ERROR,
};

export interface JobRunnerDeps {
  driver: Driver;
  images: ImageProvisioner;
  logger: Logger;
  /** The host's job logs: the runner's shipper comes from there and outlives it. */
  logs: JobLogs;
  /** The host's results reports (docs/results.md): the runner's part parses the console and collects the results files. */
  results: JobResults;
  /** Sends a report to the coordinator (queued across reconnects by the core). */
  report: (report: RunnerReport) => void;
  /** This host's id as the coordinator knows it (for the proxy's routing). */
  hostId: () => string;
  /** The CAs https proxies are verified with (--ca-file). */
  tls?: ClientTls;
  clock?: () => number;
  /** Sends the attempt's JobArtifactsReport (retained by the core until acknowledged). */
  reportArtifacts?: (report: ArtifactsReport) => void;
  /** Longest time the artifacts' upload may take once the job ended. */
  artifactDeadlineMs?: number;
  /** Where console artifacts of drivers without a files directory are spooled (console-artifacts.ts). */
  spoolDir?: string;
}

/**
 * What the workload learns of the job's hosts (DESIGN.md §5, multi-host
 * jobs): its own index, the number of hosts, and every host's name and id by
 * index (space-separated, so `set -- $TREADMILL_PEERS` works in sh).
 */
export function peerEnv(start: StartJob): Record<string, string> {
  const peers = [...start.peers].sort((a, b) => a.index - b.index);
  return {
    TREADMILL_HOST_INDEX: String(start.hostIndex),
    TREADMILL_HOST_COUNT: String(Math.max(1, peers.length)),
    TREADMILL_PEERS: peers.map((p) => p.hostName).join(" "),
    TREADMILL_PEER_IDS: peers.map((p) => p.hostId).join(" "),
  };
}

/**
 * One job attempt on this host, from StartJob to its terminal report: fetch
 * the image, prepare and start it with the driver, ship its output to every
 * log server, enforce its deadline locally, stop it on request, clean up.
 * Everything the job does goes through here; the core only routes commands.
 *
 * The state it reports is the ground truth of DESIGN.md §4: INITIALIZING
 * (with stages), RUNNING, TERMINATING, then a termination.
 */
export class JobRunner {
  readonly jobId: string;
  readonly attempt: number;
  private start: StartJob;
  private state: JobState = JobState.ASSIGNED;
  private stage: JobStage = JobStage.UNSPECIFIED;
  private termination: Termination | undefined;
  /** The reason a stop was asked for; it wins over the workload's own exit. */
  private stopReason: FinalizeReason | undefined;
  private stopGraceMs: number | undefined;
  private readonly abort = new AbortController();
  private running: RunningJob | undefined;
  private readonly log: Logger;
  private readonly shipper: LogShipper;
  private readonly results: AttemptResults;
  /** The image the job runs, and snapshots the cleanup must wait for (supervisor/snapshot.ts). */
  private image: JobImage | undefined;
  private snapshotting: Promise<unknown> = Promise.resolve();
  /** Set while the job is held (StartJob.hold_on_failure): `stop` ends the hold. */
  private endHold: (() => void) | undefined;
  private wasHeld = false;
  /** Console artifacts, for a driver without a files directory (board, qemu). */
  private readonly consoleArtifacts: ConsoleArtifacts | undefined;
  readonly done: Promise<void>;

  constructor(
    start: StartJob,
    private readonly deps: JobRunnerDeps,
  ) {
    this.start = start;
    this.jobId = start.jobId;
    this.attempt = start.attempt;
    this.log = deps.logger.child({ jobId: this.jobId, attempt: this.attempt });
    // The hosts of a multi-host job write the same attempt's log: each its
    // own channels (see channelName) under its own writer name.
    this.shipper = deps.logs.open(start, {
      writer: `host-${start.hostIndex}`,
      sharedAttempt: start.peers.length > 1,
      supervisorChannel: this.channelName("supervisor"),
    });
    this.results = deps.results.open(start.jobId, start.attempt, { console: start.spec?.results?.ignoreConsole !== true });
    const target = start.artifacts;
    if (target && target.uploadUrl !== "" && !deps.driver.jobFiles && deps.spoolDir && !start.spec?.artifacts?.disabled) {
      this.consoleArtifacts = new ConsoleArtifacts(join(deps.spoolDir, `${start.jobId}.${start.attempt}`), target);
    }
    // Started after construction, so that reports name a runner the core holds.
    this.done = Promise.resolve().then(() => this.run());
  }

  /** A repeated StartJob for this attempt: take its fresh tokens, change nothing else. */
  renew(start: StartJob): void {
    this.start = start;
    this.deps.logs.renew(start);
  }

  /** Where the job is, for the hello after a reconnect. */
  held(): { state: JobState; stage: JobStage; termination?: Termination } {
    return { state: this.state, stage: this.stage, termination: this.termination };
  }

  terminated(): boolean {
    return this.termination !== undefined;
  }

  /** Stops the job (idempotent): cancel, timeout, or a job this host should not hold. */
  stop(reason: FinalizeReason, graceMs?: number): void {
    if (this.termination || this.stopReason !== undefined) return;
    this.stopReason = reason;
    this.stopGraceMs = graceMs;
    this.abort.abort(new DriverAbortError("job stopped"));
    if (this.endHold) this.say("hold ended: resetting the host");
    if (this.running) {
      this.setState(JobState.TERMINATING, JobStage.UNSPECIFIED, "stopping");
      this.deps.driver
        .stop(this.running, { graceMs })
        .catch((err: unknown) => this.log.error({ err }, "driver could not stop the job"))
        .finally(() => this.endHold?.());
    }
  }

  /**
   * Acts on the host under the running job (Driver.control), saying so on
   * the job's `supervisor` channel; resolves with the driver's line, rejects
   * with ControlRefused (not running, or the driver cannot).
   */
  async control(action: HostAction): Promise<string> {
    const driver = this.deps.driver;
    if (this.state !== JobState.RUNNING || this.running === undefined || this.stopReason !== undefined) {
      throw new ControlRefused("not-running", `job ${this.jobId} attempt ${this.attempt} is not running on this host`);
    }
    if (driver.control === undefined) throw new ControlRefused("unsupported", `the ${driver.kind} driver cannot ${action} a job's host`);
    this.say(`host control: ${action} requested`);
    try {
      const done = await driver.control(this.running, action);
      this.say(`host control: ${done}`);
      return done;
    } catch (err) {
      this.say(`host control: ${action} failed: ${err instanceof Error ? err.message : String(err)}`);
      throw err;
    }
  }

  private say(text: string): void {
    this.shipper.channel(this.channelName("supervisor")).write(`${text}\n`);
  }

  /**
   * The log channel of `channel` on this host: the name itself, but for host
   * N >= 1 of a multi-host job `<channel>-N` (host 0 keeps the plain names,
   * so a reader of `console` sees the first host as for a one-host job).
   */
  private channelName(channel: string): string {
    return this.start.peers.length > 1 && this.start.hostIndex > 0 ? `${channel}-${this.start.hostIndex}` : channel;
  }

  private setState(state: JobState, stage: JobStage, message: string): void {
    if (this.state === state && this.stage === stage) return;
    this.state = state;
    this.stage = stage;
    this.deps.report({ state, stage, message });
  }

  private async run(): Promise<void> {
    const clock = this.deps.clock ?? Date.now;
    const deadline = this.start.deadline ? timestampDate(this.start.deadline).getTime() : undefined;
    const timer =
      deadline === undefined
        ? undefined
        : setTimeout(() => {
            this.say("job timeout reached: stopping");
            this.stop(FinalizeReason.JOB_TIMEOUT);
          }, Math.max(0, deadline - clock()));
    let provisioned: ProvisionedImage | undefined;
    let prepared: Prepared | undefined;
    let exit: JobExit | undefined;
    let exposer: Exposer | undefined;
    let failure: { reason: FinalizeReason; message: string } | undefined;
    try {
      this.setState(JobState.INITIALIZING, JobStage.FETCHING_IMAGE, "fetching image");
      this.say(`fetching image ${this.start.image?.manifestDigest ?? ""}`);
      let lastPercent = -1;
      provisioned = await this.deps.images.provision(this.start.image!, {
        signal: this.abort.signal,
        token: () => this.start.image?.readToken?.token ?? "",
        onNotice: (text) => this.say(text),
        onProgress: (done, total) => {
          const percent = total > 0 ? Math.floor((done / total) * 10) * 10 : 100;
          if (percent !== lastPercent) {
            lastPercent = percent;
            this.say(`fetching image ${percent}%`);
          }
        },
      });
      this.abort.signal.throwIfAborted();
      this.image = provisioned.image;
      const spec = this.start.spec!;
      const driverSpec = {
        jobId: this.jobId,
        attempt: this.attempt,
        parameters: spec.parameters.map((p) => ({ name: p.name, value: p.value, secret: p.secret })),
        timeoutMs: deadline === undefined ? undefined : deadline - clock(),
        image: provisioned.image,
        exposedPorts: spec.exposedPorts.map((p) => ({ name: p.name, port: p.port })),
        env: peerEnv(this.start),
        holdOnFailure: this.start.holdOnFailure,
      };
      const onStage = (stage: DriverStage, message: string) => {
        this.setState(JobState.INITIALIZING, stages[stage], message);
        this.say(message);
      };
      prepared = await this.deps.driver.prepare(driverSpec, { signal: this.abort.signal, onStage });
      await this.fetchInputs(prepared);
      const output = {
        write: (channel: OutputChannel, bytes: Buffer) => {
          const name = this.channelName(channel);
          this.shipper.channel(name).write(bytes);
          // TAP/KTAP on the console is read as it comes (docs/results.md).
          if (channel === "console" || channel === "stdout") this.results.output(name, bytes);
          if (channel === "console") this.consoleArtifacts?.write(bytes);
        },
      };
      this.running = await this.deps.driver.start(prepared, output, { signal: this.abort.signal, onStage });
      if (this.stopReason !== undefined) {
        // Stopped while starting: the driver may have started it anyway.
        this.setState(JobState.TERMINATING, JobStage.UNSPECIFIED, "stopping");
        await this.deps.driver.stop(this.running, { graceMs: this.stopGraceMs });
      } else {
        this.setState(JobState.RUNNING, JobStage.UNSPECIFIED, "running");
        this.say("running");
        exposer = this.expose();
      }
      exit = await this.running.exited;
      if (this.running.status() === "held" && this.stopReason === undefined) {
        // Held (the driver kept the host as it is): its lease governs, not
        // the job timeout; a stop ends the hold.
        clearTimeout(timer);
        await this.hold(exit);
      } else if (this.start.holdOnFailure && exit.status === "failure" && !exit.stopped && exit.failure === undefined) {
        this.say(`the ${this.deps.driver.kind} driver did not hold the host: resetting it`);
      }
    } catch (err) {
      if (err instanceof DriverAbortError || this.abort.signal.aborted) {
        failure = { reason: this.stopReason ?? FinalizeReason.CANCELED, message: "stopped before it ran" };
      } else if (err instanceof DriverError) {
        failure = { reason: driverReasons[err.reason], message: err.message };
      } else if (err instanceof ImageError) {
        // Missing, refused or corrupt everywhere: the image's fault.
        failure = { reason: FinalizeReason.IMAGE_ERROR, message: err.message };
      } else if (err instanceof ImageUnavailableError) {
        // Its cache and stores unreachable beyond the fetch budget: the
        // infrastructure's fault; the restart policy re-queues the job.
        failure = { reason: FinalizeReason.HOST_START_FAILURE, message: err.message };
      } else {
        const message = err instanceof Error ? err.message : String(err);
        failure = { reason: FinalizeReason.INTERNAL_ERROR, message };
        this.log.error({ err }, "job failed on this host");
      }
    } finally {
      clearTimeout(timer);
    }

    this.setState(JobState.TERMINATING, JobStage.UNSPECIFIED, "terminating");
    await exposer?.stop();
    await this.snapshotting;
    const target = this.running ?? prepared;
    // Results are collected before cleanup removes the job's files, also for a failed or stopped job.
    const resultsDir = target ? this.deps.driver.resultsDir?.(target) : undefined;
    await this.results.collect(resultsDir);
    await this.collectArtifacts(target).catch((err: unknown) => this.log.error({ err }, "collecting the job's artifacts failed"));
    if (target) await this.deps.driver.cleanup(target).catch((err) => this.log.error({ err }, "driver cleanup failed"));
    await provisioned?.release();

    const termination: Termination = exit
      ? {
          // A sandbox killed from outside (exit.failure) is the host's failure, not the workload's exit;
          // a held job ends with its workload's exit whatever stop ended the hold.
          reason: this.wasHeld
            ? FinalizeReason.WORKLOAD_EXITED
            : (this.stopReason ?? (exit.failure ? driverReasons[exit.failure.reason] : FinalizeReason.WORKLOAD_EXITED)),
          exitStatus: exit.status === "success" ? ExitStatus.SUCCESS : ExitStatus.FAILURE,
          exitCode: exit.exitCode ?? undefined,
          message: exit.message,
          at: new Date(clock()),
          ...(this.wasHeld ? { held: true } : {}),
        }
      : {
          reason: failure!.reason,
          exitStatus: ExitStatus.FAILURE,
          message: failure!.message.slice(0, 4096),
          at: new Date(clock()),
        };
    this.say(`job ended: ${FinalizeReason[termination.reason].toLowerCase()}${termination.exitCode === undefined ? "" : `, exit code ${termination.exitCode}`}`);
    // The end waits for the log servers only briefly: the log ships on in the background.
    const log = await this.deps.logs.ended(this.jobId, this.attempt);
    if (log && log.status !== "complete") {
      this.log.warn({ status: log.status, bytesLost: log.bytesLost, problem: log.problem }, "job ended before its log was shipped");
    }
    // The job's end is reported once its results are recorded (or the wait for them is over).
    await this.results.settled();
    this.termination = termination;
    this.deps.report({ state: JobState.TERMINATING, stage: JobStage.UNSPECIFIED, message: termination.message, termination });
  }

  /** The job's inputs into the driver's inputs directory, before the workload starts (artifacts.ts). */
  private async fetchInputs(prepared: Prepared): Promise<void> {
    const inputs = this.start.spec?.inputs ?? [];
    if (inputs.length === 0) return;
    const files = this.deps.driver.jobFiles?.(prepared);
    // The job's own doing (its spec), not the host's: no restart on another host would help.
    if (!files) throw new DriverError("image", `the ${this.deps.driver.kind} driver cannot give a job input files (inputs are for process jobs)`);
    this.say(`fetching ${inputs.length} input file${inputs.length === 1 ? "" : "s"}`);
    await fetchInputs(inputs, this.start.inputs, join(files.root, files.inputs), {
      say: (text) => this.say(text),
      signal: this.abort.signal,
      tls: this.deps.tls,
    });
  }

  /**
   * Uploads what the job left in its artifacts directory (artifacts.ts) and
   * sends the report, before the attempt's end is reported; bounded by the
   * collection deadline. Also after a failure or a cancel: whatever the job
   * wrote goes up. Never throws: the attempt's end is reported whatever
   * became of its artifacts.
   */
  private async collectArtifacts(target: Prepared | RunningJob | undefined): Promise<void> {
    const artifacts = this.start.artifacts;
    const fromConsole = this.consoleArtifacts;
    const files = fromConsole
      ? { root: fromConsole.filesDir, artifacts: "" }
      : target && this.deps.driver.jobFiles?.(target);
    if (!artifacts || artifacts.uploadUrl === "" || !files || !this.deps.reportArtifacts || this.start.spec?.artifacts?.disabled) return;
    const deadline = AbortSignal.timeout(this.deps.artifactDeadlineMs ?? 120_000);
    const report = await uploadArtifacts({
      root: files.root,
      rel: files.artifacts,
      skipped: await fromConsole?.finish(),
      target: artifacts,
      jobId: this.jobId,
      attempt: this.attempt,
      hostIndex: this.start.hostIndex,
      prefix: this.start.peers.length > 1 && this.start.hostIndex > 0 ? `host-${this.start.hostIndex}/` : "",
      reportId: randomUUID(),
      say: (text) => this.say(text),
      signal: deadline,
      tls: this.deps.tls,
    });
    await fromConsole?.cleanup();
    if (report) this.deps.reportArtifacts(report);
  }

  /**
   * Reports the job RUNNING in stage HELD and waits for the stop that ends
   * the hold; the console, exposures and host control keep working meanwhile.
   */
  private async hold(exit: JobExit): Promise<void> {
    this.wasHeld = true;
    const ended = new Promise<void>((resolve) => (this.endHold = resolve));
    this.setState(JobState.RUNNING, JobStage.HELD, `held after the workload failed: ${exit.message}`);
    this.say(`held: ${exit.message}; the host stays as it is until the job is canceled or its lease ends`);
    await ended;
  }

  /**
   * Exposes the job's host-local ports (its console, declared ports) through
   * the proxy StartJob named, while it runs (DESIGN.md §8).
   */
  private expose(): Exposer | undefined {
    const proxy = this.start.proxy;
    if (!proxy || proxy.url === "") return undefined;
    return startExposer({
      proxyUrl: proxy.url,
      token: () => this.start.proxy?.exposeToken?.token ?? "",
      jobId: this.jobId,
      hostId: this.deps.hostId(),
      attempt: this.attempt,
      exposures: () => this.running?.exposures() ?? [],
      logger: this.log.child({ subsystem: "exposer" }),
      signal: this.abort.signal,
      tls: this.deps.tls,
    });
  }

  /**
   * What a snapshot needs while the job runs: the driver's handle, the image,
   * the job's `supervisor` channel, and `hold`, which keeps the job's files
   * (no cleanup) until the given work settles. Undefined unless RUNNING.
   */
  snapshotSource(): SnapshotSource | undefined {
    if (this.state !== JobState.RUNNING || !this.running || !this.image || this.stopReason !== undefined) return undefined;
    return {
      running: this.running,
      image: this.image,
      imageToken: () => this.start.image?.readToken?.token ?? "",
      say: (text) => {
        if (!this.shipper.ended) this.say(text);
      },
      hold: (work) => {
        this.snapshotting = Promise.all([this.snapshotting, work.catch(() => undefined)]);
        return work;
      },
    };
  }

  /** The job's host-local ports while it runs. */
  exposures() {
    return this.running?.exposures() ?? [];
  }
}
