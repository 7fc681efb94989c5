/**
 * Hold on failure in the drivers (JobSpecForDriver.holdOnFailure, issue
 * #22), with the real process driver (bubblewrap, slot uids) and the board
 * driver on a simulated board: a failed workload's host is kept as it is,
 * its console and control work until `stop`, and nothing else is held.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { chmod, mkdtemp, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { createBoardDriver, type BoardDriver } from "../../../supervisor/drivers/board-driver.js";
import type { JobSpecForDriver, RunningJob } from "../../../supervisor/drivers/driver.js";
import { createProcessDriver, type ProcessDriver } from "../../../supervisor/drivers/process-driver.js";
import { startSimBoard, type SimBoard } from "../../../supervisor/sim-board/start.js";
import { buildBusyboxImage, type TestImage } from "../../support/images.js";
import { capturingLogger, CollectedOutput, firmwareSpec, socketClient } from "./helpers.js";

let base: string;
let image: TestImage;
let processes: ProcessDriver;
let board: SimBoard;
let boards: BoardDriver;
const { logger } = capturingLogger();
let counter = 0;

const consolePath = (job: RunningJob) => {
  const exposure = job.exposures().find((e) => e.name === "console");
  if (exposure === undefined || !("path" in exposure)) throw new Error("no console socket");
  return exposure.path;
};

function processSpec(script: string, holdOnFailure = true): JobSpecForDriver {
  return { jobId: `hold-${process.pid}-${++counter}`, attempt: 1, parameters: [], entrypoint: ["/bin/sh", "-c", script], image, holdOnFailure };
}

beforeAll(async () => {
  base = await mkdtemp("/tmp/treadmill-hold-");
  await chmod(base, 0o711);
  image = await buildBusyboxImage({ dir: join(base, "images"), entrypoint: ["/bin/true"] });
  processes = await createProcessDriver({ workDir: join(base, "work"), slots: 1, graceMs: 2000, logger });
  board = await startSimBoard({ dir: join(base, "board") });
  boards = createBoardDriver(board.config, logger);
});

afterAll(async () => {
  await processes?.close();
  await boards?.close();
  await board?.stop();
  await rm(base, { recursive: true, force: true });
});

describe("holding a failed job's host", () => {
  it("keeps a failed process job's files with a shell in them on its console until stop, then cleans up", async () => {
    const out = new CollectedOutput();
    const job = await processes.start(await processes.prepare(processSpec("echo evidence > /root/evidence; exit 7")), out);
    expect(await job.exited).toMatchObject({ exitCode: 7, status: "failure", stopped: false });
    expect(job.status()).toBe("held");
    expect(out.text("supervisor")).toContain("job held: a shell in the job's files is on its console until the hold ends");

    const client = await socketClient(consolePath(job));
    client.socket.write("cat /root/evidence; id -u\n");
    await client.waitFor(/evidence/);
    await out.waitFor("console", /job held after its workload failed \(workload exited with code 7\)/);
    client.socket.destroy();

    const jobDir = (job.prepared as unknown as { jobDir: string }).jobDir;
    await processes.stop(job, { graceMs: 1000 });
    expect(job.status()).toBe("exited");
    expect(job.exposures()).toEqual([]);
    await processes.cleanup(job);
    await expect(stat(jobDir)).rejects.toThrow(/ENOENT/);
  });

  it("holds neither a process job that succeeded, nor one that was stopped, nor one that did not ask", async () => {
    for (const [spec, stop] of [
      [processSpec("exit 0"), false],
      [processSpec("exec sleep 100000"), true],
      [processSpec("exit 3", false), false],
    ] as const) {
      const job = await processes.start(await processes.prepare(spec), new CollectedOutput());
      if (stop) await processes.stop(job, { graceMs: 500 });
      await job.exited;
      expect(job.status()).toBe("exited");
      await processes.cleanup(job);
    }
  });

  it("keeps a failed board job's board powered with its serial console and power control until stop, then powers it off", async () => {
    const spec = { ...(await firmwareSpec(base, 'echo up\necho TREADMILL_EXIT=4\nwhile read line; do echo "pm:$line"; done\n')), holdOnFailure: true };
    const out = new CollectedOutput();
    const job = await boards.start(await boards.prepare(spec), out);
    expect(await job.exited).toMatchObject({ exitCode: 4, status: "failure", stopped: false });
    expect(job.status()).toBe("held");
    expect(await board.status()).toBe("on");

    const client = await socketClient(consolePath(job));
    client.socket.write("look\r");
    await client.waitFor(/pm:look/);
    client.socket.destroy();
    expect(await boards.control(job, "power-cycle")).toMatch(/power-cycled/);
    await out.waitFor("console", /TREADMILL_EXIT=4[\s\S]*power on[\s\S]*up/);
    expect(job.status()).toBe("held");

    await boards.stop(job);
    expect(job.status()).toBe("exited");
    expect(await board.status()).toBe("off");
    await boards.cleanup(job);
  });
});
