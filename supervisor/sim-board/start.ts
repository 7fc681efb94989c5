/**
 * Starts a simulated board (sim-board.ts) behind a socat pseudo-terminal and
 * hands back its serial device and a board-driver configuration whose
 * commands drive it. Used by the tests and by the all-in-one testbed.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { connect } from "node:net";
import { mkdir, realpath, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { COMPILED, PACKAGE_ROOT, packagePath } from "../../lib/package.js";
import type { BoardConfig } from "../drivers/board-driver.js";
import { shellQuote } from "../drivers/sandbox.js";
import { parseFaultRates, type FaultRates } from "./faults.js";

/** The board's program and how to run it: the bundle when compiled, else the source through tsx. */
const PROGRAM = COMPILED ? packagePath("dist", "sim-board.js") : packagePath("supervisor", "sim-board", "sim-board.ts");
const RUN = COMPILED ? `${process.execPath} --enable-source-maps` : `${process.execPath} --import tsx`;

export interface SimBoard {
  /** The serial device (a symbolic link to the pty socat made). */
  device: string;
  /** The board's state directory (firmware.sh, serial.log, control.sock). */
  stateDir: string;
  /** A board-driver configuration for this board. */
  config: BoardConfig;
  /** Asks the board whether it is powered. */
  status(): Promise<"on" | "off">;
  /** Stops socat and the board, resolving once the board's control socket refuses. Idempotent. */
  stop(): Promise<void>;
}

/** Sends one control command to a running board and returns its answer. */
export function simBoardCommand(stateDir: string, command: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(join(stateDir, "control.sock"));
    let answer = "";
    socket.on("data", (b: Buffer) => {
      answer += b.toString("utf8");
      if (answer.includes("\n")) {
        socket.end();
        resolve(answer.trim());
      }
    });
    socket.on("error", reject);
    socket.write(`${command}\n`);
  });
}

/** Resolves once nothing listens on the board's control socket any more (at most 10 s). */
async function controlGone(stateDir: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const listening = await new Promise<boolean>((resolve) => {
      const socket = connect(join(stateDir, "control.sock"));
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
    if (!listening) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`sim board in ${stateDir} still answers 10 s after it was stopped`);
}

/** Spawns socat with the board behind it; resolves once the board answers and its device exists. */
async function launch(stateDir: string, device: string): Promise<{ socat: ChildProcess; exited: Promise<number | null> }> {
  await rm(device, { force: true });
  const socat: ChildProcess = spawn(
    "socat",
    [`pty,raw,echo=0,link=${device}`, `EXEC:${RUN} ${PROGRAM} ${stateDir}`],
    { cwd: PACKAGE_ROOT, stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  const exited = new Promise<number | null>((resolve) => socat.once("exit", (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error(`sim board did not start within 30 s: ${stderr}`)), 30000);
    const check = async () => {
      if (!stderr.includes("sim-board ready")) return;
      try {
        await stat(device);
      } catch {
        return;
      }
      clearTimeout(timer);
      resolve();
    };
    const fail = (err: Error) => {
      clearTimeout(timer);
      socat.kill("SIGKILL");
      reject(err);
    };
    socat.stderr!.on("data", (b: Buffer) => {
      stderr += b.toString("utf8");
      void check();
    });
    void exited.then(() => fail(new Error(`sim board exited: ${stderr}`)));
  });
  return { socat, exited };
}

/**
 * Starts a simulated board in `dir` (created). `options.name` names it in the
 * config; `bootTimeoutMs` and `exitPattern` go to the config as given.
 * `faults` writes the board's fault rates (STATE/faults.json, see
 * sim-board.ts); `replug` starts the board again, powered off, whenever it
 * ends by itself (its serial line dropped), as a USB adapter plugged back.
 */
export async function startSimBoard(options: {
  dir: string;
  name?: string;
  bootTimeoutMs?: number;
  exitPattern?: string;
  services?: { name: string; port: number }[];
  faults?: Partial<FaultRates>;
  replug?: boolean;
}): Promise<SimBoard> {
  await mkdir(options.dir, { recursive: true });
  const stateDir = await realpath(options.dir);
  if (/[,:!'"\s]/.test(stateDir + PROGRAM)) throw new Error(`sim board path ${stateDir} must not contain , : ! quotes or spaces`);
  const device = join(stateDir, "tty");
  if (options.faults !== undefined) {
    await writeFile(join(stateDir, "faults.json"), JSON.stringify(parseFaultRates(options.faults)));
  }
  let current = await launch(stateDir, device);
  let stopped: Promise<void> | undefined;
  let replugs = Promise.resolve();
  const watch = (running: typeof current) => {
    void running.exited.then(() => {
      if (stopped !== undefined || !options.replug) return;
      replugs = launch(stateDir, device).then(
        (next) => {
          current = next;
          if (stopped !== undefined) next.socat.kill("SIGTERM");
          watch(next);
        },
        () => undefined,
      );
    });
  };
  watch(current);
  const ctl = (command: string) =>
    `printf '%s\\n' ${command} | socat -t 5 - UNIX-CONNECT:${shellQuote(join(stateDir, "control.sock"))}`;
  const config: BoardConfig = {
    name: options.name ?? "sim-board",
    serial: { device, baud: 115200 },
    commands: {
      powerOn: ctl("on"),
      powerOff: ctl("off"),
      reset: ctl("reset"),
      flash: `cp {image} ${shellQuote(join(stateDir, "firmware.sh"))}`,
    },
    bootPattern: "boot: starting firmware",
    bootTimeoutMs: options.bootTimeoutMs ?? 20000,
    ...(options.exitPattern === undefined ? { exitPattern: "TREADMILL_EXIT=(\\d+)" } : { exitPattern: options.exitPattern }),
    services: options.services ?? [],
  };
  return {
    device,
    stateDir,
    config,
    status: async () => ((await simBoardCommand(stateDir, "status")) === "on" ? "on" : "off"),
    stop() {
      stopped ??= (async () => {
        await replugs;
        const { socat, exited } = current;
        socat.kill("SIGTERM");
        const timer = setTimeout(() => socat.kill("SIGKILL"), 5000);
        await exited;
        clearTimeout(timer);
        // The board is socat's child and outlives it for a moment: until it is
        // gone, its control socket still answers.
        await controlGone(stateDir);
      })();
      return stopped;
    },
  };
}
