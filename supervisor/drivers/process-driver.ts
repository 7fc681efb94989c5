/**
 * The `process` driver (DESIGN.md §9): a job is a process tree run from the
 * image's unpacked rootfs layers, in a fresh work directory, under its slot's
 * own uid and (where the host has it) bubblewrap. Its stdin/stdout are on a
 * pseudo-terminal (the console, also bridged to a host-local TCP port), its
 * stderr is a pipe.
 *
 * Files (`workDir`):
 *
 *   workDir/            0711 root   (traversable, not listable)
 *     layers/           0700 root   unpacked layers, one per digest (rootfs.ts)
 *     spares/           0700 root   per slot, a fresh root built ahead for its next job
 *     jobs/             0711 root
 *       <job>.<attempt> 0700 slot   one job's directory, removed by cleanup
 *         rootfs/              the job's root, owned by the slot's uid
 *           run/treadmill/secrets/  0700, one 0600 file per secret parameter
 *
 * A job can therefore read neither another job's directory (another uid,
 * mode 0700) nor the layer cache nor the supervisor's own files.
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
import { randomBytes } from "node:crypto";
import { access, chmod, chown, lstat, mkdir, open, rename, rm, stat } from "node:fs/promises";
import { delimiter, dirname, join, resolve } from "node:path";
import type { Readable, Writable } from "node:stream";
import type { Logger } from "../../lib/logger.js";
import { ConsoleBridge } from "./console.js";
import {
  DriverError,
  ENTRYPOINT_ANNOTATION,
  parameterEnvName,
  throwIfAborted,
  type Driver,
  type Exposure,
  type ExposedPortSpec,
  type JobExit,
  type JobOutput,
  type JobSpecForDriver,
  type Prepared,
  type PrepareOptions,
  type RunningJob,
  type SnapshotLayer,
  type StopOptions,
} from "./driver.js";
import { composeRootfs, LayerCache, snapshotRootfs, type UnpackedLayer } from "./rootfs.js";
import {
  detectIsolation,
  killAllOfUid,
  processesOfUid,
  sandboxCommand,
  signalAll,
  type Isolation,
  type SandboxMode,
} from "./sandbox.js";
import { makeJobDir, SlotPool, type SlotJob, type SlotPrepared } from "./slots.js";

export interface ProcessDriverOptions {
  /** Where layers and job directories live (created 0711; every ancestor must be traversable by others). */
  workDir: string;
  /** Jobs at once; each slot has its own uid. Default 1. */
  slots?: number;
  /**
   * Uid (and gid) of slot 0; slot N uses `slotUidBase + N`. These uids must
   * run nothing else on the host: the driver kills every process they own
   * when a job ends. Give each supervisor on one machine its own range.
   * Default 61000.
   */
  slotUidBase?: number;
  /** Isolation to use; `auto` (default) picks bubblewrap when it works. */
  sandbox?: "auto" | SandboxMode;
  /** Default time between SIGTERM and SIGKILL on stop. Default 10000. */
  graceMs?: number;
  logger: Logger;
}

/** Where secret parameters appear inside the job (one 0600 file per parameter). */
export const SECRETS_DIR = "/run/treadmill/secrets";
const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

interface ProcessPrepared extends SlotPrepared {
  readonly kind: "process";
  readonly rootfs: string;
  readonly layers: UnpackedLayer[];
  readonly argv: string[];
  readonly env: Record<string, string>;
  readonly exposedPorts: ExposedPortSpec[];
  running?: ProcessJob;
}

interface ProcessJob extends SlotJob<ProcessPrepared> {
  readonly kind: "process";
}

/** Finds `name` on the supervisor's PATH (the job's PATH is the image's, not ours). */
async function which(name: string): Promise<string | undefined> {
  for (const dir of (process.env.PATH ?? DEFAULT_PATH).split(delimiter)) {
    const candidate = join(dir, name);
    try {
      await access(candidate, constants.X_OK);
      return candidate;
    } catch {
      // Not here.
    }
  }
  return undefined;
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
  /** Slots whose uid was checked to run nothing since their last job ended (no /proc scan needed). */
  private readonly idleChecked = new Set<number>();

  private constructor(
    private readonly workDir: string,
    private readonly isolation: Isolation,
    private readonly cache: LayerCache,
    private readonly tools: { script: string; wrapper: string | undefined },
    private readonly logger: Logger,
    options: ProcessDriverOptions,
  ) {
    this.pool = new SlotPool<ProcessPrepared>({
      names: { driver: "process", slot: "process", job: "job" },
      slots: options.slots ?? 1,
      uidBase: options.slotUidBase ?? 61000,
      switchUid: isolation.switchUid,
      logger,
      stop: (job, stopOptions) => this.stop(job, stopOptions),
      onFree: (prepared) => {
        if (isolation.switchUid) this.idleChecked.add(prepared.slot);
        this.buildSpare(prepared.slot, prepared.layers, { uid: prepared.uid, gid: prepared.gid });
      },
    });
    this.capacity = this.pool.capacity;
    this.graceMs = options.graceMs ?? 10000;
  }

  /** Checks the host, creates the directories and picks the isolation mode (logging a warning when weak). */
  static async create(options: ProcessDriverOptions): Promise<ProcessDriver> {
    const logger = options.logger.child({ driver: "process" });
    // Absolute: the sandbox and the job's processes run in other directories.
    const workDir = resolve(options.workDir);
    await mkdir(join(workDir, "jobs"), { recursive: true });
    await chmod(workDir, 0o711);
    await chmod(join(workDir, "jobs"), 0o711);
    const script = await which("script");
    if (script === undefined) throw new Error("the process driver needs script(1) (util-linux) on PATH");
    const isolation = await detectIsolation(options.sandbox ?? "auto", options.slotUidBase ?? 61000, logger);
    if (isolation.switchUid) {
      // The slot's uid must be able to reach its own directory.
      for (let dir = workDir; dir !== dirname(dir); dir = dirname(dir)) {
        const st = await stat(dir);
        if ((st.mode & 0o001) === 0) {
          throw new Error(`work directory ancestor ${dir} is not traversable by other users (needs o+x)`);
        }
      }
    }
    const wrapper = isolation.mode === "bwrap" ? await which("bwrap") : isolation.mode === "chroot" ? await which("setpriv") : undefined;
    const cache = new LayerCache(join(workDir, "layers"), logger);
    await cache.init();
    // Job directories and spares of a previous run are stale: their jobs are gone.
    await rm(join(workDir, "jobs"), { recursive: true, force: true });
    await mkdir(join(workDir, "jobs"), { mode: 0o711 });
    await chmod(join(workDir, "jobs"), 0o711);
    await rm(join(workDir, "spares"), { recursive: true, force: true });
    await mkdir(join(workDir, "spares"), { mode: 0o700 });
    await chmod(join(workDir, "spares"), 0o700);
    logger.info({ sandbox: isolation.mode, switchUid: isolation.switchUid, slots: options.slots ?? 1 }, "process driver ready");
    return new ProcessDriver(workDir, isolation, cache, { script, wrapper }, logger, options);
  }

  /** The isolation in use (for the supervisor's own status and for tests). */
  get sandbox(): Isolation {
    return this.isolation;
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
    const jobDir = join(this.workDir, "jobs", key);
    try {
      // A slot whose last job's end was checked to leave nothing of its uid
      // behind needs no scan of /proc: nothing can have started as it since.
      if (!this.idleChecked.delete(slot)) await this.pool.sweep(uid);
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
      const env: Record<string, string> = {
        PATH: DEFAULT_PATH,
        HOME: "/tmp",
        TERM: "xterm",
        ...spec.env,
        TREADMILL_JOB_ID: spec.jobId,
        TREADMILL_ATTEMPT: String(spec.attempt),
        TREADMILL_SECRETS_DIR: SECRETS_DIR,
      };
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
        exposedPorts: spec.exposedPorts ?? [],
      };
      this.pool.add(prepared);
      return prepared;
    } catch (err) {
      return this.pool.abandon(slot, jobDir, err, log);
    }
  }

  async start(handle: Prepared, output: JobOutput): Promise<RunningJob> {
    const prepared = handle as ProcessPrepared;
    if (prepared.running !== undefined) return prepared.running;
    if (prepared.cleaned !== undefined) throw new DriverError("internal", "job was already cleaned up");
    const log = this.logger.child({ jobId: prepared.jobId, attempt: prepared.attempt, slot: prepared.slot });
    const say = (message: string) => output.write("supervisor", Buffer.from(`${message}\n`));

    // Console input goes to script's stdin, which script copies to the pty.
    const input: { stdin?: Writable } = {};
    const bridge = await ConsoleBridge.listen({
      logger: log,
      onInput: (bytes) => {
        if (input.stdin?.writable) input.stdin.write(bytes);
      },
    });
    const command = sandboxCommand(this.isolation, {
      rootfs: prepared.rootfs,
      argv: prepared.argv,
      uid: prepared.uid,
      gid: prepared.gid,
      shareNet: prepared.exposedPorts.length > 0,
    });
    const wrapped = this.tools.wrapper === undefined ? command : command.replace(/^exec (bwrap|setpriv) /, `exec ${this.tools.wrapper} `);
    // script(1) puts the command on a new pseudo-terminal; -e passes the exit code.
    // In chroot mode script must start as root (chroot needs it) and drops to the uid itself.
    const asUid = this.isolation.switchUid && this.isolation.mode === "bwrap";
    const child: ChildProcess = spawn(this.tools.script, ["-qfec", wrapped, "/dev/null"], {
      cwd: this.isolation.mode === "none" ? prepared.rootfs : prepared.jobDir,
      env: { ...prepared.env, SHELL: "/bin/sh" },
      stdio: ["pipe", "pipe", "pipe", "pipe"],
      detached: true,
      ...(asUid ? { uid: prepared.uid, gid: prepared.gid } : {}),
    });
    const state: ProcessJob["state"] = { phase: "starting", stopRequested: false };
    let exposed: Exposure[] = [
      { name: "console", host: "127.0.0.1", port: bridge.port, kind: "console" },
      ...prepared.exposedPorts.map((p): Exposure => ({ name: p.name, host: "127.0.0.1", port: p.port, kind: "tcp" })),
    ];
    const stdout = child.stdout as Readable;
    const stderr = child.stderr as Readable;
    const fd3 = child.stdio[3] as Readable;
    const stdin = child.stdin as Writable;
    input.stdin = stdin;
    stdin.on("error", () => undefined); // EPIPE once the workload has gone.
    stdout.on("data", (bytes: Buffer) => {
      output.write("console", bytes);
      bridge.write(bytes);
    });
    fd3.on("data", (bytes: Buffer) => output.write("stderr", bytes));
    stderr.on("data", (bytes: Buffer) => output.write("supervisor", bytes));

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
    state.phase = "running";
    log.info({ pid: child.pid, uid: prepared.uid, sandbox: this.isolation.mode, consolePort: bridge.port }, "job started");
    say(`started in sandbox ${this.isolation.mode} as uid ${prepared.uid}; console on 127.0.0.1:${bridge.port}`);

    const job: ProcessJob = {
      kind: "process",
      jobId: prepared.jobId,
      attempt: prepared.attempt,
      prepared,
      child,
      state,
      status: () => state.phase,
      exposures: () => exposed,
      writeConsole: (bytes) => {
        if (stdin.writable) stdin.write(bytes);
      },
      exited: (async (): Promise<JobExit> => {
        const { code, signal } = await exitEvent;
        // The wrapper is gone; whatever of the job is still around (a daemon
        // that left the session in chroot mode) goes now.
        if (this.isolation.switchUid) {
          const left = await killAllOfUid(prepared.uid);
          if (left.length > 0) log.error({ pids: left }, "job processes survived sigkill");
        } else {
          try {
            process.kill(-child.pid!, "SIGKILL");
          } catch {
            // The group is empty.
          }
        }
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([closeEvent, new Promise((resolve) => (timer = setTimeout(resolve, 2000)))]);
        clearTimeout(timer);
        for (const s of [stdout, stderr, fd3]) s.destroy();
        stdin.destroy();
        exposed = [];
        await bridge.close();
        state.phase = "exited";
        const stopped = state.stopRequested;
        const status = code === 0 && !stopped ? "success" : "failure";
        const message =
          signal !== null
            ? `workload killed by ${signal}`
            : stopped
              ? `workload stopped (exit code ${code})`
              : `workload exited with code ${code}`;
        say(message);
        log.info({ exitCode: code, signal, stopped }, "job exited");
        return { exitCode: signal !== null ? null : code, ...(signal !== null ? { signal } : {}), status, stopped, message };
      })(),
    };
    prepared.running = job;
    return job;
  }

  stop(handle: RunningJob, options: StopOptions = {}): Promise<void> {
    const job = handle as ProcessJob;
    const prepared = job.prepared;
    const scriptPid = job.child.pid!;
    const graceMs = options.graceMs ?? this.graceMs;
    return this.pool.stop(job, graceMs, async (log) => {
      if (this.isolation.switchUid) {
        // SIGTERM the workload's processes, not its wrappers: killing script
        // or the outer bwrap would take the namespace down at once, and the
        // namespace's init (pid 1 inside) ignores SIGTERM anyway.
        const procs = await processesOfUid(prepared.uid);
        const targets = procs.filter(
          (p) =>
            p.pid !== scriptPid &&
            !(this.isolation.mode === "bwrap" && p.ppid === scriptPid) &&
            !(p.nspid.length > 1 && p.nspid[p.nspid.length - 1] === 1),
        );
        signalAll(
          targets.map((p) => p.pid),
          "SIGTERM",
        );
      } else {
        try {
          process.kill(-scriptPid, "SIGTERM");
        } catch {
          // Gone already.
        }
      }
      let timer: NodeJS.Timeout | undefined;
      const graceOver = new Promise<"grace">((resolve) => (timer = setTimeout(() => resolve("grace"), graceMs)));
      const first = await Promise.race([job.exited.then(() => "exited" as const), graceOver]);
      clearTimeout(timer);
      if (first === "grace") {
        log.info("grace period over, killing job");
        if (this.isolation.switchUid) {
          signalAll(
            (await processesOfUid(prepared.uid)).map((p) => p.pid),
            "SIGKILL",
          );
        }
        try {
          process.kill(-scriptPid, "SIGKILL");
        } catch {
          // Gone already.
        }
      }
    });
  }

  async snapshot(handle: RunningJob, options: { outFile: string }): Promise<SnapshotLayer> {
    const prepared = (handle as ProcessJob).prepared;
    if (prepared.cleaned !== undefined) throw new DriverError("internal", "job was already cleaned up");
    const started = performance.now();
    const layer = await snapshotRootfs(prepared.layers, prepared.rootfs, options.outFile, [SECRETS_DIR.slice(1)]);
    this.logger.info(
      { jobId: prepared.jobId, attempt: prepared.attempt, digest: layer.digest, size: layer.size, durationMs: Math.round(performance.now() - started) },
      "job snapshot written",
    );
    return layer;
  }

  cleanup(handle: Prepared | RunningJob): Promise<void> {
    return this.pool.cleanup(handle);
  }

  async close(): Promise<void> {
    await this.pool.close();
    await Promise.all([...this.spares.keys()].map((slot) => this.takeSpare(slot, [])));
  }

  /** Starts building a fresh root of `layers` for the slot's next job, in the background. */
  private buildSpare(slot: number, layers: UnpackedLayer[], owner: { uid: number; gid: number }): void {
    if (this.pool.closed || this.spares.has(slot)) return;
    const dir = join(this.workDir, "spares", `${slot}-${randomBytes(6).toString("hex")}`);
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
