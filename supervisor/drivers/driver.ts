/**
 * The driver interface (DESIGN.md §9): how the supervisor core runs one job on
 * one kind of host. A driver knows nothing of gRPC, the coordinator, log
 * servers or proxies: the core fetches and verifies the image, hands the
 * driver local blob files and the job's parameters, ships whatever the driver
 * writes to `JobOutput`, and exposes the addresses the driver reports.
 *
 * Isolation is the driver's: a job reaches nothing of its host or of another
 * job (issue #17). Its exposures are what the driver alone decides to offer:
 * addresses the supervisor dials on the user's behalf (a Unix socket in a
 * directory only the supervisor enters, bridged into the job's sandbox; for
 * a board's admin-configured services a host TCP address). Nothing a job
 * declares names a host address: a declared port means a port inside the
 * job's own sandbox (its network namespace, its VM), and a dial the driver
 * does not allow is refused with `ExposureDenied` (PERMISSION_DENIED).
 * A driver finds a job's processes through what it started (a pid
 * namespace, a child process), never by uid alone, and holds the uids of its
 * slots under a machine-wide claim for its whole life (machine.ts), so that
 * supervisors sharing a machine never touch each other's jobs.
 *
 * Life of one job attempt, as the core drives it:
 *
 *   prepare(spec)      -> Prepared     (allocate a slot, unpack/flash, no workload yet)
 *   start(prepared)    -> RunningJob   (the workload runs; `exited` settles at its end)
 *   control(job, action)               (optional, while running: power off/on, power-cycle, reset the host)
 *   stop(job)                          (optional: polite stop, grace, force)
 *   snapshot(job)                      (optional, process driver only)
 *   cleanup(prepared or job)           (always, exactly once in effect; idempotent)
 *
 * Every method may be called again for the same job (the core's commands are
 * idempotent); none throws for a job that already reached the requested state.
 * Hold on failure (`JobSpecForDriver.holdOnFailure`, issue #22): when the
 * workload ends on its own with a failure, a driver that can keeps the host
 * as it is for a post-mortem: `exited` settles with the workload's exit as
 * usual, but `status()` says `held`, and the console, the exposures and
 * `control` keep working until `stop` (or `cleanup`) ends the hold. The
 * board stays powered with its serial console; a process job gets a shell
 * in its own files on its console. A driver that cannot hold (or a stop
 * that came first) leaves the status `exited`, and the core cleans up.
 *
 * `control` acts on the host under a running job and leaves the job running:
 * its console and output keep flowing across a reset, and the job ends only
 * as it would have (its exit pattern, stop, a lost serial line). The core
 * calls it at most once per control request and one at a time per job.
 */

/** The drivers this package provides. */
export type DriverKind = "process" | "board" | "qemu";

/** Output channels of a job (DESIGN.md §7). */
export type OutputChannel = "console" | "stdout" | "stderr" | "supervisor";

/** One job parameter. Secret values reach the workload and nothing else. */
export interface JobParameter {
  /** `[A-Za-z_][A-Za-z0-9_]{0,63}`; names starting with `TREADMILL_` are reserved. */
  name: string;
  value: string;
  secret: boolean;
}

/** One layer of the job's image, already fetched and verified by the core. */
export interface ImageLayer {
  /** `sha256:<hex>` of the blob; the layer cache is keyed by it. */
  digest: string;
  /** e.g. `application/vnd.treadmill.rootfs.tar+gzip` or `application/vnd.treadmill.firmware`. */
  mediaType: string;
  /** Size of the blob in bytes. */
  size: number;
  /** The layer's annotations from the manifest. */
  annotations: Record<string, string>;
  /** Local file holding the blob's bytes (the site cache's shared path or a download). Read only. */
  path: string;
}

/** The job's image: its manifest digest, layers bottom first, and manifest annotations. */
export interface JobImage {
  manifestDigest: string;
  layers: ImageLayer[];
  /** Manifest annotations; `treadmill.entrypoint` (a JSON array of strings) names a process image's command. */
  annotations: Record<string, string>;
}

/** A port of the workload to expose besides the console. */
export interface ExposedPortSpec {
  /** Exposure name, `[a-z][a-z0-9-]{0,31}`. */
  name: string;
  /** The TCP port the workload listens on, inside its own sandbox (never a port of the host). */
  port: number;
}

/** What a driver needs to know about one job attempt. */
export interface JobSpecForDriver {
  jobId: string;
  /** From 1; with `jobId`, identifies the attempt. */
  attempt: number;
  /** The job's parameters, secret values included. */
  parameters: JobParameter[];
  /** Overrides the image's `treadmill.entrypoint` annotation (process driver). */
  entrypoint?: string[];
  /** Extra environment for the workload (process driver); parameters win over it. */
  env?: Record<string, string>;
  /**
   * The job's timeout, for information (e.g. the board driver's boot wait is
   * capped by it). The core enforces the timeout by calling `stop`.
   */
  timeoutMs?: number;
  image: JobImage;
  /** Extra ports to expose. */
  exposedPorts?: ExposedPortSpec[];
  /** Keep the host as it is when the workload fails (see the head comment). */
  holdOnFailure?: boolean;
}

/** Initialization stages a driver reports during `prepare`/`start` (DESIGN.md §4). */
export type DriverStage = "allocating" | "provisioning" | "booting";

export interface PrepareOptions {
  /** Aborting it (the job was canceled) makes `prepare` reject with `DriverAbortError` and undo its work. */
  signal?: AbortSignal;
  /** Called on every stage change, with a human-readable message without secrets. */
  onStage?: (stage: DriverStage, message: string) => void;
}

/** The result of `prepare`: an opaque handle the core passes back to `start` and `cleanup`. */
export interface Prepared {
  readonly kind: DriverKind;
  readonly jobId: string;
  readonly attempt: number;
}

/** Where a running job's output goes. Called synchronously, in order per channel; never blocks. */
export interface JobOutput {
  /** Bytes on one channel. `supervisor` carries the driver's own messages about the job, each line-terminated. */
  write(channel: OutputChannel, bytes: Buffer): void;
}

/** Where a job is, as the driver sees it. */
export type JobPhase = "starting" | "booting" | "running" | "stopping" | "exited" | "held";

/**
 * Where the supervisor dials an exposure: a Unix socket (0600, in a
 * directory only the supervisor enters), or a host TCP address for what an
 * admin configured (a board's services) or what a job may reach anyway
 * (`--job-network host`, after `check`).
 */
export type ExposureAddress = { path: string } | { host: string; port: number };

/** Something of a running job the core may expose through a proxy. */
export type Exposure = {
  /** `console` for the console, otherwise the exposed port's or board service's name. */
  name: string;
  /** `console`: a byte stream bridged to the job's console (pty or serial line); `tcp`: a plain port. */
  kind: "console" | "tcp";
  /** For users, e.g. `port 8080 in the job`; default from the kind. */
  description?: string;
  /**
   * Called before every dial: rejects with `ExposureDenied` when the driver
   * does not allow this dial now (e.g. nothing of the job listens on the
   * port), with any other error when the address cannot be reached yet.
   */
  check?: () => Promise<void>;
} & ExposureAddress;

/** A dial of an exposure that the driver does not allow (PERMISSION_DENIED); the message names why, without secrets. */
export class ExposureDenied extends Error {
  override readonly name = "ExposureDenied";
}

/** How a workload ended. */
export interface JobExit {
  /** The workload's exit code, or null when it has none (killed, board without an exit pattern). */
  exitCode: number | null;
  /** The signal that ended it, when one did. */
  signal?: string;
  /** `success` exactly when the exit code is 0 and the job was not stopped. */
  status: "success" | "failure";
  /** True when the end came from `stop` (cancel, timeout) rather than the workload itself. */
  stopped: boolean;
  /** A short description for the job's timeline, without secrets. */
  message: string;
  /**
   * Set when the host, not the workload, ended the job: its sandbox was
   * killed by a signal the driver did not send (another process of the
   * machine, an operator). The core reports the error's reason as it
   * reports a failed start (`internal`: INTERNAL_ERROR, class
   * infrastructure), never as the workload's exit.
   */
  failure?: DriverError;
}

/** A started job. */
export interface RunningJob {
  readonly kind: DriverKind;
  readonly jobId: string;
  readonly attempt: number;
  /** The handle `start` was given, for `cleanup`. */
  readonly prepared: Prepared;
  status(): JobPhase;
  /** What the core may expose (the console first); empty once it has exited (unless held). */
  exposures(): Exposure[];
  /** Settles once the workload has ended and every process of it is gone. Never rejects. */
  readonly exited: Promise<JobExit>;
  /** Sends bytes to the console, as a client of the console's socket would. */
  writeConsole(bytes: Buffer): void;
}

export interface StopOptions {
  /**
   * Time between the polite stop and the kill; default the driver's
   * configured grace. Process driver: SIGHUP to the job's processes at once,
   * SIGTERM after min(1 s, graceMs / 2), SIGKILL at graceMs. QEMU: ACPI
   * power-down, then quit at graceMs. Board: power off at once.
   */
  graceMs?: number;
}

/** A snapshot layer written by `snapshot`. */
export interface SnapshotLayer {
  /**
   * The layer's media type, e.g. `application/vnd.treadmill.rootfs.tar+gzip`
   * (process driver). The core puts it on the layer's descriptor in the new
   * manifest and records it among the image's media types in the catalog.
   */
  mediaType: string;
  /** `sha256:<hex>` of the file's bytes. */
  digest: string;
  /** Size of the file in bytes. */
  size: number;
  /** The file written (the `outFile` passed in). */
  path: string;
  /**
   * Annotations for the layer's descriptor in the new manifest (e.g. the
   * digest of the lower layer a qcow2 overlay is based on). The core copies
   * them verbatim; absent means none.
   */
  annotations?: Record<string, string>;
}

/**
 * Where a job's files are on the host (docs/artifacts.md): below `root`,
 * `artifacts` is the directory the workload knows as
 * $TREADMILL_ARTIFACTS_DIR (read by the core once the workload has exited,
 * before cleanup) and `inputs` the one it knows as $TREADMILL_INPUTS_DIR
 * (filled by the core before start). Relative, `/`-separated: the core
 * checks that no component is a symbolic link.
 */
export interface JobFiles {
  root: string;
  artifacts: string;
  inputs: string;
}

export interface Driver {
  readonly kind: DriverKind;
  /** Jobs this driver can hold at once (process: slots; board: 1). */
  readonly capacity: number;
  /**
   * Allocates a slot and provisions the job (process: unpack layers and build
   * the work directory; board: flash). Rejects with `DriverError` (`reason`
   * tells the core which finalize reason applies) or `DriverAbortError`.
   */
  prepare(spec: JobSpecForDriver, options?: PrepareOptions): Promise<Prepared>;
  /** Starts the workload. Rejects with `DriverError` (`start`) when it cannot. */
  start(prepared: Prepared, output: JobOutput, options?: PrepareOptions): Promise<RunningJob>;
  /** Polite stop, grace period, then force; resolves once the job has exited. Idempotent. */
  stop(job: RunningJob, options?: StopOptions): Promise<void>;
  /**
   * Acts on the host of a running job (see the head comment) and resolves
   * with a line for the job's timeline once done; rejects with
   * `ControlRefused`. Absent: the driver can do no action (the core answers
   * FAILED_PRECONDITION).
   */
  control?(job: RunningJob, action: HostAction): Promise<string>;
  /**
   * The host path of the job's results directory ($TREADMILL_RESULTS_DIR
   * inside the job, docs/results.md), read by the core after the workload
   * ended and before `cleanup`. Absent, or undefined: the driver shares no
   * directory with the job (board, qemu), whose results come from its
   * console only.
   */
  resultsDir?(job: Prepared | RunningJob): string | undefined;
  /** Where the prepared job's artifacts and inputs are; absent or undefined: this driver has none. */
  jobFiles?(job: Prepared | RunningJob): JobFiles | undefined;
  /** Writes the job's writable state as a new layer to `outFile`. Rejects with `DriverError` when unsupported. */
  snapshot(job: RunningJob, options: { outFile: string }): Promise<SnapshotLayer>;
  /** Stops anything left, removes the job's work files and frees its slot. Idempotent. */
  cleanup(job: Prepared | RunningJob): Promise<void>;
  /** Stops every job and releases the driver's resources, its slot claims included (supervisor shutdown). Idempotent. */
  close(): Promise<void>;
}

/** What `control` does to the host of a running job (job.proto HostControlAction). */
export type HostAction = "power-off" | "power-on" | "power-cycle" | "reset";

/**
 * `control` did not do the action: `unsupported` (the driver or this host
 * cannot: FAILED_PRECONDITION), `unavailable` (a board command failed, the
 * VM's monitor is gone: UNAVAILABLE), `not-running` (the job is not running
 * on the host any more: FAILED_PRECONDITION). The message is lower-case and
 * names the host.
 */
export class ControlRefused extends Error {
  override readonly name = "ControlRefused";
  constructor(
    readonly why: "unsupported" | "unavailable" | "not-running",
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/**
 * A driver failure the core reports to the coordinator: `image` means the
 * image cannot run here (IMAGE_ERROR: bad tar, missing entrypoint, wrong
 * media type), `start` means this host failed to start it (HOST_START_FAILURE:
 * no free slot, flash or boot failed), `internal` is a bug or a host fault
 * while the job ran (INTERNAL_ERROR: its sandbox killed from outside).
 * The message is lower-case, names the thing, and never contains secrets.
 */
export class DriverError extends Error {
  override readonly name = "DriverError";
  constructor(
    readonly reason: "image" | "start" | "internal",
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** `prepare` or `start` gave up because its signal was aborted. */
export class DriverAbortError extends Error {
  override readonly name = "DriverAbortError";
  constructor(message = "job preparation aborted") {
    super(message);
  }
}

/** Throws `DriverAbortError` if the signal is aborted. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new DriverAbortError();
}

/** The environment variable a parameter reaches the workload under. */
export function parameterEnvName(name: string): string {
  return `TREADMILL_PARAM_${name}`;
}

/** Manifest annotation holding a process image's command (a JSON array of strings). */
export const ENTRYPOINT_ANNOTATION = "treadmill.entrypoint";
