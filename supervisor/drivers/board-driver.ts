/**
 * The `board` driver (DESIGN.md §9): one physical board, driven by configured
 * shell commands (power on/off, reset, flash) and watched through its serial
 * console. A job's image holds a firmware layer; every job flashes it anew,
 * so nothing carries over from the previous job.
 *
 * Life of a job: prepare = power off + flash; start = open the serial device
 * (`stty -F DEV BAUD raw -echo`) and drop what it held from before, bridge
 * it to a Unix socket only the supervisor can reach (console.ts), power on, and
 * wait for the boot pattern (or any output) within the boot timeout; then the
 * console is captured until the exit pattern (`TREADMILL_EXIT=(\d+)`) declares
 * the workload's exit code, or until `stop`. The board is powered off at the
 * end of every job.
 *
 * Host control (issue #21), while a job runs: power off, power on and
 * power-cycle run the power commands, reset runs the reset command (a power
 * cycle without one), each tried again within the boot timeout. The console
 * shows the board rebooting and the job goes on: it ends as before, by its
 * exit pattern, a stop or a lost line. A serial line that goes away with the
 * board's power (a USB adapter powered by the board) is not lost: it is
 * opened again after power on (what it held then is the new boot's). A
 * job's end waits for a control under way, so the board is always off
 * after the job.
 *
 * Identity: a board may name its USB serial number (`serialNumber`); before
 * anything is flashed, the serial device must belong to the USB device of
 * that number (usb-serial.ts), else the job fails to start and nothing is
 * flashed.
 *
 * Exposures: the console, and the services the board's admin configured
 * (host TCP addresses, such as a debug probe's GDB server). Nothing a job
 * declares adds to them: a declared port that is not a configured service
 * is not exposed, and the job's `supervisor` channel says so.
 */

import { exec } from "node:child_process";
import { closeSync, constants, fstatSync, openSync, readSync } from "node:fs";
import { open, stat, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { ReadStream } from "node:tty";
import type { Logger } from "../../lib/logger.js";
import { retry } from "../../lib/retry.js";
import { ConsoleBridge } from "./console.js";
import { FIRMWARE_MEDIA_TYPE } from "../../lib/image/media-types.js";
import {
  ControlRefused,
  DriverAbortError,
  DriverError,
  type HostAction,
  throwIfAborted,
  type Driver,
  type Exposure,
  type JobExit,
  type JobOutput,
  type JobPhase,
  type JobSpecForDriver,
  type Prepared,
  type PrepareOptions,
  type RunningJob,
  type SnapshotLayer,
} from "./driver.js";
import { socketDirectory, type SocketDirectory } from "./machine.js";
import { shellQuote } from "./sandbox.js";
import { usbSerialOf } from "./usb-serial.js";

/** One board's configuration (JSON in the supervisor's config). */
export interface BoardConfig {
  /** The board's name, in logs. */
  name: string;
  /** The serial console. */
  serial: {
    /** Device path, e.g. /dev/ttyUSB0 or /dev/serial/by-id/... */
    device: string;
    /** Baud rate, set with `stty -F DEV BAUD raw -echo` before each job. */
    baud: number;
  };
  /**
   * The USB serial number of the board (or of its serial adapter), as udev's
   * `ID_SERIAL_SHORT` (`udevadm info -q property -n DEV`): when set, a job
   * starts only when `serial.device` belongs to the USB device of this
   * number.
   */
  serialNumber?: string;
  /**
   * Shell commands (run with /bin/sh -c). `{image}` is replaced by the
   * firmware file's path and `{serial}` by the serial device, both quoted.
   * A command fails the job (HOST_START_FAILURE) when it exits non-zero or
   * runs longer than `commandTimeoutMs`.
   */
  commands: {
    powerOn: string;
    powerOff: string;
    /** Optional; `stop` uses power off, a reset asked for during a job a power cycle. */
    reset?: string;
    flash: string;
  };
  /** A regular expression on the console that means "booted"; unset: the first byte of output. */
  bootPattern?: string;
  /** Longest wait from power on to boot. */
  bootTimeoutMs: number;
  /**
   * A regular expression on the console whose first capture group is the
   * workload's exit code (e.g. `TREADMILL_EXIT=(\d+)`). Unset: the job runs
   * until stopped (cancel or job timeout).
   */
  exitPattern?: string;
  /** Host TCP services of the board (a debug probe's GDB server...), exposed like the console: the admin's to name. */
  services?: { name: string; port: number }[];
  /** Longest run of one command. Default 120000 (flashing can be slow). */
  commandTimeoutMs?: number;
  /**
   * How long preparing and starting a job retry, with backoff, a board
   * command that fails or a serial line that cannot be opened (the board's
   * power switch, programmer or serial adapter away for a while) before the
   * attempt ends HOST_START_FAILURE. Default 300000, as the image fetch
   * budget: an outage shorter than this fails no job.
   */
  retryBudgetMs?: number;
}

/** Checks a parsed JSON board configuration; throws naming every bad field at once. */
export function parseBoardConfig(value: unknown): BoardConfig {
  const problems: string[] = [];
  const v = (value ?? {}) as Record<string, unknown>;
  const str = (x: unknown) => typeof x === "string" && x !== "";
  const serial = (v.serial ?? {}) as Record<string, unknown>;
  const commands = (v.commands ?? {}) as Record<string, unknown>;
  if (!str(v.name)) problems.push("board name must be a non-empty string");
  if (!str(serial.device)) problems.push("board serial.device must be a device path");
  if (!Number.isInteger(serial.baud) || (serial.baud as number) <= 0) problems.push("board serial.baud must be a positive integer");
  if (v.serialNumber !== undefined && (!str(v.serialNumber) || !/^[\x21-\x7e]{1,126}$/.test(v.serialNumber as string))) {
    problems.push("board serialNumber must be printable characters without spaces");
  }
  for (const c of ["powerOn", "powerOff", "flash"]) if (!str(commands[c])) problems.push(`board commands.${c} must be a command`);
  if (commands.reset !== undefined && !str(commands.reset)) problems.push("board commands.reset must be a command");
  if (!Number.isInteger(v.bootTimeoutMs) || (v.bootTimeoutMs as number) <= 0) problems.push("board bootTimeoutMs must be a positive integer");
  if (v.retryBudgetMs !== undefined && (!Number.isInteger(v.retryBudgetMs) || (v.retryBudgetMs as number) < 0)) {
    problems.push("board retryBudgetMs must be a non-negative integer");
  }
  for (const p of ["bootPattern", "exitPattern"] as const) {
    if (v[p] === undefined) continue;
    try {
      new RegExp(v[p] as string);
    } catch {
      problems.push(`board ${p} is not a regular expression`);
    }
  }
  if (v.services !== undefined) {
    if (!Array.isArray(v.services)) problems.push("board services must be an array");
    else
      v.services.forEach((s: { name?: unknown; port?: unknown }, i) => {
        if (!str(s?.name) || !/^[a-z][a-z0-9-]{0,31}$/.test(s.name as string)) problems.push(`board services[${i}].name must match [a-z][a-z0-9-]{0,31}`);
        if (!Number.isInteger(s?.port) || (s.port as number) <= 0 || (s.port as number) > 65535) problems.push(`board services[${i}].port must be a port number`);
      });
  }
  if (problems.length > 0) throw new Error(problems.join("; "));
  return v as unknown as BoardConfig;
}

interface BoardPrepared extends Prepared {
  readonly kind: "board";
  readonly firmware: string;
  /** Ports the job declared that are not services of the board (not exposed). */
  readonly refusedPorts: string[];
  /** Leave the board powered with its console when the workload fails (JobSpecForDriver.holdOnFailure). */
  readonly holdOnFailure: boolean;
  running?: BoardJob;
  cleaned?: Promise<void>;
}

interface BoardJob extends RunningJob {
  readonly kind: "board";
  readonly prepared: BoardPrepared;
  finish(exit: Omit<JobExit, "status">): Promise<void>;
  control(action: HostAction): Promise<string>;
  stopRequested: boolean;
}

/** Runs one configured command; rejects with `DriverError("start")` carrying the tail of its output. */
function runCommand(template: string, values: { image?: string; serial: string }, timeoutMs: number, signal?: AbortSignal): Promise<string> {
  const command = template
    .replace(/\{image\}/g, values.image === undefined ? "''" : shellQuote(values.image))
    .replace(/\{serial\}/g, shellQuote(values.serial));
  return new Promise((resolve, reject) => {
    exec(command, { timeout: timeoutMs, signal, killSignal: "SIGKILL" }, (err, stdout, stderr) => {
      if (err === null) return resolve(stdout + stderr);
      if (signal?.aborted) return reject(new DriverAbortError());
      const tail = (stdout + stderr).trim().split("\n").slice(-3).join(" | ");
      reject(new DriverError("start", `board command failed (${err.killed ? "timed out" : `exit ${err.code}`}): ${tail}`, { cause: err }));
    });
  });
}

/** Reads what a non-blocking descriptor holds now (at most 1 MiB, the rest dropped, as tcflush of the input would). */
function readPending(fd: number): Buffer {
  const buffer = Buffer.alloc(64 * 1024);
  const kept: Buffer[] = [];
  let size = 0;
  for (;;) {
    try {
      const n = readSync(fd, buffer);
      if (n === 0) break;
      if (size < 1024 * 1024) kept.push(Buffer.from(buffer.subarray(0, n)));
      size += n;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "EAGAIN") break;
      throw err;
    }
  }
  return Buffer.concat(kept);
}

/** An open serial line: a tty stream to read, a plain handle to write, what it held when opened, and its device number. */
interface SerialLine {
  reader: ReadStream;
  writer: FileHandle;
  held: Buffer;
  rdev: number;
}

export interface BoardDriverOptions {
  /** Where the console's Unix socket goes (a directory only the supervisor may enter); default a private one (machine.ts). */
  socketDir?: string;
  /** The sysfs tree the USB serial number is read from; default /sys (tests give a tree of their own). */
  sysRoot?: string;
}

/** What the timeline says of a done action. */
const DONE: Record<HostAction, string> = { "power-off": "powered off", "power-on": "powered on", "power-cycle": "power-cycled", reset: "reset" };

export class BoardDriver implements Driver {
  readonly kind = "board" as const;
  readonly capacity = 1;
  private current: BoardPrepared | undefined;
  private readonly log: Logger;
  private readonly commandTimeoutMs: number;
  private readonly retryBudgetMs: number;
  private socketDir: Promise<SocketDirectory> | undefined;

  constructor(
    private readonly config: BoardConfig,
    logger: Logger,
    private readonly options: BoardDriverOptions = {},
  ) {
    this.log = logger.child({ driver: "board", board: config.name });
    this.commandTimeoutMs = config.commandTimeoutMs ?? 120000;
    this.retryBudgetMs = config.retryBudgetMs ?? 300000;
  }

  /** The console's socket, in a directory made at the first job. */
  private async consolePath(): Promise<string> {
    this.socketDir ??= socketDirectory(this.options.socketDir);
    return join((await this.socketDir).path, "console.sock");
  }

  private command(name: keyof BoardConfig["commands"], image?: string, signal?: AbortSignal): Promise<string> {
    const template = this.config.commands[name];
    if (template === undefined) return Promise.resolve("");
    this.log.debug({ command: name }, "running board command");
    return runCommand(template, { image, serial: this.config.serial.device }, this.commandTimeoutMs, signal);
  }

  /**
   * Runs `step` until it succeeds. A failure of the board (DriverError
   * "start": a command failed, the serial line cannot be had) is tried
   * again after a backoff delay while the retry budget lasts, each retry
   * told to `notice`; then the last failure is thrown. An abort throws
   * DriverAbortError.
   */
  private async retrying<T>(step: string, run: () => Promise<T>, signal: AbortSignal | undefined, notice: (text: string) => void): Promise<T> {
    const deadline = Date.now() + this.retryBudgetMs;
    try {
      return await retry(run, {
        initialMs: 1000,
        maxMs: 15_000,
        signal,
        isRetryable: (err) => err instanceof DriverError && err.reason === "start" && Date.now() < deadline,
        onRetry: (err, attempt, delayMs) => {
          const why = err instanceof Error ? err.message : String(err);
          this.log.warn({ step, err: why, attempt }, "board step failed; retrying");
          notice(`${step} failed (${why}); retrying in ${Math.round(delayMs / 100) / 10} s`);
        },
      });
    } catch (err) {
      if (signal?.aborted) throw new DriverAbortError();
      throw err;
    }
  }

  async prepare(spec: JobSpecForDriver, options: PrepareOptions = {}): Promise<Prepared> {
    const { signal, onStage } = options;
    if (this.current !== undefined && this.current.cleaned === undefined) {
      if (this.current.jobId === spec.jobId && this.current.attempt === spec.attempt) return this.current;
      throw new DriverError("start", `board ${this.config.name} is busy with another job`);
    }
    throwIfAborted(signal);
    const firmware = [...spec.image.layers].reverse().find((l) => l.mediaType === FIRMWARE_MEDIA_TYPE);
    if (firmware === undefined) throw new DriverError("image", `image has no ${FIRMWARE_MEDIA_TYPE} layer`);
    const services = new Set((this.config.services ?? []).map((s) => s.name));
    const refusedPorts = (spec.exposedPorts ?? []).filter((p) => !services.has(p.name)).map((p) => p.name);
    await this.checkIdentity();
    const prepared: BoardPrepared = {
      kind: "board",
      jobId: spec.jobId,
      attempt: spec.attempt,
      firmware: firmware.path,
      refusedPorts,
      holdOnFailure: spec.holdOnFailure === true,
    };
    this.current = prepared;
    try {
      onStage?.("allocating", `powering off board ${this.config.name}`);
      await this.retrying("powering off", () => this.command("powerOff", undefined, signal), signal, (t) => onStage?.("allocating", t));
      onStage?.("provisioning", `flashing ${firmware.digest}`);
      await this.retrying("flashing", () => this.command("flash", firmware.path, signal), signal, (t) => onStage?.("provisioning", t));
      throwIfAborted(signal);
      this.log.info({ jobId: spec.jobId, attempt: spec.attempt, digest: firmware.digest }, "board flashed");
      return prepared;
    } catch (err) {
      this.current = undefined;
      await this.command("powerOff").catch(() => undefined);
      throw err;
    }
  }

  /** Refuses (a start failure) a serial device that is not the configured board's (see the head comment). */
  private async checkIdentity(): Promise<void> {
    const wanted = this.config.serialNumber;
    if (wanted === undefined) return;
    const device = this.config.serial.device;
    const found = await usbSerialOf(device, this.options.sysRoot).catch((err: unknown) => {
      throw new DriverError("start", `serial device ${device} of board ${this.config.name} cannot be found`, { cause: err });
    });
    if (found === wanted) return;
    const message =
      found === undefined
        ? `serial device ${device} has no usb serial number; board ${this.config.name} is configured as ${wanted}: refusing to flash or run it`
        : `serial device ${device} belongs to usb serial ${found}, not to board ${this.config.name} (${wanted}): refusing to flash or run it`;
    this.log.error({ device, wanted, found }, "serial device belongs to another board");
    throw new DriverError("start", message);
  }

  async start(handle: Prepared, output: JobOutput, options: PrepareOptions = {}): Promise<RunningJob> {
    const prepared = handle as BoardPrepared;
    if (prepared.running !== undefined) return prepared.running;
    if (prepared.cleaned !== undefined) throw new DriverError("internal", "job was already cleaned up");
    const { signal, onStage } = options;
    const log = this.log.child({ jobId: prepared.jobId, attempt: prepared.attempt });
    const say = (message: string) => output.write("supervisor", Buffer.from(`${message}\n`));
    const device = this.config.serial.device;

    // Configure the line, then open it twice: a tty stream to read, a plain
    // handle to write (one fd cannot back two libuv handles).
    const openLine = async (): Promise<SerialLine> => {
      await runCommand(`stty -F {serial} ${this.config.serial.baud} raw -echo`, { serial: device }, 10000).catch((err: unknown) => {
        throw new DriverError("start", `serial device ${device} cannot be configured`, { cause: err });
      });
      let fd: number | undefined;
      try {
        fd = openSync(device, constants.O_RDONLY | constants.O_NOCTTY | constants.O_NONBLOCK);
        const writer = await open(device, constants.O_WRONLY | constants.O_NOCTTY);
        const held = readPending(fd);
        return { reader: new ReadStream(fd), writer, held, rdev: fstatSync(fd).rdev };
      } catch (err) {
        if (fd !== undefined) closeSync(fd);
        throw new DriverError("start", `serial device ${device} cannot be opened`, { cause: err });
      }
    };
    let line = await this.retrying("opening the serial line", openLine, signal, say);
    // The board is off since prepare: what the line holds is an earlier run's
    // (one whose supervisor died while it ran), never this job's.
    if (line.held.length > 0) say(`discarded ${line.held.length} bytes the serial line held from before this job`);
    /** The line went away with the board's power (a control): it is opened again at power on. */
    let lineDown = false;
    let writes = Promise.resolve();
    const writeSerial = (bytes: Buffer) => {
      const { writer } = line;
      writes = writes.then(() => (lineDown ? undefined : writer.write(bytes))).then(
        () => undefined,
        (err: unknown) => log.warn({ err }, "serial write failed"),
      );
    };
    let bridge: ConsoleBridge;
    try {
      bridge = await ConsoleBridge.listen({ path: await this.consolePath(), logger: log, onInput: writeSerial });
    } catch (err) {
      line.reader.destroy();
      await line.writer.close().catch(() => undefined);
      if (err instanceof DriverError) throw err;
      throw new DriverError("start", "the board's console cannot be bridged", { cause: err });
    }

    let phase: JobPhase = "booting";
    let exposed: Exposure[] = [
      { name: "console", kind: "console", path: bridge.path },
      ...(this.config.services ?? []).map(
        (s): Exposure => ({ name: s.name, kind: "tcp", description: `service ${s.name} of board ${this.config.name}`, host: "127.0.0.1", port: s.port }),
      ),
    ];
    const bootPattern = this.config.bootPattern === undefined ? undefined : new RegExp(this.config.bootPattern);
    const exitPattern = this.config.exitPattern === undefined ? undefined : new RegExp(this.config.exitPattern);
    let window = "";
    let booted: () => void = () => undefined;
    const bootSeen = new Promise<void>((resolve) => (booted = resolve));
    let resolveExit: (exit: JobExit) => void = () => undefined;
    const exited = new Promise<JobExit>((resolve) => (resolveExit = resolve));
    let finishing: Promise<void> | undefined;
    /** The control under way (controls run one at a time; the job's end waits for it). */
    let controlling: Promise<unknown> = Promise.resolve();
    /** A control is under way, or the last one left the board off: the line may go away with its power. */
    let powerInHand = false;

    const finish = (exit: Omit<JobExit, "status">): Promise<void> => {
      // A failed workload of a job to hold: the board stays as it is, powered,
      // its console and control working, until a stop ends the hold.
      const failed = !exit.stopped && exit.failure === undefined && exit.exitCode !== 0;
      if (phase === "running" && prepared.holdOnFailure && failed && finishing === undefined) {
        phase = "held";
        say(`${exit.message}; board ${this.config.name} held as it is`);
        log.info({ exitCode: exit.exitCode }, "board job held");
        resolveExit({ ...exit, status: "failure" });
        return Promise.resolve();
      }
      finishing ??= (async () => {
        phase = "stopping";
        line.reader.pause();
        await controlling;
        await this.command("powerOff").catch((err: unknown) => log.error({ err }, "board power off failed"));
        line.reader.destroy();
        await writes;
        await line.writer.close().catch(() => undefined);
        exposed = [];
        await bridge.close();
        phase = "exited";
        const status = exit.exitCode === 0 && !exit.stopped ? "success" : "failure";
        say(exit.message);
        log.info({ exitCode: exit.exitCode, stopped: exit.stopped }, "board job ended");
        resolveExit({ ...exit, status });
      })();
      return finishing;
    };

    const onData = (bytes: Buffer) => {
      if (phase === "exited" || phase === "stopping") return;
      output.write("console", bytes);
      bridge.write(bytes);
      window = (window + bytes.toString("latin1")).slice(-8192);
      if (phase === "booting" && (bootPattern === undefined || bootPattern.test(window))) {
        booted();
      }
      if (phase === "running" && exitPattern !== undefined) {
        const m = exitPattern.exec(window);
        if (m !== null) {
          const code = Number(m[1] ?? "0");
          void finish({ exitCode: code, stopped: false, message: `workload exited with code ${code} (console pattern)` });
        }
      }
    };

    // The serial line going away (the board dead or unplugged) ends a running
    // job at once, as the host's failure: nothing more of it can be seen.
    // While it boots, the boot timeout fails the start instead. Not when it
    // goes with the board's power during a control (a USB serial adapter on
    // the board): the line is opened again when the power comes back.
    let lineLost = false;
    const endLineLost = () => {
      const message = `serial line of board ${this.config.name} closed while the job ran`;
      log.warn(message);
      return finish({ exitCode: null, stopped: false, message, failure: new DriverError("internal", message) });
    };
    const lineGone = (gone: SerialLine) => {
      if (gone !== line || lineLost || phase === "stopping" || phase === "exited") return;
      if (powerInHand) {
        if (!lineDown) log.info("serial line went away with the board's power");
        lineDown = true;
        return;
      }
      lineLost = true;
      if (phase === "running") void endLineLost();
    };
    const watch = (l: SerialLine) => {
      l.reader.on("data", onData);
      l.reader.on("error", (err) => {
        log.warn({ err }, "serial read failed");
        lineGone(l);
      });
      l.reader.on("end", () => lineGone(l));
      l.reader.on("close", () => lineGone(l));
    };
    watch(line);
    /**
     * After power on: opens the line again when it went away with the power,
     * or when the device is another now (re-enumerated), within the boot
     * timeout; what it holds is the new boot's, kept.
     */
    const reopenIfGone = async () => {
      const moved = await stat(device).then(
        (st) => st.rdev !== line.rdev,
        () => true,
      );
      if (!lineDown && !moved) return;
      const old = line;
      lineDown = true;
      old.reader.destroy();
      await old.writer.close().catch(() => undefined);
      const deadline = Date.now() + this.config.bootTimeoutMs;
      try {
        line = await retry(openLine, { initialMs: 100, maxMs: 1000, isRetryable: (err) => err instanceof DriverError && Date.now() < deadline });
      } catch (err) {
        lineLost = true;
        void endLineLost();
        throw new ControlRefused("unavailable", `serial line of board ${this.config.name} did not come back after power on`, { cause: err });
      }
      lineDown = false;
      watch(line);
      // Opened after the power came back: what it held is this boot's.
      if (line.held.length > 0) onData(line.held);
      say(`serial line of board ${this.config.name} opened again after power on`);
    };

    const control = (action: HostAction): Promise<string> => {
      const run = controlling.then(async () => {
        powerInHand = true;
        const step = async (name: "powerOff" | "powerOn" | "reset") => {
          if (phase !== "running" && phase !== "held") throw new ControlRefused("not-running", `job ${prepared.jobId} no longer runs on board ${this.config.name}`);
          // A power switch away for a moment (or a board coming back on its USB bus) is tried again, within the boot timeout.
          const deadline = Date.now() + this.config.bootTimeoutMs;
          const isRetryable = (err: unknown) => err instanceof DriverError && Date.now() < deadline;
          await retry(() => this.command(name), { initialMs: 200, maxMs: 2000, isRetryable }).catch((err: unknown) => {
            const why = err instanceof Error ? err.message : String(err);
            throw new ControlRefused("unavailable", `board ${this.config.name}: ${why}`, { cause: err });
          });
        };
        try {
          if (action === "power-off") await step("powerOff");
          else if (action === "power-on") await step("powerOn");
          else if (action === "reset" && this.config.commands.reset !== undefined) await step("reset");
          else {
            await step("powerOff");
            await step("powerOn");
          }
          if (action !== "power-off") await reopenIfGone();
        } finally {
          // Left powered off, the line may still go away (or be gone) with the power.
          powerInHand = action === "power-off" || lineDown;
        }
        const done = `board ${this.config.name} ${DONE[action]}`;
        log.info({ action }, "board controlled");
        return done;
      });
      controlling = run.catch(() => undefined);
      return run;
    };

    const job: BoardJob = {
      kind: "board",
      jobId: prepared.jobId,
      attempt: prepared.attempt,
      prepared,
      stopRequested: false,
      status: () => phase,
      exposures: () => exposed,
      exited,
      writeConsole: writeSerial,
      finish,
      control,
    };

    onStage?.("booting", `powering on board ${this.config.name}`);
    for (const name of prepared.refusedPorts) {
      say(`port ${name} is not exposed: board ${this.config.name} exposes its console and its configured services only`);
    }
    say(`powering on board ${this.config.name}`);
    let timer: NodeJS.Timeout | undefined;
    try {
      await this.retrying("powering on", () => this.command("powerOn", undefined, signal), signal, say);
      const outcome = await Promise.race([
        bootSeen.then(() => "booted" as const),
        new Promise<"timeout">((resolve) => (timer = setTimeout(() => resolve("timeout"), this.config.bootTimeoutMs))),
        new Promise<"aborted">((resolve) => signal?.addEventListener("abort", () => resolve("aborted"), { once: true })),
      ]);
      if (outcome === "timeout") {
        throw new DriverError("start", `board ${this.config.name} did not boot within ${this.config.bootTimeoutMs} ms`);
      }
      if (outcome === "aborted") throw new DriverAbortError("board boot aborted");
    } catch (err) {
      clearTimeout(timer);
      await finish({ exitCode: null, stopped: true, message: err instanceof Error ? err.message : "board start failed" });
      log.warn({ err }, "board start failed");
      throw err;
    }
    clearTimeout(timer);
    phase = "running";
    if (lineLost) void endLineLost();
    // The exit pattern may already be in what arrived with the boot banner.
    if (exitPattern !== undefined) {
      const m = exitPattern.exec(window);
      if (m !== null) void finish({ exitCode: Number(m[1] ?? "0"), stopped: false, message: `workload exited with code ${m[1]} (console pattern)` });
    }
    log.info({ console: bridge.path }, "board booted");
    prepared.running = job;
    return job;
  }

  async stop(handle: RunningJob): Promise<void> {
    const job = handle as BoardJob;
    job.stopRequested = true;
    // A board has no polite stop: power off is the stop.
    await job.finish({ exitCode: null, stopped: true, message: "board powered off (job stopped)" });
    await job.exited;
  }

  control(handle: RunningJob, action: HostAction): Promise<string> {
    const job = handle as BoardJob;
    if (job.status() !== "running" && job.status() !== "held") {
      return Promise.reject(new ControlRefused("not-running", `job ${job.jobId} is not running on board ${this.config.name}`));
    }
    return job.control(action);
  }

  snapshot(): Promise<SnapshotLayer> {
    return Promise.reject(new DriverError("image", "board jobs cannot be snapshotted"));
  }

  cleanup(handle: Prepared | RunningJob): Promise<void> {
    const prepared = ("prepared" in handle ? handle.prepared : handle) as BoardPrepared;
    prepared.cleaned ??= (async () => {
      if (prepared.running !== undefined) await this.stop(prepared.running);
      else await this.command("powerOff").catch((err: unknown) => this.log.error({ err }, "board power off failed"));
      if (this.current === prepared) this.current = undefined;
    })();
    return prepared.cleaned;
  }

  async close(): Promise<void> {
    if (this.current !== undefined) await this.cleanup(this.current.running ?? this.current);
    await (await this.socketDir)?.remove();
  }
}

/** Creates a board driver for one board. */
export function createBoardDriver(config: BoardConfig, logger: Logger, options: BoardDriverOptions = {}): BoardDriver {
  return new BoardDriver(parseBoardConfig(config), logger, options);
}
