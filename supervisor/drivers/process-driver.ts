/**
 * The `process` driver (DESIGN.md §9): a job is a process tree run from the
 * image's unpacked rootfs layers, in a fresh work directory, under its slot's
 * own uid and (where the host has it) bubblewrap, in pid and network
 * namespaces of its own (sandbox.ts). Its stdin/stdout are on a
 * pseudo-terminal (the console, also bridged to a Unix socket only the
 * supervisor can reach), its stderr is a pipe.
 *
 * Files (`workDir`):
 *
 *   workDir/            0711 root   (traversable, not listable)
 *     layers/           0700 root   unpacked layers, one per digest (rootfs.ts)
 *   jobsDir/            0711 root   workDir, or a root-owned place of its own when
 *                                   workDir is private (machine.ts `jobsBase`)
 *     spares/           0700 root   per slot, a fresh root built ahead for its next job
 *     jobs/             0711 root
 *       <job>.<attempt> 0700 slot   one job's directory, removed by cleanup
 *         rootfs/              the job's root, owned by the slot's uid
 *           run/treadmill/secrets/  0700, one 0600 file per secret parameter
 *           run/treadmill/results/  the job's $TREADMILL_RESULTS_DIR (JUnit files, read at its end)
 *
 *   socketDir/          0700 root   (machine.ts) per job: its console, a relay per exposed port
 *
 * A job can therefore read neither another job's directory (another uid,
 * mode 0700) nor the layer cache nor the supervisor's own files, and reaches
 * no port but its own: its exposed ports are reached through relays that
 * the supervisor runs inside the job's network namespace, listening on Unix
 * sockets in its own directory.
 *
 * Start latency: building a job's root (a copy of its layers, given to the
 * slot's uid) is the slowest step of `prepare`, so when a job ends its slot
 * gets a spare root of the same image built in the background, in `spares/`
 * where no job can reach it. The slot's next job of that image takes it with
 * one rename: still a fresh, never-used copy of the image, made off the start
 * path. Another image: the spare is thrown away and the root built as usual.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { constants } from "node:fs";
import { createHash, randomBytes } from "node:crypto";
import { chmod, chown, lstat, mkdir, open, rename, rm, type FileHandle } from "node:fs/promises";
import { join, resolve } from "node:path";
import type { Readable, Writable } from "node:stream";
import type { Logger } from "../../lib/logger.js";
import { ConsoleBridge } from "./console.js";
import {
  DriverError,
  ENTRYPOINT_ANNOTATION,
  ExposureDenied,
  parameterEnvName,
  throwIfAborted,
  type Driver,
  type Exposure,
  type ExposedPortSpec,
  type JobExit,
  type JobFiles,
  type JobOutput,
  type JobSpecForDriver,
  type Prepared,
  type PrepareOptions,
  type RunningJob,
  type SnapshotLayer,
  type StopOptions,
} from "./driver.js";
import { jobsBase, releaseJobsBase, socketDirectory, type SlotClaim, type SocketDirectory } from "./machine.js";
import { composeRootfs, LayerCache, snapshotRootfs, type UnpackedLayer } from "./rootfs.js";
import {
  detectIsolation,
  dieWithSupervisor,
  JobProcesses,
  listenersOf,
  readStatusLines,
  requireTools,
  sandboxCommand,
  socketInodesOf,
  startRelay,
  type Isolation,
  type JobNetwork,
  type Relay,
  type SandboxMode,
  type SandboxStatus,
  type SandboxTools,
  shellQuote,
} from "./sandbox.js";
import { claimSlotUids, makeJobDir, SlotPool, type SlotJob, type SlotPrepared } from "./slots.js";

export interface ProcessDriverOptions {
  /** Where layers and job directories live (created 0711; every ancestor must be traversable by others). */
  workDir: string;
  /** Jobs at once; each slot has its own uid. Default 1. */
  slots?: number;
  /**
   * Uid (and gid) of slot 0; slot N uses `slotUidBase + N`. The uids are
   * claimed machine-wide for the driver's life (machine.ts): `create`
   * fails when another supervisor holds one. `auto` (default): the first
   * free range from 63000, preferring the one this work directory used last.
   */
  slotUidBase?: number | "auto";
  /** Isolation to use; `auto` (default) picks bubblewrap when it works. */
  sandbox?: "auto" | SandboxMode;
  /** `isolated` (default): a network namespace per job; `host`: the host's network (unsafe). */
  network?: JobNetwork;
  /** Default time from the polite stop to SIGKILL (see `stop`). Default 10000. */
  graceMs?: number;
  /** Where the driver's Unix sockets go (a directory only the supervisor may enter); default a private one (machine.ts). */
  socketDir?: string;
  /** This supervisor's name, written on its slot claims for others' messages. */
  name?: string;
  logger: Logger;
}

/** Where secret parameters appear inside the job (one 0600 file per parameter). */
export const SECRETS_DIR = "/run/treadmill/secrets";
/** Where the job writes JUnit files (docs/results.md), owned by the job's uid. */
export const RESULTS_DIR = "/run/treadmill/results";
/** $TREADMILL_ARTIFACTS_DIR and $TREADMILL_INPUTS_DIR inside the job (docs/artifacts.md). */
export const ARTIFACTS_DIR = "/run/treadmill/artifacts";
export const INPUTS_DIR = "/run/treadmill/inputs";
const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/** Why a supervisor that is not root exposes no port of an isolated job. */
const NO_RELAYS = "ports of isolated jobs cannot be exposed on this host: its supervisor is not root, and only root can reach into a job's network namespace";
/** Longest wait for a started sandbox to report its namespace. */
const SANDBOX_UP_MS = 30000;

interface ProcessPrepared extends SlotPrepared {
  readonly kind: "process";
  readonly rootfs: string;
  readonly layers: UnpackedLayer[];
  readonly argv: string[];
  readonly env: Record<string, string>;
  readonly exposedPorts: ExposedPortSpec[];
  /** Keep the job's files with a shell on its console when the workload fails (JobSpecForDriver.holdOnFailure). */
  readonly holdOnFailure: boolean;
  running?: ProcessJob;
}

interface ProcessJob extends SlotJob<ProcessPrepared> {
  readonly kind: "process";
  /** The job's processes (what its sandbox reported); undefined until it has. */
  readonly processes: () => JobProcesses | undefined;
  /** `killed` is set once this driver sent SIGKILL, so that the exit is known to be ours. */
  readonly control: { killed: boolean };
  /** Once the job is held: the post-mortem shell, which its console, exposures and stop then reach. */
  held?: ProcessJob;
}

/** Creates `rel` under `root` (mode 0755 for new ones) without following any link. */
async function mkdirsInside(root: string, rel: string, owner: { uid: number; gid: number } | undefined): Promise<string> {
  let cur = root;
  for (const part of rel.split("/")) {
    cur = join(cur, part);
    let st;
    try {
      st = await lstat(cur);
    } catch {
      await mkdir(cur, { mode: 0o755 });
      if (owner) await chown(cur, owner.uid, owner.gid);
      continue;
    }
    if (!st.isDirectory()) throw new DriverError("image", `image path /${rel} is not a directory`);
  }
  return cur;
}

function parseEntrypoint(spec: JobSpecForDriver): string[] {
  if (spec.entrypoint !== undefined && spec.entrypoint.length > 0) return spec.entrypoint;
  const raw = spec.image.annotations[ENTRYPOINT_ANNOTATION];
  if (raw === undefined) throw new DriverError("image", `image has no ${ENTRYPOINT_ANNOTATION} annotation`);
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch {
    throw new DriverError("image", `image annotation ${ENTRYPOINT_ANNOTATION} is not json`);
  }
  if (!Array.isArray(value) || value.length === 0 || !value.every((v) => typeof v === "string")) {
    throw new DriverError("image", `image annotation ${ENTRYPOINT_ANNOTATION} must be a non-empty json array of strings`);
  }
  return value as string[];
}

function layerKey(layers: UnpackedLayer[]): string {
  return layers.map((l) => l.digest).join(",");
}

/**
 * A fresh job root at `rootfs` (which must not exist): the image's layers
 * given to `owner`, with the mount points the sandbox needs and the (empty)
 * secrets directory, mode 0700.
 */
async function buildRoot(layers: UnpackedLayer[], rootfs: string, owner: { uid: number; gid: number }): Promise<void> {
  await composeRootfs(layers, rootfs, owner);
  for (const dir of ["proc", "dev", "tmp"]) await mkdirsInside(rootfs, dir, owner);
  await chmod(await mkdirsInside(rootfs, SECRETS_DIR.slice(1), owner), 0o700);
}

export class ProcessDriver implements Driver {
  readonly kind = "process" as const;
  readonly capacity: number;
  private readonly pool: SlotPool<ProcessPrepared>;
  private readonly graceMs: number;
  /** Per slot: a fresh root for the slot's next job, built ahead (see the file comment). */
  private readonly spares = new Map<number, { layers: string; ready: Promise<string | undefined> }>();

  private constructor(
    /** Holds `jobs/` and `spares/`: the work directory, or a root-owned place when it is private (machine.ts). */
    private readonly jobsDir: string,
    private readonly isolation: Isolation,
    private readonly cache: LayerCache,
    private readonly tools: SandboxTools,
    private readonly socketDir: SocketDirectory,
    private readonly claim: SlotClaim | undefined,
    private readonly logger: Logger,
    options: ProcessDriverOptions,
  ) {
    this.pool = new SlotPool<ProcessPrepared>({
      names: { driver: "process", slot: "process", job: "job" },
      slots: options.slots ?? 1,
      claim,
      logger,
      stop: (job, stopOptions) => this.stop(job, stopOptions),
      onFree: (prepared) => this.buildSpare(prepared.slot, prepared.layers, { uid: prepared.uid, gid: prepared.gid }),
    });
    this.capacity = this.pool.capacity;
    this.graceMs = options.graceMs ?? 10000;
  }

  /**
   * Checks the host, claims the slots' uids, creates the directories and
   * picks the isolation mode (logging a warning when weak). Fails when
   * another supervisor holds the slots (`SlotTakenError`, naming its pid).
   */
  static async create(options: ProcessDriverOptions): Promise<ProcessDriver> {
    const logger = options.logger.child({ driver: "process" });
    // Absolute: the sandbox and the job's processes run in other directories.
    const workDir = resolve(options.workDir);
    await mkdir(workDir, { recursive: true });
    await chmod(workDir, 0o711);
    const root = process.getuid?.() === 0;
    const slots = options.slots ?? 1;
    const claim = await claimSlotUids({
      slots,
      uidBase: options.slotUidBase ?? "auto",
      switchUid: root,
      holder: options.name ?? "process driver",
      rememberFile: join(workDir, "slot-uid-base"),
      logger,
    });
    try {
      const network = options.network ?? "isolated";
      const isolation = await detectIsolation(options.sandbox ?? "auto", claim?.uidBase ?? 0, network, logger);
      const tools = await ProcessDriver.tools(isolation);
      // The slot's uid must be able to reach its own directory (machine.ts).
      const jobsDir = await jobsBase(workDir, "process", isolation.switchUid);
      if (jobsDir !== workDir) logger.info({ workDir, jobsDir }, "work directory is private: job directories go to a root-owned place of their own");
      const socketDir = await socketDirectory(options.socketDir);
      const cache = new LayerCache(join(workDir, "layers"), logger);
      await cache.init();
      // Job directories and spares of a previous run are stale: their jobs are
      // gone. Spares sit beside the jobs: one is renamed into a job's directory.
      await rm(join(jobsDir, "jobs"), { recursive: true, force: true });
      await mkdir(join(jobsDir, "jobs"), { mode: 0o711 });
      await chmod(join(jobsDir, "jobs"), 0o711);
      await rm(join(jobsDir, "spares"), { recursive: true, force: true });
      await mkdir(join(jobsDir, "spares"), { mode: 0o700 });
      await chmod(join(jobsDir, "spares"), 0o700);
      logger.info(
        { sandbox: isolation.mode, switchUid: isolation.switchUid, network: isolation.network, slots, uidBase: claim?.uidBase },
        "process driver ready",
      );
      return new ProcessDriver(jobsDir, isolation, cache, tools, socketDir, claim, logger, options);
    } catch (err) {
      await claim?.release();
      throw err;
    }
  }

  /** The programs the isolation needs, each checked to be here. */
  private static async tools(isolation: Isolation): Promise<SandboxTools> {
    const util = "util-linux";
    // Only root can enter a job's network namespace (bubblewrap's is owned by a user namespace of its own).
    const relay = isolation.switchUid && isolation.network === "isolated";
    const { script, setpriv } = await requireTools({ script: { name: "script", package: util }, setpriv: { name: "setpriv", package: util } }, "the process driver");
    const extra =
      isolation.mode === "bwrap"
        ? await requireTools({ wrapper: { name: "bwrap", package: "bubblewrap" } }, "the process driver")
        : isolation.mode === "chroot"
          ? {
              wrapper: setpriv,
              ...(await requireTools({ unshare: { name: "unshare", package: util } }, "the process driver in chroot mode")),
              ...(isolation.network === "isolated" ? await requireTools({ ip: { name: "ip", package: "iproute2" } }, "an isolated network in chroot mode") : {}),
            }
          : {};
    const relays = relay
      ? await requireTools({ nsenter: { name: "nsenter", package: util }, socat: { name: "socat", package: "socat" } }, "exposing ports of isolated jobs")
      : {};
    return { script, setpriv, ...extra, ...relays };
  }

  /** The isolation in use (for the supervisor's own status and for tests). */
  get sandbox(): Isolation {
    return this.isolation;
  }

  /** The uid of slot 0, claimed for this driver; undefined when jobs run as the supervisor's own uid. */
  get slotUidBase(): number | undefined {
    return this.claim?.uidBase;
  }

  async prepare(spec: JobSpecForDriver, options: PrepareOptions = {}): Promise<Prepared> {
    const existing = this.pool.existing(spec);
    if (existing !== undefined) return existing;
    const { signal, onStage } = options;
    throwIfAborted(signal);
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(spec.jobId)) throw new DriverError("internal", "job id has unexpected characters");

    onStage?.("allocating", "allocating a process slot");
    const { key, hold } = this.pool.allocate(spec);
    const { slot, uid, gid } = hold;
    const log = this.logger.child({ jobId: spec.jobId, attempt: spec.attempt, slot });
    const jobDir = join(this.jobsDir, "jobs", key);
    try {
      const argv = parseEntrypoint(spec);
      const layers: UnpackedLayer[] = [];
      for (const [i, layer] of spec.image.layers.entries()) {
        throwIfAborted(signal);
        onStage?.("provisioning", `unpacking layer ${i + 1}/${spec.image.layers.length} ${layer.digest}`);
        layers.push(await this.cache.get(layer));
      }
      throwIfAborted(signal);
      onStage?.("provisioning", "building the work directory");
      await makeJobDir(jobDir, uid, gid);
      const rootfs = join(jobDir, "rootfs");
      const started = performance.now();
      const owner = { uid, gid };
      const spare = await this.takeSpare(slot, layers);
      if (spare !== undefined) await rename(spare, rootfs);
      else await buildRoot(layers, rootfs, owner);
      const secretsDir = join(rootfs, SECRETS_DIR.slice(1));
      const resultsDir = await mkdirsInside(rootfs, RESULTS_DIR.slice(1), owner);
      const env: Record<string, string> = {
        PATH: DEFAULT_PATH,
        HOME: "/tmp",
        TERM: "xterm",
        ...spec.env,
        TREADMILL_JOB_ID: spec.jobId,
        TREADMILL_ATTEMPT: String(spec.attempt),
        TREADMILL_SECRETS_DIR: SECRETS_DIR,
        // Without a sandbox the job sees the host's paths.
        TREADMILL_RESULTS_DIR: this.isolation.mode === "none" ? resultsDir : RESULTS_DIR,
        TREADMILL_ARTIFACTS_DIR: this.isolation.mode === "none" ? join(rootfs, ARTIFACTS_DIR) : ARTIFACTS_DIR,
        TREADMILL_INPUTS_DIR: this.isolation.mode === "none" ? join(rootfs, INPUTS_DIR) : INPUTS_DIR,
      };
      await mkdirsInside(rootfs, ARTIFACTS_DIR.slice(1), owner);
      // Inputs are the supervisor's to write: the job reads them.
      await mkdirsInside(rootfs, INPUTS_DIR.slice(1), undefined);
      for (const p of spec.parameters) {
        env[parameterEnvName(p.name)] = p.value;
        if (!p.secret) continue;
        if (!/^[A-Za-z_][A-Za-z0-9_]{0,63}$/.test(p.name)) throw new DriverError("internal", "secret parameter name is malformed");
        const fh = await open(
          join(secretsDir, p.name),
          constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
          0o600,
        );
        try {
          await fh.writeFile(p.value);
          await fh.chown(uid, gid);
        } finally {
          await fh.close();
        }
      }
      log.info(
        { durationMs: Math.round(performance.now() - started), layers: layers.length, spare: spare !== undefined },
        "work directory built",
      );
      throwIfAborted(signal);
      const prepared: ProcessPrepared = {
        kind: "process",
        ...hold,
        jobDir,
        rootfs,
        layers,
        argv,
        env,
        // `console` is the console's own name (declared with port 0 at most).
        exposedPorts: (spec.exposedPorts ?? []).filter((p) => p.name !== "console" && p.port > 0),
        holdOnFailure: spec.holdOnFailure === true,
      };
      this.pool.add(prepared);
      return prepared;
    } catch (err) {
      return this.pool.abandon(slot, jobDir, err, log);
    }
  }

  resultsDir(job: Prepared | RunningJob): string {
    const prepared = ("prepared" in job ? job.prepared : job) as ProcessPrepared;
    return join(prepared.rootfs, RESULTS_DIR.slice(1));
  }

  async start(handle: Prepared, output: JobOutput): Promise<RunningJob> {
    const prepared = handle as ProcessPrepared;
    if (prepared.running !== undefined) return prepared.running;
    if (prepared.cleaned !== undefined) throw new DriverError("internal", "job was already cleaned up");
    const job = await this.launch(prepared, prepared.argv, output, "workload");
    prepared.running = job;
    return job;
  }

  /**
   * A held job's post-mortem shell (Driver's head comment): the image's
   * /bin/sh, interactive on the job's console, in the job's own files and
   * sandbox, until `stop`. Undefined when it cannot start (no shell in the
   * image): the job is then not held.
   */
  private async hold(job: ProcessJob, exit: JobExit, output: JobOutput): Promise<ProcessJob | undefined> {
    const say = (message: string) => output.write("supervisor", Buffer.from(`${message}\n`));
    const banner = `treadmill: job held after its workload failed (${exit.message}); this shell runs in its files`;
    const argv = ["/bin/sh", "-c", `echo ${shellQuote(banner)}; exec /bin/sh -i 2>&1`];
    try {
      const shell = await this.launch(job.prepared, argv, output, "post-mortem shell");
      say("job held: a shell in the job's files is on its console until the hold ends");
      return shell;
    } catch (err) {
      this.logger.warn({ err, jobId: job.jobId, attempt: job.attempt }, "cannot start a held job's shell");
      say("job not held: no shell could be started in the job's files");
      return undefined;
    }
  }

  /** Starts `argv` in the job's sandbox with its console and exposed ports: the workload, or a held job's shell. */
  private async launch(prepared: ProcessPrepared, argv: string[], output: JobOutput, what: "workload" | "post-mortem shell"): Promise<ProcessJob> {
    const log = this.logger.child({ jobId: prepared.jobId, attempt: prepared.attempt, slot: prepared.slot, what });
    const say = (message: string) => output.write("supervisor", Buffer.from(`${message}\n`));
    const iso = this.isolation;
    // Short names: the sockets' paths must fit a sun_path.
    const tag = createHash("sha256").update(`${prepared.jobId}.${prepared.attempt}`).digest("hex").slice(0, 16);

    // Console input goes to script's stdin, which script copies to the pty.
    const input: { stdin?: Writable } = {};
    const bridge = await ConsoleBridge.listen({
      path: join(this.socketDir.path, `${tag}-console.sock`),
      logger: log,
      onInput: (bytes) => {
        if (input.stdin?.writable) input.stdin.write(bytes);
      },
    });
    const command = sandboxCommand(iso, this.tools, { rootfs: prepared.rootfs, argv, uid: prepared.uid, gid: prepared.gid });
    // script(1) puts the command on a new pseudo-terminal; -e passes the exit code.
    // In chroot mode script must start as root (unshare and chroot need it) and the uid is dropped inside.
    const asUid = iso.switchUid && iso.mode === "bwrap";
    const [program, args] = dieWithSupervisor(this.tools.setpriv, this.tools.script, ["-qfec", command, "/dev/null"]);
    const child: ChildProcess = spawn(program, args, {
      cwd: iso.mode === "none" ? prepared.rootfs : prepared.jobDir,
      env: { ...prepared.env, SHELL: "/bin/sh" },
      stdio: ["pipe", "pipe", "pipe", "pipe", "pipe"],
      detached: true,
      ...(asUid ? { uid: prepared.uid, gid: prepared.gid } : {}),
    });
    const state: ProcessJob["state"] = { phase: "starting", stopRequested: false };
    const control: ProcessJob["control"] = { killed: false };
    const stdout = child.stdout as Readable;
    const stderr = child.stderr as Readable;
    const fd3 = child.stdio[3] as Readable;
    const fd4 = child.stdio[4] as Readable;
    const stdin = child.stdin as Writable;
    input.stdin = stdin;
    stdin.on("error", () => undefined); // EPIPE once the workload has gone.
    stdout.on("data", (bytes: Buffer) => {
      output.write("console", bytes);
      bridge.write(bytes);
    });
    let stderrTail = "";
    fd3.on("data", (bytes: Buffer) => {
      output.write("stderr", bytes);
      stderrTail = (stderrTail + bytes.toString("utf8")).slice(-1000);
    });
    stderr.on("data", (bytes: Buffer) => output.write("supervisor", bytes));
    // The sandbox's reports: its namespace's init at the start, the workload's exit at the end.
    const status: SandboxStatus = {};
    let statusText = "";
    let sandboxUp: (pid: number) => void = () => undefined;
    const upReported = new Promise<number>((resolve) => (sandboxUp = resolve));
    fd4.on("data", (bytes: Buffer) => {
      statusText += bytes.toString("utf8");
      const complete = statusText.slice(0, statusText.lastIndexOf("\n") + 1);
      statusText = statusText.slice(complete.length);
      readStatusLines(complete, status);
      if (status.childPid !== undefined) sandboxUp(status.childPid);
    });
    const statusDone = new Promise<void>((resolve) => fd4.once("close", () => resolve()));

    const spawned = new Promise<void>((resolve, reject) => {
      child.once("spawn", resolve);
      child.once("error", reject);
    });
    const exitEvent = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      child.once("exit", (code, signal) => resolve({ code, signal })),
    );
    const closeEvent = new Promise<void>((resolve) => child.once("close", () => resolve()));

    try {
      await spawned;
    } catch (err) {
      await bridge.close();
      log.error({ err }, "job start failed");
      throw new DriverError("start", "the job's sandbox could not be started", { cause: err });
    }
    // Wait for the sandbox to stand: it reports its namespace, or dies trying.
    let timer: NodeJS.Timeout | undefined;
    const up = await Promise.race([
      upReported,
      exitEvent.then(() => "exited" as const),
      new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), SANDBOX_UP_MS))),
    ]);
    clearTimeout(timer);
    if (up === "exited" && status.childPid === undefined) {
      // Its report may still be in the pipe: read to the end.
      await Promise.race([statusDone, new Promise((resolve) => (timer = setTimeout(resolve, 2000)))]);
      clearTimeout(timer);
    }
    // A job quick enough to be gone already has no processes left to find.
    let processes = status.childPid === undefined ? undefined : await JobProcesses.of(iso.mode, status.childPid);
    if (up === "timeout" || status.childPid === undefined) {
      try {
        process.kill(-child.pid!, "SIGKILL");
      } catch {
        // Gone already.
      }
      await closeEvent;
      await bridge.close();
      const why = stderrTail.trim().split("\n").pop() ?? "";
      log.error({ outcome: up, why }, "job sandbox did not start");
      throw new DriverError("start", `the job's sandbox did not start${why === "" ? "" : `: ${why.slice(0, 300)}`}`);
    }
    state.phase = "running";

    // Exposed ports: inside the job's own network namespace, through a relay each.
    const relays: Relay[] = [];
    let netns: FileHandle | undefined;
    if (iso.network === "isolated" && this.tools.nsenter !== undefined && processes !== undefined && prepared.exposedPorts.length > 0) {
      // Undefined when the job is gone already (its namespace with it).
      const opened = await open(`/proc/${processes.leader}/ns/net`, "r").catch(() => undefined);
      netns = opened;
      const tools = { setpriv: this.tools.setpriv, nsenter: this.tools.nsenter, socat: this.tools.socat ?? "socat" };
      if (opened !== undefined) {
        for (const p of prepared.exposedPorts) {
          const path = join(this.socketDir.path, `${tag}-port-${p.name}.sock`);
          relays.push(startRelay({ netnsFd: opened.fd, path, port: p.port, tools, logger: log }));
        }
      }
    }
    let exposed: Exposure[] = [
      { name: "console", kind: "console", path: bridge.path },
      ...prepared.exposedPorts.map((p, i): Exposure => {
        const description = `port ${p.port} in the job`;
        if (iso.network === "host") {
          return { name: p.name, kind: "tcp", description, host: "127.0.0.1", port: p.port, check: () => this.checkHostPort(processes, prepared.uid, p.port) };
        }
        const relay = relays[i];
        const path = relay?.path ?? join(this.socketDir.path, `${tag}-port-${p.name}.sock`);
        const refusal = this.tools.nsenter === undefined ? NO_RELAYS : "the job has ended";
        const check = relay !== undefined ? () => this.checkIsolatedPort(processes, p.port, relay) : () => Promise.reject(new ExposureDenied(refusal));
        return { name: p.name, kind: "tcp", description, path, check };
      }),
    ];
    log.info(
      { pid: child.pid, uid: prepared.uid, sandbox: iso.mode, network: iso.network, namespaceInit: processes?.leader, console: bridge.path },
      "job started",
    );
    say(`started in sandbox ${iso.mode} as uid ${prepared.uid}, network ${iso.network}`);
    if (prepared.exposedPorts.length > 0 && iso.network === "isolated" && this.tools.nsenter === undefined) say(NO_RELAYS);

    /** Settles once the job's processes are all gone, with how it ended (and, when it is held, once its shell is up). */
    const ended = async (): Promise<JobExit> => {
      const { code, signal } = await exitEvent;
      // The sandbox's outer process is gone; whatever of the job is still
      // around (its namespace, when the sandbox was killed from outside) goes now.
      if (processes !== undefined && !(await processes.end())) log.error("job processes survived sigkill");
      processes = undefined;
      for (const relay of relays) relay.stop();
      await netns?.close();
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([Promise.all([closeEvent, statusDone]), new Promise((resolve) => (timer = setTimeout(resolve, 2000)))]);
      clearTimeout(timer);
      readStatusLines(statusText, status);
      for (const s of [stdout, stderr, fd3, fd4]) s.destroy();
      stdin.destroy();
      exposed = [];
      await bridge.close();
      state.phase = "exited";
      const exit = this.exitOf(state.stopRequested, control.killed, { code, signal }, status);
      say(what === "workload" ? exit.message : `${what} ended`);
      log.info({ exitCode: exit.exitCode, signal: exit.signal, stopped: exit.stopped, outside: exit.failure !== undefined }, "job exited");
      if (what === "workload" && prepared.holdOnFailure && exit.status === "failure" && !exit.stopped && exit.failure === undefined) {
        job.held = await this.hold(job, exit, output);
        // A stop that came while the shell started ends the hold at once.
        if (state.stopRequested && job.held !== undefined) await this.stop(job.held, { graceMs: 0 });
      }
      return exit;
    };

    const job: ProcessJob = {
      kind: "process",
      jobId: prepared.jobId,
      attempt: prepared.attempt,
      prepared,
      child,
      state,
      control,
      processes: () => job.held?.processes() ?? processes,
      status: () => (job.held === undefined ? state.phase : job.held.status() === "exited" ? "exited" : "held"),
      exposures: () => job.held?.exposures() ?? exposed,
      writeConsole: (bytes) => {
        if (job.held !== undefined) job.held.writeConsole(bytes);
        else if (stdin.writable) stdin.write(bytes);
      },
      exited: ended(),
    };
    return job;
  }

  /**
   * How the job ended. The sandbox reports the workload's exit code (128+N
   * for a signal N, as a shell does); a sandbox that ended without that
   * report, or whose outer process was killed by a signal this driver did
   * not send, was killed from outside the job: a host failure, not the
   * workload's (the job's own processes cannot reach those processes).
   */
  private exitOf(stopped: boolean, killed: boolean, script: { code: number | null; signal: NodeJS.Signals | null }, status: SandboxStatus): JobExit {
    const code = this.isolation.mode === "none" ? (script.signal === null ? script.code : null) : (status.exitCode ?? null);
    if (killed) {
      return { exitCode: null, signal: "SIGKILL", status: "failure", stopped, message: "workload killed by SIGKILL (stopped, grace period over)" };
    }
    if (code === null) {
      const how = script.signal !== null ? `by ${script.signal}` : "without reporting the workload's exit";
      const message = `the job's sandbox was killed ${how}, from outside the job (not by this supervisor)`;
      return {
        exitCode: null,
        ...(script.signal !== null ? { signal: script.signal } : {}),
        status: "failure",
        stopped,
        message,
        ...(stopped ? {} : { failure: new DriverError("internal", message) }),
      };
    }
    const message = stopped ? `workload stopped (exit code ${code})` : `workload exited with code ${code}`;
    return { exitCode: code, status: code === 0 && !stopped ? "success" : "failure", stopped, message };
  }

  /** A dial of an isolated job's port: allowed once something of the job listens on it (in its own namespace). */
  private async checkIsolatedPort(processes: JobProcesses | undefined, port: number, relay: Relay): Promise<void> {
    if (processes === undefined) throw new ExposureDenied("the job has ended");
    const listeners = await listenersOf(processes.leader);
    if (!listeners.some((l) => l.port === port && l.onLoopback)) {
      throw new ExposureDenied(`nothing of the job listens on port ${port} (on 127.0.0.1 or any address)`);
    }
    await relay.ready;
  }

  /**
   * A dial of a port on the host's network (`--job-network host`, or `none`
   * mode): allowed only when the listener belongs to the job (a socket of
   * its slot's uid; in `none` mode, held by one of its processes). Anything
   * else on that port is the host's or another job's.
   */
  private async checkHostPort(processes: JobProcesses | undefined, uid: number, port: number): Promise<void> {
    if (processes === undefined) throw new ExposureDenied("the job has ended");
    const listeners = (await listenersOf("self")).filter((l) => l.port === port && l.onLoopback);
    const inodes = this.isolation.switchUid ? undefined : await socketInodesOf(await processes.members());
    const own = listeners.filter((l) => (inodes === undefined ? l.uid === uid : inodes.has(l.inode)));
    if (own.length === 0) {
      throw new ExposureDenied(
        listeners.length > 0 ? `port ${port} on this host belongs to something other than the job` : `nothing of the job listens on port ${port}`,
      );
    }
  }

  /**
   * SIGHUP to every process of the job at once (a shell ignores SIGTERM but
   * not a hangup), SIGTERM after min(1 s, graceMs / 2), SIGKILL of the whole
   * job (its namespace's init) at graceMs. Resolves once the job has exited.
   */
  stop(handle: RunningJob, options: StopOptions = {}): Promise<void> {
    const job = handle as ProcessJob;
    // A held job's stop ends its hold: its shell.
    if (job.held !== undefined) return this.stop(job.held, options);
    const graceMs = options.graceMs ?? this.graceMs;
    const termAfterMs = Math.min(1000, graceMs / 2);
    return this.pool.stop(job, graceMs, async (log, within) => {
      const processes = job.processes();
      if (processes === undefined) return; // Exiting already.
      await processes.signal("SIGHUP");
      if (await within(termAfterMs)) return;
      await processes.signal("SIGTERM");
      if (await within(graceMs - termAfterMs)) return;
      log.info("grace period over, killing job");
      job.control.killed = true;
      await processes.kill();
    });
  }

  async snapshot(handle: RunningJob, options: { outFile: string }): Promise<SnapshotLayer> {
    const prepared = (handle as ProcessJob).prepared;
    if (prepared.cleaned !== undefined) throw new DriverError("internal", "job was already cleaned up");
    const started = performance.now();
    const layer = await snapshotRootfs(prepared.layers, prepared.rootfs, options.outFile, [SECRETS_DIR.slice(1), ARTIFACTS_DIR.slice(1), INPUTS_DIR.slice(1)]);
    this.logger.info(
      { jobId: prepared.jobId, attempt: prepared.attempt, digest: layer.digest, size: layer.size, durationMs: Math.round(performance.now() - started) },
      "job snapshot written",
    );
    return layer;
  }

  jobFiles(handle: Prepared | RunningJob): JobFiles {
    const prepared = ("prepared" in handle ? handle.prepared : handle) as ProcessPrepared;
    return { root: prepared.rootfs, artifacts: ARTIFACTS_DIR.slice(1), inputs: INPUTS_DIR.slice(1) };
  }

  cleanup(handle: Prepared | RunningJob): Promise<void> {
    return this.pool.cleanup(handle);
  }

  async close(): Promise<void> {
    await this.pool.close();
    await Promise.all([...this.spares.keys()].map((slot) => this.takeSpare(slot, [])));
    await this.socketDir.remove();
    await releaseJobsBase(this.jobsDir);
  }

  /** Starts building a fresh root of `layers` for the slot's next job, in the background. */
  private buildSpare(slot: number, layers: UnpackedLayer[], owner: { uid: number; gid: number }): void {
    if (this.pool.closed || this.spares.has(slot)) return;
    const dir = join(this.jobsDir, "spares", `${slot}-${randomBytes(6).toString("hex")}`);
    const ready = buildRoot(layers, dir, owner).then(
      () => dir,
      async (err: unknown) => {
        this.logger.warn({ err, slot }, "cannot build a spare job root; the next job builds its own");
        await rm(dir, { recursive: true, force: true }).catch(() => undefined);
        return undefined;
      },
    );
    this.spares.set(slot, { layers: layerKey(layers), ready });
  }

  /**
   * The slot's spare root if it was built from `layers` (waiting for it when
   * it is still being built); a spare of other layers is removed.
   */
  private async takeSpare(slot: number, layers: UnpackedLayer[]): Promise<string | undefined> {
    const spare = this.spares.get(slot);
    if (spare === undefined) return undefined;
    this.spares.delete(slot);
    const dir = await spare.ready;
    if (dir === undefined) return undefined;
    if (spare.layers === layerKey(layers)) return dir;
    await rm(dir, { recursive: true, force: true });
    return undefined;
  }
}

/** Creates a process driver (see `ProcessDriverOptions`). */
export function createProcessDriver(options: ProcessDriverOptions): Promise<ProcessDriver> {
  return ProcessDriver.create(options);
}
