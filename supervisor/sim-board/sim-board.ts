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
 * As on real hardware, output written while nobody has the device open is
 * lost; everything written to the line is also appended to STATE/serial.log.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { appendFileSync, existsSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";

const stateDir = process.argv[2];
if (stateDir === undefined) {
  process.stderr.write("usage: sim-board.ts STATE_DIR\n");
  process.exit(2);
}
const logFile = join(stateDir, "serial.log");
const firmwarePath = join(stateDir, "firmware.sh");
let firmware: ChildProcess | undefined;
let powered = false;

function serial(text: string | Buffer): void {
  process.stdout.write(text);
  appendFileSync(logFile, text);
}

function powerOff(): void {
  powered = false;
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
  serial("\r\nSimBoard rev 1.0 -- power on\r\nROM: checking flash ... ");
  if (!existsSync(firmwarePath)) {
    serial("no firmware, halted\r\n");
    return;
  }
  serial("ok\r\nboot: starting firmware\r\n");
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
        default:
          conn.write(`error: unknown command ${JSON.stringify(command)}\n`);
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
