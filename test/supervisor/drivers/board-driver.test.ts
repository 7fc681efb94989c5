import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { mkdir, mkdtemp, readFile, realpath, rm, stat, symlink, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { createBoardDriver, parseBoardConfig, type BoardDriver } from "../../../supervisor/drivers/board-driver.js";
import { ControlRefused, DriverError } from "../../../supervisor/drivers/driver.js";
import { usbSerialOf } from "../../../supervisor/drivers/usb-serial.js";
import { simBoardCommand, startSimBoard, type SimBoard } from "../../../supervisor/sim-board/start.js";
import { buildBusyboxImage } from "../../support/images.js";
import { capturingLogger, CollectedOutput, socketClient, firmwareSpec as firmwareOf } from "./helpers.js";

let base: string;
let board: SimBoard;
let driver: BoardDriver;
const { logger } = capturingLogger();

const firmwareSpec = (script: string) => firmwareOf(base, script);

beforeAll(async () => {
  base = await mkdtemp("/tmp/treadmill-board-driver-");
  board = await startSimBoard({ dir: join(base, "board") });
  driver = createBoardDriver({ ...board.config, services: [{ name: "gdb", port: 2331 }] }, logger);
});

afterAll(async () => {
  await driver?.close();
  await board?.stop();
  await rm(base, { recursive: true, force: true });
});

describe("board driver with the simulated board", () => {
  it("flashes, boots, captures the serial console, maps the exit pattern and powers off", async () => {
    const script = 'echo "firmware one running"\necho TREADMILL_EXIT=0\n';
    const spec = await firmwareSpec(script);
    const stages: string[] = [];
    const prepared = await driver.prepare(spec, { onStage: (stage) => stages.push(stage) });
    expect(await readFile(join(board.stateDir, "firmware.sh"), "utf8")).toBe(script);
    const out = new CollectedOutput();
    const job = await driver.start(prepared, out, { onStage: (stage) => stages.push(stage) });
    expect(stages).toEqual(["allocating", "provisioning", "booting"]);
    const exit = await job.exited;
    expect(exit).toMatchObject({ exitCode: 0, status: "success", stopped: false });
    expect(out.text("console")).toContain("SimBoard rev 1.0");
    expect(out.text("console")).toContain("firmware one running");
    expect(job.status()).toBe("exited");
    expect(await board.status()).toBe("off");
    await driver.cleanup(job);
  });

  it("reflashes between jobs and maps a non-zero exit code to failure", async () => {
    const spec = await firmwareSpec('echo "firmware two running"\necho TREADMILL_EXIT=3\n');
    const out = new CollectedOutput();
    const job = await driver.start(await driver.prepare(spec), out);
    expect(await job.exited).toMatchObject({ exitCode: 3, status: "failure", stopped: false });
    expect(out.text("console")).toContain("firmware two running");
    expect(out.text("console")).not.toContain("firmware one");
    await driver.cleanup(job);
  });

  it("bridges the serial console to a unix socket and exposes only the console and the configured services, not what a job declares", async () => {
    const spec = await firmwareSpec('echo ready\nread line\necho "got:$line"\necho TREADMILL_EXIT=0\n');
    spec.exposedPorts = [
      { name: "db", port: 5432 },
      { name: "gdb", port: 2331 },
    ];
    const out = new CollectedOutput();
    const job = await driver.start(await driver.prepare(spec), out);
    expect(job.exposures().map((e) => e.name)).toEqual(["console", "gdb"]);
    expect(job.exposures()[1]).toMatchObject({ kind: "tcp", host: "127.0.0.1", port: 2331 });
    expect(out.text("supervisor")).toMatch(/port db is not exposed: board \S+ exposes its console and its configured services only/);
    const exposure = job.exposures().find((e) => e.name === "console")!;
    expect(exposure).toMatchObject({ kind: "console" });
    if (!("path" in exposure)) throw new Error("the console is not a unix socket");
    expect((await stat(exposure.path)).mode & 0o777).toBe(0o600);
    const client = await socketClient(exposure.path);
    await out.waitFor("console", /ready/);
    client.socket.write("ping\r");
    await client.waitFor(/got:ping/);
    expect(await job.exited).toMatchObject({ exitCode: 0, status: "success" });
    client.socket.destroy();
    await driver.cleanup(job);
  });

  it("stops a job by powering the board off", async () => {
    const spec = await firmwareSpec('echo looping\nwhile true; do sleep 1; done\n');
    const out = new CollectedOutput();
    const job = await driver.start(await driver.prepare(spec), out);
    await out.waitFor("console", /looping/);
    expect(await board.status()).toBe("on");
    await driver.stop(job);
    expect(await job.exited).toMatchObject({ exitCode: null, status: "failure", stopped: true });
    expect(await board.status()).toBe("off");
    expect(job.exposures()).toEqual([]);
    await driver.cleanup(job);
  });

  it("ends a job as the host's failure, at once, when the board's serial line goes away while it runs", async () => {
    // A board of its own: its serial device vanishes (as a USB adapter unplugged, or the simulated board killed).
    const gone = await startSimBoard({ dir: join(base, "board-gone") });
    const own = createBoardDriver(gone.config, logger);
    try {
      const spec = await firmwareSpec('echo looping\nwhile true; do sleep 1; done\n');
      const out = new CollectedOutput();
      const job = await own.start(await own.prepare(spec), out);
      await out.waitFor("console", /looping/);
      await gone.stop();
      const exit = await job.exited;
      expect(exit).toMatchObject({ exitCode: null, status: "failure", stopped: false });
      expect(exit.failure).toBeInstanceOf(DriverError);
      expect(exit.failure?.message).toMatch(/serial line of board \S+ closed while the job ran/);
      expect(out.text("supervisor")).toMatch(/serial line of board \S+ closed while the job ran/);
      await own.cleanup(job);
    } finally {
      await own.close();
      await gone.stop();
    }
  });

  it("captures nothing the serial line held from before the job, such as an earlier run's exit line", async () => {
    // An earlier run left on (its supervisor died): its output waits in the line, nobody reading it.
    await writeFile(join(board.stateDir, "firmware.sh"), "echo stale output\necho TREADMILL_EXIT=7\nwhile true; do sleep 1; done\n");
    await simBoardCommand(board.stateDir, "on");
    const deadline = Date.now() + 10_000;
    while (!(await readFile(join(board.stateDir, "serial.log"), "utf8")).includes("TREADMILL_EXIT=7")) {
      if (Date.now() > deadline) throw new Error("the earlier run printed nothing");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const spec = await firmwareSpec('sleep 1\necho "fresh output"\necho TREADMILL_EXIT=0\n');
    const out = new CollectedOutput();
    const job = await driver.start(await driver.prepare(spec), out);
    expect(await job.exited).toMatchObject({ exitCode: 0, status: "success", stopped: false });
    expect(out.text("console")).toContain("fresh output");
    expect(out.text("console")).not.toContain("stale output");
    expect(out.text("supervisor")).toMatch(/discarded \d+ bytes the serial line held from before this job/);
    await driver.cleanup(job);
  });

  it("waits within its retry budget for a board that is away, then runs the job on it", async () => {
    const dir = join(base, "board-away");
    const away = await startSimBoard({ dir });
    await away.stop(); // its control socket refuses, its serial device is gone
    const own = createBoardDriver({ ...away.config, retryBudgetMs: 120_000 }, logger);
    let back: SimBoard | undefined;
    try {
      const spec = await firmwareSpec('echo "back again"\necho TREADMILL_EXIT=0\n');
      const notices: string[] = [];
      let retried: () => void = () => undefined;
      const retrying = new Promise<void>((resolve) => (retried = resolve));
      const preparing = own.prepare(spec, {
        onStage: (_stage, message) => {
          notices.push(message);
          if (/retrying/.test(message)) retried();
        },
      });
      await Promise.race([
        retrying,
        preparing.then(() => {
          throw new Error("the stopped board answered its power command");
        }),
      ]);
      back = await startSimBoard({ dir });
      const out = new CollectedOutput();
      const job = await own.start(await preparing, out);
      expect(await job.exited).toMatchObject({ exitCode: 0, status: "success", stopped: false });
      expect(out.text("console")).toContain("back again");
      expect(notices.find((m) => /retrying/.test(m))).toMatch(/^powering off failed \(board command failed \(exit \d+\): .*\); retrying in [\d.]+ s$/);
      await own.cleanup(job);
    } finally {
      await own.close();
      await back?.stop();
    }
  }, 90_000); // retries back off up to 15 s, and a simulated board takes seconds to start here

  it("fails the start once a board stays away longer than its retry budget", async () => {
    const away = await startSimBoard({ dir: join(base, "board-gone-for-good") });
    await away.stop();
    const own = createBoardDriver({ ...away.config, retryBudgetMs: 1500 }, logger);
    try {
      const started = Date.now();
      const err = await own.prepare(await firmwareSpec("echo never\n")).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DriverError);
      expect(err).toMatchObject({ reason: "start", message: expect.stringMatching(/^board command failed/) });
      expect(Date.now() - started).toBeGreaterThanOrEqual(1500);
    } finally {
      await own.close();
    }
  });

  it("fails the start when the board does not boot within the boot timeout", async () => {
    const dead = createBoardDriver({ ...board.config, commands: { ...board.config.commands, powerOn: "true" }, bootTimeoutMs: 1000 }, logger);
    const spec = await firmwareSpec("echo never\n");
    const prepared = await dead.prepare(spec);
    const err = await dead.start(prepared, new CollectedOutput()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DriverError);
    expect(err).toMatchObject({ reason: "start", message: expect.stringMatching(/did not boot within 1000 ms/) });
    await dead.cleanup(prepared);
    expect(await board.status()).toBe("off");
  });

  it("refuses an image without a firmware layer and a configuration with missing fields", async () => {
    const image = await buildBusyboxImage({ dir: join(base, "images") });
    await expect(driver.prepare({ jobId: "no-firmware", attempt: 1, parameters: [], image })).rejects.toMatchObject({ reason: "image" });
    expect(() => parseBoardConfig({ name: "b", serial: { device: "/dev/x" }, commands: {}, bootTimeoutMs: 0 })).toThrow(
      /serial\.baud.*commands\.powerOn.*commands\.powerOff.*commands\.flash.*bootTimeoutMs/,
    );
  });

  it("power-cycles the board mid-job: the console shows it booting again and the job goes on to its end", async () => {
    // The firmware counts its boots in the board's state directory and ends the job on its second boot.
    await rm(join(board.stateDir, "boots"), { force: true });
    const spec = await firmwareSpec(
      'n=$(cat boots 2>/dev/null || echo 0); n=$((n+1)); echo $n > boots\necho "boot number $n"\n[ $n -ge 2 ] && echo TREADMILL_EXIT=0\nwhile true; do sleep 1; done\n',
    );
    const out = new CollectedOutput();
    const job = await driver.start(await driver.prepare(spec), out);
    await out.waitFor("console", /boot number 1/);
    expect(await driver.control(job, "power-cycle")).toBe("board sim-board power-cycled");
    await out.waitFor("console", /boot number 2/);
    expect(out.text("console").match(/SimBoard rev 1\.0 -- power on/g)).toHaveLength(2);
    expect(await job.exited).toMatchObject({ exitCode: 0, status: "success", stopped: false });
    await driver.cleanup(job);
  });

  it("powers a running job's board off and on, and resets it, with the board's commands", async () => {
    const spec = await firmwareSpec('echo "up"\nwhile true; do sleep 1; done\n');
    const out = new CollectedOutput();
    const job = await driver.start(await driver.prepare(spec), out);
    await out.waitFor("console", /up/);
    expect(await driver.control(job, "power-off")).toBe("board sim-board powered off");
    expect(await board.status()).toBe("off");
    expect(job.status()).toBe("running");
    expect(await driver.control(job, "power-on")).toBe("board sim-board powered on");
    expect(await board.status()).toBe("on");
    await out.waitFor("console", /up[\s\S]*up/);
    expect(await driver.control(job, "reset")).toBe("board sim-board reset");
    await out.waitFor("console", /up[\s\S]*up[\s\S]*up/);
    await driver.stop(job);
    await expect(driver.control(job, "reset")).rejects.toBeInstanceOf(ControlRefused);
    expect(await board.status()).toBe("off");
    await driver.cleanup(job);
  });

  it("reports a board power command that fails as unavailable and keeps the job running", async () => {
    // Tried again within the boot timeout, then refused.
    const broken = createBoardDriver({ ...board.config, bootTimeoutMs: 1000, commands: { ...board.config.commands, reset: "echo relay stuck >&2; exit 4" } }, logger);
    try {
      const out = new CollectedOutput();
      const job = await broken.start(await broken.prepare(await firmwareSpec('echo "up"\nwhile true; do sleep 1; done\n')), out);
      await out.waitFor("console", /up/);
      const err = await broken.control(job, "reset").catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ControlRefused);
      expect(err).toMatchObject({ why: "unavailable", message: expect.stringMatching(/board command failed \(exit 4\): relay stuck/) });
      expect(job.status()).toBe("running");
      await broken.cleanup(job);
    } finally {
      await broken.close();
    }
  });

  it("refuses to flash or run a board whose serial device belongs to another usb serial number", async () => {
    // A sysfs tree of its own: the board's pty is a tty of the usb device SIM-0001.
    const sys = join(base, "sys");
    const usb = join(sys, "devices", "pci0000:00", "usb1", "1-1");
    await mkdir(join(usb, "1-1:1.0", "tty"), { recursive: true });
    await writeFile(join(usb, "idVendor"), "1366\n");
    await writeFile(join(usb, "serial"), "SIM-0001\n");
    const tty = basename(await realpath(board.device));
    await mkdir(join(sys, "class", "tty", tty), { recursive: true });
    await symlink(join(usb, "1-1:1.0"), join(sys, "class", "tty", tty, "device"));
    expect(await usbSerialOf(board.device, sys)).toBe("SIM-0001");
    await writeFile(join(board.stateDir, "firmware.sh"), "echo old firmware\n");

    const wrong = createBoardDriver({ ...board.config, serialNumber: "SIM-0002" }, logger, { sysRoot: sys });
    const err = await wrong.prepare(await firmwareSpec("echo never\n")).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DriverError);
    expect(err).toMatchObject({
      reason: "start",
      message: expect.stringMatching(/serial device \S+ belongs to usb serial SIM-0001, not to board sim-board \(SIM-0002\): refusing to flash or run it/),
    });
    expect(await readFile(join(board.stateDir, "firmware.sh"), "utf8")).toBe("echo old firmware\n");
    await wrong.close();

    const right = createBoardDriver({ ...board.config, serialNumber: "SIM-0001" }, logger, { sysRoot: sys });
    try {
      const job = await right.start(await right.prepare(await firmwareSpec("echo TREADMILL_EXIT=0\n")), new CollectedOutput());
      expect(await job.exited).toMatchObject({ exitCode: 0, status: "success" });
      await right.cleanup(job);
    } finally {
      await right.close();
    }
    const unknown = createBoardDriver({ ...board.config, serialNumber: "SIM-0001" }, logger, { sysRoot: join(base, "empty-sys") });
    await expect(unknown.prepare(await firmwareSpec("echo never\n"))).rejects.toMatchObject({ message: expect.stringMatching(/has no usb serial number/) });
    await unknown.close();
  });
});
