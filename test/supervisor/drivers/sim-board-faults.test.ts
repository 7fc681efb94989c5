/**
 * The simulated board's faults (issue #21), each seen through the board
 * driver as a lab sees a failing board: a boot failure and a hang fail the
 * start (HOST_START_FAILURE), a dropped serial line ends the running job as
 * the host's failure; commanded on the control socket or drawn from seeded
 * rates.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { createBoardDriver, type BoardDriver } from "../../../supervisor/drivers/board-driver.js";
import { DriverError } from "../../../supervisor/drivers/driver.js";
import { drawFault, parseFaultRates, seededRandom } from "../../../supervisor/sim-board/faults.js";
import { simBoardCommand, startSimBoard, type SimBoard } from "../../../supervisor/sim-board/start.js";
import { waitUntil } from "../../support/wait.js";
import { capturingLogger, CollectedOutput, firmwareSpec as firmwareOf } from "./helpers.js";

let base: string;
let board: SimBoard;
let driver: BoardDriver;
const { logger } = capturingLogger();

const firmwareSpec = (script: string) => firmwareOf(base, script);

const LOOP = 'echo "firmware up"\nwhile true; do sleep 1; done\n';

beforeAll(async () => {
  base = await mkdtemp("/tmp/treadmill-sim-faults-");
  board = await startSimBoard({ dir: join(base, "board"), bootTimeoutMs: 1500, replug: true });
  driver = createBoardDriver(board.config, logger);
});

afterAll(async () => {
  await driver?.close();
  await board?.stop();
  await rm(base, { recursive: true, force: true });
});

describe("simulated board faults through the board driver", () => {
  it("fails the start when the board is told to fail its next boot, and boots normally after", async () => {
    expect(await simBoardCommand(board.stateDir, "fault boot-fail")).toBe("ok");
    const out = new CollectedOutput();
    const prepared = await driver.prepare(await firmwareSpec(LOOP));
    const err = await driver.start(prepared, out).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DriverError);
    expect(err).toMatchObject({ reason: "start", message: expect.stringMatching(/did not boot within 1500 ms/) });
    expect(out.text("console")).toContain("checksum error, halted");
    await driver.cleanup(prepared);

    const again = new CollectedOutput();
    const job = await driver.start(await driver.prepare(await firmwareSpec("echo TREADMILL_EXIT=0\n")), again);
    expect(await job.exited).toMatchObject({ exitCode: 0, status: "success" });
    await driver.cleanup(job);
  });

  it("fails the start when the board hangs in its boot, printing nothing more", async () => {
    expect(await simBoardCommand(board.stateDir, "fault hang")).toBe("ok");
    const out = new CollectedOutput();
    const prepared = await driver.prepare(await firmwareSpec(LOOP));
    await expect(driver.start(prepared, out)).rejects.toMatchObject({ reason: "start", message: expect.stringMatching(/did not boot/) });
    expect(out.text("console")).toMatch(/ROM: checking flash \.\.\. $/);
    await driver.cleanup(prepared);
  });

  it("freezes the running firmware on command: the console falls silent while the job goes on", async () => {
    const out = new CollectedOutput();
    const job = await driver.start(await driver.prepare(await firmwareSpec('echo up\nwhile read line; do echo "echo:$line"; done\n')), out);
    await out.waitFor("console", /up/);
    job.writeConsole(Buffer.from("one\r"));
    await out.waitFor("console", /echo:one/);
    expect(await simBoardCommand(board.stateDir, "fault hang")).toBe("ok");
    await waitUntil(async () => (await readFile(join(board.stateDir, "serial.log"), "utf8")).endsWith("[hung]\n"), "the firmware to freeze", 10_000);
    job.writeConsole(Buffer.from("two\r"));
    // The board answers its control socket (it is alive) yet the firmware says nothing more.
    expect(await board.status()).toBe("on");
    expect(out.text("console")).not.toContain("echo:two");
    expect(job.status()).toBe("running");
    await driver.stop(job);
    await driver.cleanup(job);
  });

  it("ends the running job as the host's failure when the board drops its serial line, and the board comes back", async () => {
    const out = new CollectedOutput();
    const job = await driver.start(await driver.prepare(await firmwareSpec(LOOP)), out);
    await out.waitFor("console", /firmware up/);
    expect(await simBoardCommand(board.stateDir, "fault drop-serial")).toBe("ok");
    const exit = await job.exited;
    expect(exit).toMatchObject({ exitCode: null, status: "failure", stopped: false });
    expect(exit.failure).toBeInstanceOf(DriverError);
    expect(exit.failure).toMatchObject({ reason: "internal", message: expect.stringMatching(/serial line of board \S+ closed while the job ran/) });
    await driver.cleanup(job);
    // Replugged: the board answers again, powered off, and runs the next job.
    await waitUntil(() => board.status().then((s) => s === "off", () => false), "the board to come back", 30_000);
    const next = await driver.start(await driver.prepare(await firmwareSpec("echo TREADMILL_EXIT=0\n")), new CollectedOutput());
    expect(await next.exited).toMatchObject({ exitCode: 0, status: "success" });
    await driver.cleanup(next);
  });

  it("keeps a job across a power cycle that takes the serial line away with the board's power, and opens the line again", async () => {
    // A board whose USB serial adapter is powered by the board: power off drops the line; it comes back (replugged) at power on.
    const control = (command: string) => `printf '%s\\n' '${command}' | socat -t 5 - UNIX-CONNECT:${join(board.stateDir, "control.sock")}`;
    const own = createBoardDriver(
      {
        ...board.config,
        // The board comes back by starting again: seconds on a loaded machine.
        bootTimeoutMs: 45_000,
        commands: { ...board.config.commands, powerOff: `if [ "$(${control("status")})" = on ]; then ${control("fault drop-serial")}; fi` },
      },
      logger,
    );
    try {
      const counter = `boots-${Date.now()}`;
      const out = new CollectedOutput();
      const job = await own.start(
        await own.prepare(
          await firmwareSpec(
            `n=$(cat ${counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > ${counter}\nwhile true; do echo "alive $n"; [ $n -ge 2 ] && echo TREADMILL_EXIT=0; sleep 0.2; done\n`,
          ),
        ),
        out,
      );
      await out.waitFor("console", /alive 1/);
      expect(await own.control(job, "power-cycle")).toBe("board sim-board power-cycled");
      expect(await job.exited).toMatchObject({ exitCode: 0, status: "success", stopped: false });
      expect(out.text("console")).toContain("alive 2");
      expect(out.text("supervisor")).toMatch(/serial line of board sim-board opened again after power on/);
      await own.cleanup(job);
    } finally {
      await own.close();
    }
  }, 150_000);

  it("meets faults at the configured rates: a board whose boots always fail never starts a job", async () => {
    await writeFile(join(board.stateDir, "faults.json"), JSON.stringify({ bootFailure: 1, seed: 3 }));
    try {
      const prepared = await driver.prepare(await firmwareSpec(LOOP));
      const out = new CollectedOutput();
      await expect(driver.start(prepared, out)).rejects.toMatchObject({ reason: "start" });
      expect(out.text("console")).toContain("checksum error, halted");
      await driver.cleanup(prepared);
    } finally {
      await rm(join(board.stateDir, "faults.json"), { force: true });
    }
  });

  it("draws the same faults from the same seed, at about the configured rates", () => {
    const rates = parseFaultRates({ bootFailure: 0.2, hang: 0.1, serialDrop: 0.1, seed: 42 });
    const draw = (seed: number) => {
      const random = seededRandom(seed);
      return Array.from({ length: 2000 }, () => drawFault(rates, random));
    };
    const first = draw(42);
    expect(draw(42)).toEqual(first);
    expect(draw(43)).not.toEqual(first);
    const share = (f: string | undefined) => first.filter((x) => x === f).length / first.length;
    expect(share("boot-fail")).toBeCloseTo(0.2, 1);
    expect(share("hang")).toBeCloseTo(0.1, 1);
    expect(share("drop-serial")).toBeCloseTo(0.1, 1);
    expect(share(undefined)).toBeCloseTo(0.6, 1);
    expect(() => parseFaultRates({ bootFailure: 2, hang: -1, seed: 1.5, flaky: true })).toThrow(
      /bootFailure must be a probability.*hang must be a probability.*seed must be an integer.*flaky is not a known field/,
    );
    expect(() => parseFaultRates({ bootFailure: 0.6, hang: 0.6 })).toThrow(/add up to at most 1/);
  });
});
