/**
 * The `qemu` driver (DESIGN.md §9, docs/qemu.md): a job is a virtual machine
 * booted from a VM image whose disk layers are read in place where the site
 * cache keeps them, under a fresh copy-on-write overlay made for every job.
 *
 * Files (`workDir`, every path absolute):
 *
 *   workDir/              0711 root
 *     jobs/               0711 root
 *       <hash of job>/    0700 slot uid   one job attempt, removed by cleanup
 *         overlay.qcow2   the only disk QEMU writes; backing: the image's top layer
 *         parameters.sh   0600, the job's parameters (fw_cfg opt/treadmill/parameters)
 *         console.sock    serial console (QEMU's unix socket chardev)
 *         console.log     every console byte (chardev logfile=), shipped as `console`
 *         qmp.sock        QMP
 *
 *   socketDir/            0700 root   (machine.ts) per job: the console bridge, a relay per forward
 *
 * QEMU runs with the job directory as its working directory, under the slot's
 * own uid when the supervisor is root, with its seccomp sandbox, in a network
 * namespace of its own (`unshare --net`, loopback only) with restricted user
 * networking: the guest reaches nothing of the host (not 10.0.2.2, not the
 * host's loopback, not the outside), and its forwarded ports listen on the
 * loopback of QEMU's namespace, reached through relays the supervisor runs
 * there (sandbox.ts `startRelay`) on Unix sockets of its own. Without root
 * (development) QEMU stays in the host's network: the guest is still
 * restricted, but the forwards listen on the host's loopback. With
 * `--job-network host` the guest has slirp's full network. Cached blobs
 * are opened read-only (`-blockdev` nodes with `read-only` and no locking) and
 * never written: the chain is stated to QEMU node by node, so the backing
 * names stored inside the blobs (digests) are never followed.
 *
 * Life of a job: prepare = plan the chain and create the overlay
 * (`allocating`); start = launch QEMU (`booting`), connect QMP and the
 * console, wait for the readiness pattern (or not), then `running`. The
 * workload ends when the exit pattern appears on the console (then QEMU is
 * given a moment to power off and is quit) or when QEMU exits (its exit code,
 * decoded from `isa-debug-exit` when enabled). Stop = ACPI power-down (QMP
 * `system_powerdown`), the grace period, then QMP `quit`, then SIGKILL.
 *
 * Host control (issue #21) through QMP, QEMU kept running so that the
 * console, its log, the forwards and the overlay stay as they are: reset =
 * `system_reset` (reboots let through `-no-reboot` until the guest prints again); power off = `stop` then `system_reset` (the VM halted,
 * reset to its power-on state); power on = `cont` (it boots afresh); power
 * cycle = all three. Busybox init ignores ACPI power-down (FACTS.md), so no
 * action waits on the guest.
 */

import { execFile, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { chmod, chown, copyFile, mkdir, open, rm, stat, writeFile, type FileHandle } from "node:fs/promises";
import { connect, createServer, type AddressInfo, type Socket } from "node:net";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import type { Logger } from "../../lib/logger.js";
import { ConsoleBridge } from "./console.js";
import { QCOW2_MEDIA_TYPE } from "../../lib/image/media-types.js";
import {
  ControlRefused,
  DriverAbortError,
  DriverError,
  parameterEnvName,
  type HostAction,
  throwIfAborted,
  type Driver,
  type Exposure,
  type ExposedPortSpec,
  type JobExit,
  type JobOutput,
  type JobParameter,
  type JobSpecForDriver,
  type Prepared,
  type PrepareOptions,
  type RunningJob,
  type SnapshotLayer,
  type StopOptions,
} from "./driver.js";
import { exitCodeOfQemu, parameterScript, qemuArgs, type QemuLaunch } from "./qemu-args.js";
import { LOWER_ANNOTATION, planVmImage, type VmPlan } from "./qemu-image.js";
import { QmpClient } from "./qemu-qmp.js";
import { jobsBase, MAX_SOCKET_PATH, releaseJobsBase, socketDirectory, type SlotClaim, type SocketDirectory } from "./machine.js";
import { dieWithSupervisor, requireTools, shellQuote, startRelay, type JobNetwork, type Relay } from "./sandbox.js";
import { claimSlotUids, makeJobDir, SlotPool, type SlotJob, type SlotPrepared } from "./slots.js";

const execFileAsync = promisify(execFile);

export interface QemuDriverOptions {
  /** Where job directories live (made absolute; every ancestor must be traversable by the slot uids). */
  workDir: string;
  /** VMs at once; each slot has its own uid. Default 1. */
  slots?: number;
  /**
   * Uid (and gid) of slot 0 when the supervisor is root; slot N uses
   * `slotUidBase + N`, claimed machine-wide (machine.ts). `auto` (default):
   * the first free range.
   */
  slotUidBase?: number | "auto";
  /** `isolated` (default): QEMU in its own network namespace, the guest restricted; `host`: slirp's full network (unsafe). */
  network?: JobNetwork;
  /** Where the driver's Unix sockets go (a directory only the supervisor may enter); default a private one (machine.ts). */
  socketDir?: string;
  /** This supervisor's name, written on its slot claims. */
  name?: string;
  /** Default `qemu-system-x86_64`. */
  binary?: string;
  /** Default `qemu-img`. */
  qemuImg?: string;
  /** `-machine`; default `q35`. */
  machine?: string;
  /** `auto` (default): KVM when /dev/kvm runs a guest instruction, else TCG. */
  accel?: "auto" | "kvm" | "tcg";
  /** `-cpu`; default QEMU's. */
  cpu?: string;
  /** Default 1. */
  cpus?: number;
  /** Default 512. */
  memoryMb?: number;
  /** Appended to every QEMU command line. */
  extraArgs?: readonly string[];
  /** A regular expression on the console that means "booted"; unset: running as soon as QEMU runs. */
  readyPattern?: string;
  /** A regular expression on the console whose first group is the workload's exit code; default `TREADMILL_EXIT=(\d+)`; "" for none. */
  exitPattern?: string;
  /** The guest's ssh port, forwarded and exposed as `ssh`; 0: none. Default 22. */
  sshPort?: number;
  /** Longest wait from launch to the readiness pattern. Default 300000. */
  bootTimeoutMs?: number;
  /** Default time between the ACPI power-down and the kill. Default 10000. */
  graceMs?: number;
  /** Adds `isa-debug-exit` so the guest can set QEMU's exit code. Default true. */
  debugExit?: boolean;
  /** QEMU's seccomp sandbox. Default true. */
  sandbox?: boolean;
  logger: Logger;
}

type Settings = Required<Omit<QemuDriverOptions, "cpu" | "readyPattern" | "logger" | "slotUidBase" | "socketDir" | "name">> & {
  cpu?: string;
  readyPattern?: RegExp;
  exitRegex?: RegExp;
  accelResolved: "kvm" | "tcg";
};

interface QemuPrepared extends SlotPrepared {
  readonly kind: "qemu";
  readonly overlay: string;
  readonly plan: VmPlan;
  readonly parameterFile?: string;
  readonly exposedPorts: ExposedPortSpec[];
  running?: QemuJob;
}

interface QemuJob extends SlotJob<QemuPrepared> {
  readonly kind: "qemu";
  readonly qmp: () => QmpClient | undefined;
  /** `killed` is set once this driver sent SIGKILL, so that the exit is known to be ours. */
  readonly control: { killed: boolean };
  /**
   * `off`: halted by a power-off control; `chain`: the control under way (one
   * at a time); `rebooting`: a control's reset is under way, the firmware's
   * own reboots let through until the guest prints again (see `control`).
   */
  readonly power: { off: boolean; chain: Promise<unknown>; rebooting: boolean };
}

/** Where forwards listen inside QEMU's own network namespace (any port: nothing else is there). */
const NAMESPACE_FORWARD_BASE = 10000;
/** After the exit pattern, how long QEMU may take to power off by itself before it is quit. */
const EXIT_SETTLE_MS = 3000;

/** A free TCP port on 127.0.0.1 (closed again, for QEMU to bind). */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen({ host: "127.0.0.1", port: 0 }, resolve);
  });
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Resolves when `fn` succeeds; retries every 20 ms until `deadline` or `give` says stop. */
async function retryUntil<T>(fn: () => Promise<T>, deadline: number, give: () => string | undefined): Promise<T> {
  for (;;) {
    try {
      return await fn();
    } catch (err) {
      const reason = give();
      if (reason !== undefined) throw new Error(reason, { cause: err });
      if (Date.now() > deadline) throw err;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

/** Whether KVM runs a guest here: a one-instruction BIOS that writes to isa-debug-exit. */
async function kvmWorks(binary: string, dir: string): Promise<boolean> {
  try {
    const fh = await open("/dev/kvm", "r+");
    await fh.close();
  } catch {
    return false;
  }
  const bios = join(dir, "kvm-probe.bin");
  const image = Buffer.alloc(65536, 0xf4); // hlt
  Buffer.from([0xb0, 0x2a, 0xe6, 0xf4, 0xf4]).copy(image, 0xfff0); // mov al,42; out 0xf4,al; hlt
  await writeFile(bios, image);
  try {
    await execFileAsync(binary, ["-accel", "kvm", "-machine", "pc", "-nodefaults", "-display", "none", "-bios", bios, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"], { timeout: 10000 });
    return false;
  } catch (err) {
    return (err as { code?: unknown }).code === 85;
  } finally {
    await rm(bios, { force: true });
  }
}

export class QemuDriver implements Driver {
  readonly kind = "qemu" as const;
  readonly capacity: number;
  private readonly pool: SlotPool<QemuPrepared>;

  private constructor(
    /** Holds `jobs/`: the work directory, or a root-owned place when it is private (machine.ts). */
    private readonly jobsDir: string,
    private readonly settings: Settings,
    private readonly claim: SlotClaim | undefined,
    /** unshare, ip, setpriv, nsenter, socat: set when QEMU gets a network namespace of its own. */
    private readonly netTools: Record<"unshare" | "ip" | "setpriv" | "nsenter" | "socat", string> | undefined,
    private readonly socketDir: SocketDirectory,
    /** setpriv(1), which gives QEMU its parent-death signal. */
    private readonly setpriv: string,
    private readonly logger: Logger,
  ) {
    this.pool = new SlotPool<QemuPrepared>({
      names: { driver: "qemu", slot: "vm", job: "vm" },
      slots: settings.slots,
      claim,
      logger,
      stop: (job, options) => this.stop(job, options),
    });
    this.capacity = this.pool.capacity;
  }

  /** Whether QEMU runs as the slot's uid (the supervisor is root). */
  private get switchUid(): boolean {
    return this.claim !== undefined;
  }

  static async create(options: QemuDriverOptions): Promise<QemuDriver> {
    const logger = options.logger.child({ driver: "qemu" });
    const workDir = resolve(options.workDir);
    await mkdir(workDir, { recursive: true, mode: 0o711 });
    await chmod(workDir, 0o711);
    // The slot's uid must be able to reach its job's directory (machine.ts).
    const jobsDir = await jobsBase(workDir, "qemu", process.getuid?.() === 0);
    // Job directories of a previous run are stale: their VMs are gone.
    await rm(join(jobsDir, "jobs"), { recursive: true, force: true });
    await mkdir(join(jobsDir, "jobs"), { mode: 0o711 });
    await chmod(join(jobsDir, "jobs"), 0o711);
    const binary = options.binary ?? "qemu-system-x86_64";
    const qemuImg = options.qemuImg ?? "qemu-img";
    for (const tool of [binary, qemuImg]) {
      await execFileAsync(tool, ["--version"], { timeout: 10000 }).catch((err: unknown) => {
        throw new Error(`the qemu driver needs ${tool} (install qemu-system-x86 and qemu-utils)`, { cause: err });
      });
    }
    const accel = options.accel ?? "auto";
    const accelResolved = accel === "auto" ? ((await kvmWorks(binary, workDir)) ? "kvm" : "tcg") : accel;
    const exitPattern = options.exitPattern ?? "TREADMILL_EXIT=(\\d+)";
    const settings: Settings = {
      workDir,
      slots: options.slots ?? 1,
      network: options.network ?? "isolated",
      binary,
      qemuImg,
      machine: options.machine ?? "q35",
      accel,
      accelResolved,
      ...(options.cpu ? { cpu: options.cpu } : {}),
      cpus: options.cpus ?? 1,
      memoryMb: options.memoryMb ?? 512,
      extraArgs: options.extraArgs ?? [],
      ...(options.readyPattern ? { readyPattern: new RegExp(options.readyPattern) } : {}),
      exitPattern,
      ...(exitPattern !== "" ? { exitRegex: new RegExp(exitPattern) } : {}),
      sshPort: options.sshPort ?? 22,
      bootTimeoutMs: options.bootTimeoutMs ?? 300000,
      graceMs: options.graceMs ?? 10000,
      debugExit: options.debugExit ?? true,
      sandbox: options.sandbox ?? true,
    };
    const root = process.getuid?.() === 0;
    const { setpriv } = await requireTools({ setpriv: { name: "setpriv", package: "util-linux" } }, "the qemu driver");
    const netTools =
      root && settings.network === "isolated"
        ? await requireTools(
            {
              unshare: { name: "unshare", package: "util-linux" },
              ip: { name: "ip", package: "iproute2" },
              setpriv: { name: "setpriv", package: "util-linux" },
              nsenter: { name: "nsenter", package: "util-linux" },
              socat: { name: "socat", package: "socat" },
            },
            "the qemu driver's isolated network",
          )
        : undefined;
    if (!root && settings.network === "isolated") {
      logger.warn("not root: vms stay in the host's network namespace; guests are restricted, but their forwarded ports listen on the host's loopback (development only)");
    }
    if (settings.network === "host") {
      logger.warn("job network host: guests reach the host (10.0.2.2, its loopback services) and beyond (unsafe; the default is isolated)");
    }
    const socketDir = await socketDirectory(options.socketDir);
    const claim = await claimSlotUids({
      slots: settings.slots,
      uidBase: options.slotUidBase ?? "auto",
      switchUid: root,
      holder: options.name ?? "qemu driver",
      rememberFile: join(workDir, "slot-uid-base"),
      logger,
    }).catch(async (err: unknown) => {
      await socketDir.remove();
      throw err;
    });
    logger.info({ accel: accelResolved, machine: settings.machine, slots: settings.slots, uidBase: claim?.uidBase, network: settings.network }, "qemu driver ready");
    return new QemuDriver(jobsDir, settings, claim, netTools, socketDir, setpriv, logger);
  }

  /** The uid of slot 0, claimed for this driver; undefined when VMs run as the supervisor's own uid. */
  get slotUidBase(): number | undefined {
    return this.claim?.uidBase;
  }

  /** The accelerator in use (`auto` resolved). */
  get accel(): "kvm" | "tcg" {
    return this.settings.accelResolved;
  }

  async prepare(spec: JobSpecForDriver, options: PrepareOptions = {}): Promise<Prepared> {
    const existing = this.pool.existing(spec);
    if (existing !== undefined) return existing;
    const { signal, onStage } = options;
    throwIfAborted(signal);
    onStage?.("allocating", "allocating a vm slot and its disk overlay");
    const { key, hold } = this.pool.allocate(spec);
    const { slot, uid, gid } = hold;
    const log = this.logger.child({ jobId: spec.jobId, attempt: spec.attempt, slot });
    // Short, so that the sockets inside fit in a unix socket path.
    const jobDir = join(this.jobsDir, "jobs", createHash("sha256").update(key).digest("hex").slice(0, 16));
    try {
      if (join(jobDir, "console.sock").length > MAX_SOCKET_PATH) {
        throw new DriverError("start", `qemu job directory ${this.jobsDir} is too long for unix sockets inside it`);
      }
      const plan = await planVmImage(spec.image);
      throwIfAborted(signal);
      await makeJobDir(jobDir, uid, gid);
      const top = plan.chain[plan.chain.length - 1]!;
      const overlay = join(jobDir, "overlay.qcow2");
      const started = performance.now();
      // -u: the top blob's own backing name is a digest; QEMU gets the chain from -blockdev.
      await execFileAsync(
        this.settings.qemuImg,
        ["create", "-q", "-f", "qcow2", "-u", "-F", top.format, "-b", top.layer.path, overlay, String(top.virtualSize)],
        { timeout: 30000 },
      ).catch((err: unknown) => {
        throw new DriverError("start", "the job's disk overlay cannot be created", { cause: err });
      });
      await chown(overlay, uid, gid);
      let parameterFile: string | undefined;
      if (spec.parameters.length > 0) {
        parameterFile = join(jobDir, "parameters.sh");
        await writeParameters(parameterFile, spec.parameters, uid, gid);
      }
      log.info({ durationMs: Math.round(performance.now() - started), layers: plan.chain.length }, "vm overlay created");
      throwIfAborted(signal);
      const prepared: QemuPrepared = {
        kind: "qemu",
        ...hold,
        jobDir,
        overlay,
        plan,
        ...(parameterFile === undefined ? {} : { parameterFile }),
        exposedPorts: (spec.exposedPorts ?? []).filter((p) => p.name !== "console" && p.port > 0),
      };
      this.pool.add(prepared);
      return prepared;
    } catch (err) {
      return this.pool.abandon(slot, jobDir, err, log);
    }
  }

  async start(handle: Prepared, output: JobOutput, options: PrepareOptions = {}): Promise<RunningJob> {
    const prepared = handle as QemuPrepared;
    if (prepared.running !== undefined) return prepared.running;
    if (prepared.cleaned !== undefined) throw new DriverError("internal", "job was already cleaned up");
    const { signal, onStage } = options;
    const s = this.settings;
    const log = this.logger.child({ jobId: prepared.jobId, attempt: prepared.attempt, slot: prepared.slot });
    const say = (message: string) => output.write("supervisor", Buffer.from(`${message}\n`));

    // In QEMU's own namespace any port will do; on the host's network a free one.
    const ownNamespace = this.netTools !== undefined;
    const forwardPort = async (i: number) => (ownNamespace ? NAMESPACE_FORWARD_BASE + i : await freePort());
    const forwards: { name: string; hostPort: number; guestPort: number }[] = [];
    if (s.sshPort > 0) forwards.push({ name: "ssh", hostPort: await forwardPort(forwards.length), guestPort: s.sshPort });
    for (const p of prepared.exposedPorts) {
      if (p.name === "ssh" && s.sshPort > 0) continue;
      forwards.push({ name: p.name, hostPort: await forwardPort(forwards.length), guestPort: p.port });
    }
    const tag = createHash("sha256").update(`${prepared.jobId}.${prepared.attempt}`).digest("hex").slice(0, 16);
    const files = {
      consoleSocket: join(prepared.jobDir, "console.sock"),
      consoleLog: join(prepared.jobDir, "console.log"),
      qmpSocket: join(prepared.jobDir, "qmp.sock"),
    };
    const launch: QemuLaunch = {
      binary: s.binary,
      name: `treadmill-${prepared.jobId}`,
      machine: s.machine,
      accel: s.accelResolved,
      ...(s.cpu ? { cpu: s.cpu } : {}),
      cpus: s.cpus,
      memoryMb: s.memoryMb,
      plan: prepared.plan,
      overlay: prepared.overlay,
      ...files,
      forwards,
      restrictNetwork: s.network === "isolated",
      ...(prepared.parameterFile === undefined ? {} : { parameterFile: prepared.parameterFile }),
      debugExit: s.debugExit,
      sandbox: s.sandbox,
      extraArgs: s.extraArgs,
    };
    const args = ["-no-reboot", ...qemuArgs(launch)];

    const state: QemuJob["state"] = { phase: "booting", stopRequested: false };
    const control: QemuJob["control"] = { killed: false };
    let consoleSocket: Socket | undefined;
    let qmp: QmpClient | undefined;
    const bridge = await ConsoleBridge.listen({
      path: join(this.socketDir.path, `${tag}-console.sock`),
      logger: log,
      onInput: (bytes) => {
        if (consoleSocket?.writable) consoleSocket.write(bytes);
      },
    });
    const describe = (f: { guestPort: number }) => `port ${f.guestPort} of the vm`;
    // Forwards join once QEMU listens (through relays when it has a namespace of its own).
    const console: Exposure = { name: "console", kind: "console", path: bridge.path };
    let exposed: Exposure[] = ownNamespace
      ? [console]
      : [console, ...forwards.map((f): Exposure => ({ name: f.name, kind: "tcp", description: describe(f), host: "127.0.0.1", port: f.hostPort }))];
    const relays: Relay[] = [];
    let netns: FileHandle | undefined;

    onStage?.("booting", `booting the vm (${s.accelResolved}, ${s.machine}, ${s.cpus} cpu, ${s.memoryMb} MiB)`);
    // Own namespace: root makes it and brings loopback up, then becomes the slot's uid for QEMU (same pid throughout).
    const t = this.netTools;
    const [command, argv] =
      t === undefined
        ? dieWithSupervisor(this.setpriv, s.binary, args)
        : [
            t.unshare,
            [
              "--net",
              "--",
              "/bin/sh",
              "-c",
              `${shellQuote(t.ip)} link set lo up && exec ${shellQuote(t.setpriv)} --reuid=${prepared.uid} --regid=${prepared.gid} --clear-groups --pdeathsig KILL "$@"`,
              "treadmill-vm",
              s.binary,
              ...args,
            ],
          ];
    const child = spawn(command, argv, {
      cwd: prepared.jobDir,
      stdio: ["ignore", "pipe", "pipe"],
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
      detached: true,
      ...(this.switchUid && t === undefined ? { uid: prepared.uid, gid: prepared.gid } : {}),
    });
    let stderrTail = "";
    const keepTail = (bytes: Buffer) => {
      output.write("supervisor", bytes);
      stderrTail = (stderrTail + bytes.toString("utf8")).slice(-2000);
    };
    child.stdout!.on("data", keepTail);
    child.stderr!.on("data", keepTail);
    let qemuExit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
    const exitEvent = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      child.once("close", (code, sig) => {
        qemuExit = { code, signal: sig };
        resolve(qemuExit);
      }),
    );
    child.once("error", (err) => {
      log.error({ err }, "qemu could not be run");
      keepTail(Buffer.from(`${err.message}\n`));
    });

    // The console: QEMU copies every byte to console.log, which is the
    // complete record (the socket drops what comes before we connect).
    let window = "";
    let sawReady = false;
    let booted: () => void = () => undefined;
    const bootSeen = new Promise<void>((resolve) => (booted = resolve));
    let exitFromConsole: number | undefined;
    let settleTimer: NodeJS.Timeout | undefined;
    const power: QemuJob["power"] = { off: false, chain: Promise.resolve(), rebooting: false };
    const onConsole = (bytes: Buffer) => {
      output.write("console", bytes);
      if (power.rebooting) {
        // The guest is back: its own reboots end the job again (-no-reboot).
        power.rebooting = false;
        void qmp?.execute("set-action", { reboot: "shutdown" }).catch(() => undefined);
      }
      window = (window + bytes.toString("latin1")).slice(-8192);
      if (s.readyPattern?.test(window) === true) {
        sawReady = true;
        booted();
      }
      if (s.exitRegex !== undefined && exitFromConsole === undefined && state.phase !== "booting") checkExit();
    };
    const checkExit = () => {
      const m = s.exitRegex?.exec(window);
      if (m === null || m === undefined || exitFromConsole !== undefined) return;
      exitFromConsole = Number(m[1] ?? "0");
      // Give the guest a moment to power off by itself, then quit it.
      settleTimer = setTimeout(() => void quit(), EXIT_SETTLE_MS);
    };
    const tail = tailFile(files.consoleLog, onConsole);

    const quit = async () => {
      if (qemuExit !== undefined) return;
      await qmp?.execute("quit").catch(() => undefined);
      let timer: NodeJS.Timeout | undefined;
      const gone = await Promise.race([
        exitEvent.then(() => true),
        new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), 5000))),
      ]);
      clearTimeout(timer);
      if (!gone) {
        control.killed = true;
        child.kill("SIGKILL");
      }
    };

    const exited = (async (): Promise<JobExit> => {
      const { code, signal: sig } = await exitEvent;
      state.phase = "stopping";
      await tail.close();
      clearTimeout(settleTimer);
      consoleSocket?.destroy();
      qmp?.close();
      exposed = [];
      for (const relay of relays) relay.stop();
      await netns?.close();
      await bridge.close();
      state.phase = "exited";
      let exitCode: number | null;
      let message: string;
      if (exitFromConsole !== undefined) {
        exitCode = exitFromConsole;
        message = `workload exited with code ${exitCode} (console pattern)`;
      } else if (sig !== null) {
        exitCode = null;
        message = state.stopRequested || control.killed ? "vm stopped (qemu killed)" : `qemu killed by ${sig}, from outside the job (not by this supervisor)`;
      } else {
        exitCode = exitCodeOfQemu(code ?? 1, s.debugExit);
        message = state.stopRequested ? `vm stopped (qemu exit code ${code})` : `vm exited (qemu exit code ${code}, workload exit code ${exitCode})`;
      }
      const stopped = state.stopRequested && exitFromConsole === undefined;
      // QEMU killed by a signal nobody here sent: the host failed the job.
      const outside = exitFromConsole === undefined && sig !== null && !state.stopRequested && !control.killed;
      say(message);
      log.info({ exitCode, qemuExitCode: code, signal: sig, stopped, outside }, "vm exited");
      return {
        exitCode,
        ...(sig !== null ? { signal: sig } : {}),
        status: exitCode === 0 && !stopped ? "success" : "failure",
        stopped,
        message,
        ...(outside ? { failure: new DriverError("internal", message) } : {}),
      };
    })();

    const job: QemuJob = {
      kind: "qemu",
      jobId: prepared.jobId,
      attempt: prepared.attempt,
      prepared,
      child,
      qmp: () => qmp,
      control,
      power,
      state,
      status: () => state.phase,
      exposures: () => exposed,
      exited,
      writeConsole: (bytes) => {
        if (consoleSocket?.writable) consoleSocket.write(bytes);
      },
    };

    const aborted = new Promise<"aborted">((resolve) => {
      if (signal?.aborted) resolve("aborted");
      signal?.addEventListener("abort", () => resolve("aborted"), { once: true });
    });
    const qemuGone = () => (qemuExit !== undefined ? `qemu exited at start (code ${qemuExit.code}): ${stderrTail.trim().split("\n").slice(-3).join(" | ")}` : signal?.aborted ? "aborted" : undefined);
    let timer: NodeJS.Timeout | undefined;
    try {
      const deadline = Date.now() + 30000;
      qmp = await retryUntil(() => QmpClient.connect(files.qmpSocket), deadline, qemuGone);
      consoleSocket = await retryUntil(() => connectUnix(files.consoleSocket), deadline, qemuGone);
      consoleSocket.on("data", (bytes: Buffer) => bridge.write(bytes));
      consoleSocket.on("error", () => undefined);
      if (t !== undefined && forwards.length > 0) {
        // QEMU listens for its forwards now (QMP answers once its options are set up).
        netns = await open(`/proc/${child.pid}/ns/net`, "r");
        for (const f of forwards) {
          const relay = startRelay({
            netnsFd: netns.fd,
            path: join(this.socketDir.path, `${tag}-port-${f.name}.sock`),
            port: f.hostPort,
            tools: { setpriv: t.setpriv, nsenter: t.nsenter, socat: t.socat },
            logger: log,
          });
          relays.push(relay);
          exposed.push({ name: f.name, kind: "tcp", description: describe(f), path: relay.path, check: () => relay.ready });
        }
      }
      // Without a readiness pattern the job runs as soon as QEMU does.
      if (s.readyPattern === undefined) booted();
      say(`vm started (pid ${child.pid}, ${s.accelResolved}, network ${s.network})${forwards.map((f) => `; ${f.name} -> guest port ${f.guestPort}`).join("")}`);
      const outcome = await Promise.race([
        bootSeen.then(() => "booted" as const),
        exitEvent.then(() => "exited" as const),
        aborted,
        new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), s.bootTimeoutMs))),
      ]);
      if (outcome === "aborted") throw new DriverAbortError("vm boot aborted");
      if (outcome === "timeout") throw new DriverError("start", `vm did not boot within ${s.bootTimeoutMs} ms`);
      if (outcome === "exited") {
        // The console log may hold more than was read: the boot, even the workload's end.
        await exited;
        if (s.readyPattern !== undefined && !sawReady) throw new DriverError("start", qemuGone() ?? "qemu exited before the vm booted");
      }
    } catch (err) {
      clearTimeout(timer);
      state.stopRequested = true;
      await quit();
      await exited;
      if (err instanceof DriverError || err instanceof DriverAbortError) throw err;
      const message = err instanceof Error ? err.message : String(err);
      if (message === "aborted") throw new DriverAbortError("vm boot aborted");
      log.warn({ err }, "vm start failed");
      throw new DriverError("start", message.startsWith("qemu exited") ? message : "the vm could not be started", { cause: err });
    }
    clearTimeout(timer);
    if (state.phase === "booting") state.phase = "running";
    // The exit pattern may have come with the boot output already.
    checkExit();
    log.info({ pid: child.pid, console: bridge.path, forwards, network: s.network, ownNamespace }, "vm running");
    prepared.running = job;
    return job;
  }

  stop(handle: RunningJob, options: StopOptions = {}): Promise<void> {
    const job = handle as QemuJob;
    const graceMs = options.graceMs ?? this.settings.graceMs;
    return this.pool.stop(job, graceMs, async (log, within) => {
      const qmp = job.qmp();
      // A halted VM (powered off by a control) has nobody to power it down politely.
      const grace = job.power.off ? 0 : graceMs;
      if (grace > 0) await qmp?.execute("system_powerdown").catch(() => undefined);
      if (!(await within(grace))) {
        log.info("grace period over, quitting vm");
        await qmp?.execute("quit").catch(() => undefined);
        if (!(await within(5000))) {
          job.control.killed = true;
          job.child.kill("SIGKILL");
        }
      }
    });
  }

  control(handle: RunningJob, action: HostAction): Promise<string> {
    const job = handle as QemuJob;
    const run = job.power.chain.then(async () => {
      const qmp = job.status() === "running" ? job.qmp() : undefined;
      if (qmp === undefined) throw new ControlRefused("not-running", `job ${job.jobId} is not running on this vm host`);
      const execute = (command: string, args?: Record<string, unknown>) =>
        qmp.execute(command, args).catch((err: unknown) => {
          throw new ControlRefused("unavailable", `the vm's monitor refused ${command}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
        });
      // QEMU runs with -no-reboot (a guest's reboot ends its job), which
      // turns system_reset into a shutdown too, and SeaBIOS reboots once
      // more by itself after a reset: reboots are let through until the
      // guest prints on its console again (onConsole restores -no-reboot).
      const systemReset = async () => {
        job.power.rebooting = true;
        await execute("set-action", { reboot: "reset" });
        await execute("system_reset");
      };
      const halt = async () => {
        await execute("stop");
        await systemReset();
        job.power.off = true;
      };
      const resume = async () => {
        await execute("cont");
        job.power.off = false;
      };
      switch (action) {
        case "reset":
          await systemReset();
          return job.power.off ? "vm reset (still powered off)" : "vm reset";
        case "power-off":
          if (!job.power.off) await halt();
          return "vm powered off";
        case "power-on":
          if (job.power.off) await resume();
          return "vm powered on";
        case "power-cycle":
          await halt();
          await resume();
          return "vm power-cycled";
      }
    });
    job.power.chain = run.catch(() => undefined);
    return run;
  }

  async snapshot(handle: RunningJob, options: { outFile: string }): Promise<SnapshotLayer> {
    const job = handle as QemuJob;
    const prepared = job.prepared;
    if (prepared.cleaned !== undefined) throw new DriverError("internal", "job was already cleaned up");
    const started = performance.now();
    const top = prepared.plan.chain[prepared.plan.chain.length - 1]!;
    const qmp = job.status() === "exited" || job.power.off ? undefined : job.qmp();
    // A paused VM has flushed its writes to the overlay (QMP stop drains and flushes).
    if (qmp !== undefined) await qmp.execute("stop");
    try {
      await copyFile(prepared.overlay, options.outFile);
    } finally {
      if (qmp !== undefined) await qmp.execute("cont").catch(() => undefined);
    }
    // The snapshot names its lower layer by digest, never by this host's path.
    await execFileAsync(this.settings.qemuImg, ["rebase", "-u", "-f", "qcow2", "-F", top.format, "-b", top.layer.digest, options.outFile], {
      timeout: 60000,
    });
    const hash = createHash("sha256");
    for await (const chunk of createReadStream(options.outFile, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
    const size = (await stat(options.outFile)).size;
    const layer: SnapshotLayer = {
      mediaType: QCOW2_MEDIA_TYPE,
      digest: `sha256:${hash.digest("hex")}`,
      size,
      path: options.outFile,
      annotations: { [LOWER_ANNOTATION]: top.layer.digest },
    };
    this.logger.info(
      { jobId: prepared.jobId, attempt: prepared.attempt, digest: layer.digest, size, durationMs: Math.round(performance.now() - started) },
      "vm snapshot written",
    );
    return layer;
  }

  cleanup(handle: Prepared | RunningJob): Promise<void> {
    return this.pool.cleanup(handle);
  }

  async close(): Promise<void> {
    await this.pool.close();
    await this.socketDir.remove();
    await releaseJobsBase(this.jobsDir);
  }
}

/** Writes the parameter file (0600, the slot's) the guest reads through fw_cfg. */
async function writeParameters(path: string, parameters: JobParameter[], uid: number, gid: number): Promise<void> {
  const fh = await open(path, "wx", 0o600);
  try {
    await fh.writeFile(parameterScript(parameters, parameterEnvName));
    await fh.chown(uid, gid);
  } finally {
    await fh.close();
  }
}

function connectUnix(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect(path);
    socket.once("connect", () => {
      socket.off("error", reject);
      resolve(socket);
    });
    socket.once("error", reject);
  });
}

/**
 * Follows a file another process appends to (it may not exist yet), passing
 * new bytes to `onData`; `close()` reads what is left and stops.
 */
function tailFile(path: string, onData: (bytes: Buffer) => void): { close(): Promise<void> } {
  let fh: FileHandle | undefined;
  let offset = 0;
  let reading: Promise<void> = Promise.resolve();
  let stopped = false;
  const buffer = Buffer.alloc(64 * 1024);
  const readMore = async () => {
    fh ??= await open(path, "r").catch(() => undefined);
    if (fh === undefined) return;
    for (;;) {
      const { bytesRead } = await fh.read(buffer, 0, buffer.length, offset);
      if (bytesRead === 0) return;
      offset += bytesRead;
      onData(Buffer.from(buffer.subarray(0, bytesRead)));
    }
  };
  const tick = () => {
    reading = reading.then(readMore).catch(() => undefined);
  };
  const timer = setInterval(tick, 20);
  return {
    async close() {
      if (stopped) return;
      stopped = true;
      clearInterval(timer);
      tick();
      await reading;
      await fh?.close().catch(() => undefined);
    },
  };
}

/** Creates a qemu driver (see `QemuDriverOptions`). */
export function createQemuDriver(options: QemuDriverOptions): Promise<QemuDriver> {
  return QemuDriver.create(options);
}
