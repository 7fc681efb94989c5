/**
 * A simulated board, for tests and the all-in-one testbed. It runs behind
 * socat, which gives it a pseudo-terminal the board driver opens like a real
 * serial device:
 *
 *   socat pty,raw,echo=0,link=STATE/tty 'EXEC:node --import tsx sim-board.ts STATE'
 *
 * Its standard input/output are the serial line. It is controlled like a real
 * board's power switch and programmer, by small commands (see `simBoardConfig`
 * in start.ts):
 *
 * - flash: the firmware (here a shell script) is copied to STATE/firmware.sh;
 * - `on` on the control socket STATE/control.sock: prints a boot banner on the
 *   serial line, then runs the firmware with the serial line as its terminal;
 * - `off`: stops the firmware at once (SIGKILL to its process group); nothing
 *   more is printed;
 * - `reset`: off then on;  `status`: answers `on` or `off`.
 *
 * Faults (faults.ts), for testing what a lab does with a failing board:
 *
 * - `fault boot-fail`, `fault hang`, `fault drop-serial` on the control
 *   socket: the next power-on meets that fault; `hang` and `drop-serial`
 *   while the firmware runs happen at once instead (the firmware freezes;
 *   the line goes away). `fault none` disarms. Each answers `ok`.
 * - STATE/faults.json, read at every power-on: rates per power-on and a
 *   seed, e.g. `{"bootFailure": 0.2, "hang": 0.1, "serialDrop": 0.1,
 *   "seed": 7}`; an armed fault goes first.
 *
 * The serial line going away is this process exiting (status 3): socat
 * then closes the pseudo-terminal and removes its link, as a USB serial
 * adapter unplugged (start.ts `replug` brings the board back, powered off).
 *
 * As on real hardware, output written while nobody has the device open is
 * lost; everything written to the line is also appended to STATE/serial.log.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { appendFileSync, existsSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { FAULTS, NO_FAULTS, drawFault, parseFaultRates, seededRandom, type Fault, type FaultRates } from "./faults.js";

const stateDir = process.argv[2];
if (stateDir === undefined) {
  process.stderr.write("usage: sim-board.ts STATE_DIR\n");
  process.exit(2);
}
const logFile = join(stateDir, "serial.log");
const firmwarePath = join(stateDir, "firmware.sh");
let firmware: ChildProcess | undefined;
let powered = false;
/** A fault commanded for the next power-on. */
let armed: Fault | undefined;
/** The rates last read and their generator (made anew when the seed changes). */
let rates: FaultRates = NO_FAULTS;
let random = seededRandom(NO_FAULTS.seed);
/** A serial drop waiting to happen after the boot. */
let dropTimer: NodeJS.Timeout | undefined;

/** The fault this power-on meets: the armed one, else one drawn from STATE/faults.json's rates. */
function faultOfPowerOn(): Fault | undefined {
  if (armed !== undefined) {
    const fault = armed;
    armed = undefined;
    return fault;
  }
  let read = NO_FAULTS;
  const file = join(stateDir!, "faults.json");
  if (existsSync(file)) {
    try {
      read = parseFaultRates(JSON.parse(readFileSync(file, "utf8")));
    } catch (err) {
      process.stderr.write(`sim-board: ignoring ${file}: ${err instanceof Error ? err.message : String(err)}\n`);
    }
  }
  if (read.seed !== rates.seed) random = seededRandom(read.seed);
  rates = read;
  return drawFault(rates, random);
}

/** The serial line goes away: this process ends, and socat with it (see the head comment). */
function dropSerial(): never {
  appendFileSync(logFile, "\n[serial line dropped]\n");
  powerOff();
  process.exit(3);
}

/** The firmware freezes: it prints nothing more and reads nothing. */
function freeze(): void {
  if (firmware?.pid === undefined) return;
  try {
    process.kill(-firmware.pid, "SIGSTOP");
  } catch {
    // Already gone.
  }
  appendFileSync(logFile, "\n[hung]\n");
}

function serial(text: string | Buffer): void {
  process.stdout.write(text);
  appendFileSync(logFile, text);
}

function powerOff(): void {
  powered = false;
  clearTimeout(dropTimer);
  if (firmware?.pid !== undefined && firmware.exitCode === null && firmware.signalCode === null) {
    try {
      process.kill(-firmware.pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  }
  firmware = undefined;
  appendFileSync(logFile, "\n[power off]\n");
}

function powerOn(): void {
  if (powered) return;
  powered = true;
  const fault = faultOfPowerOn();
  serial("\r\nSimBoard rev 1.0 -- power on\r\nROM: checking flash ... ");
  if (fault === "boot-fail") {
    serial("checksum error, halted\r\n");
    return;
  }
  if (fault === "hang") return appendFileSync(logFile, "\n[hung]\n");
  if (!existsSync(firmwarePath)) {
    serial("no firmware, halted\r\n");
    return;
  }
  serial("ok\r\nboot: starting firmware\r\n");
  if (fault === "drop-serial") dropTimer = setTimeout(dropSerial, 300);
  const child = spawn("/bin/sh", [firmwarePath], {
    cwd: stateDir,
    stdio: ["pipe", "pipe", "pipe"],
    detached: true,
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
  });
  firmware = child;
  const out = (bytes: Buffer) => {
    if (firmware === child) serial(bytes.toString("utf8").replace(/\r?\n/g, "\r\n"));
  };
  child.stdout.on("data", out);
  child.stderr.on("data", out);
  child.stdin.on("error", () => undefined);
  child.on("exit", () => {
    if (firmware === child) firmware = undefined;
  });
}

// Bytes from the serial line go to the running firmware; when off they vanish.
process.stdin.on("data", (bytes: Buffer) => {
  if (firmware?.stdin?.writable) firmware.stdin.write(bytes.toString("latin1").replace(/\r/g, "\n"));
});
process.stdin.on("end", () => {
  powerOff();
  process.exit(0);
});

const socketPath = join(stateDir, "control.sock");
rmSync(socketPath, { force: true });
const control = createServer((conn) => {
  let buffered = "";
  conn.on("data", (bytes: Buffer) => {
    buffered += bytes.toString("utf8");
    let nl: number;
    while ((nl = buffered.indexOf("\n")) !== -1) {
      const command = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      switch (command) {
        case "on":
          powerOn();
          conn.write("ok\n");
          break;
        case "off":
          powerOff();
          conn.write("ok\n");
          break;
        case "reset":
          powerOff();
          powerOn();
          conn.write("ok\n");
          break;
        case "status":
          conn.write(powered ? "on\n" : "off\n");
          break;
        case "fault none":
          armed = undefined;
          conn.write("ok\n");
          break;
        default: {
          const fault = FAULTS.find((f) => command === `fault ${f}`);
          if (fault === undefined) {
            conn.write(`error: unknown command ${JSON.stringify(command)}\n`);
            break;
          }
          // The line drops with the whole board: its control socket refuses from now on.
          if (fault === "drop-serial" && powered) control.close();
          conn.write("ok\n");
          if (fault === "drop-serial" && powered) conn.end(dropSerial);
          else if (fault === "hang" && firmware !== undefined) freeze();
          else armed = fault;
        }
      }
    }
  });
  conn.on("error", () => undefined);
});
control.listen(socketPath, () => process.stderr.write(`sim-board ready on ${socketPath}\n`));

for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
  process.on(signal, () => {
    powerOff();
    control.close();
    process.exit(0);
  });
}
