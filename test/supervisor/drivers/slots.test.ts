import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { SlotTakenError } from "../../../supervisor/drivers/machine.js";
import { createProcessDriver } from "../../../supervisor/drivers/process-driver.js";
import { buildBusyboxImage, type TestImage } from "../../support/images.js";
import { startProcess } from "../../support/process.js";
import { capturingLogger, CollectedOutput } from "./helpers.js";

/**
 * Supervisors sharing a machine (issue #18 defect 5): slot uids are claimed
 * machine-wide (/run/treadmill/slots), by real supervisor processes, and a
 * job's end kills only what its own sandbox started.
 */
let base: string;
let image: TestImage;
const { logger } = capturingLogger();

beforeAll(async () => {
  base = await mkdtemp("/tmp/treadmill-slots-");
  await chmod(base, 0o711);
  image = await buildBusyboxImage({ dir: join(base, "images"), entrypoint: ["/bin/sh", "-c", "true"] });
});

afterAll(async () => {
  await rm(base, { recursive: true, force: true });
});

/** A real supervisor process with no coordinator to reach (it claims its slots at start and keeps retrying). */
function supervisorProcess(name: string, slotUidBase: string) {
  return startProcess("bin/treadmill-supervisor.js", [
    "--coordinator-url", "http://127.0.0.1:9",
    "--name", name,
    "--work-dir", join(base, name),
    "--slot-uid-base", slotUidBase,
    "--capacity", "2",
  ]);
}

describe("slot uids shared by the supervisors of one machine", () => {
  it("claims slots machine-wide: a second supervisor on the same slots refuses to start, naming the holder's pid, and gets them once the holder died", async () => {
    const holder = supervisorProcess("holder", "auto");
    try {
      const claimed = JSON.parse(await holder.waitForLine(/"slot uids claimed"/, 60000)) as { uidBase: number };
      expect(claimed.uidBase).toBeGreaterThanOrEqual(63000);

      // Another supervisor process on a slot of the same range: refused at its start.
      const second = supervisorProcess("second", String(claimed.uidBase + 1));
      expect(await second.exited).toBe(1);
      const refusal = `slot uid ${claimed.uidBase + 1} is held by another supervisor, pid ${holder.child.pid} (holder)`;
      expect(second.lines.join("\n")).toContain(refusal);

      // A driver in this process: refused too, with the same message.
      const err = await createProcessDriver({ workDir: join(base, "in-process"), slots: 1, slotUidBase: claimed.uidBase, logger }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SlotTakenError);
      expect((err as Error).message).toContain(`slot uid ${claimed.uidBase} is held by another supervisor, pid ${holder.child.pid} (holder)`);

      // The holder dies without a chance to let go: the kernel releases its claim.
      holder.child.kill("SIGKILL");
      await holder.exited;
      const driver = await createProcessDriver({ workDir: join(base, "in-process"), slots: 2, slotUidBase: claimed.uidBase, logger });
      expect(driver.slotUidBase).toBe(claimed.uidBase);
      await driver.close();
    } finally {
      holder.child.kill("SIGKILL");
      await holder.exited;
    }
  }, 120000);

  it("gives two supervisors with default settings slots of their own: a job ending on one kills nothing of the other's", async () => {
    const one = await createProcessDriver({ workDir: join(base, "one"), logger, graceMs: 1000 });
    const two = await createProcessDriver({ workDir: join(base, "two"), logger, graceMs: 1000 });
    try {
      expect(one.slotUidBase).not.toBe(two.slotUidBase);
      const long = new CollectedOutput();
      const longJob = await one.start(
        await one.prepare({ jobId: "long", attempt: 1, parameters: [], image, entrypoint: ["/bin/sh", "-c", "echo ready; exec sh -i"] }),
        long,
      );
      await long.waitFor("console", /ready/);

      const short = new CollectedOutput();
      const shortJob = await two.start(await two.prepare({ jobId: "short", attempt: 1, parameters: [], image, entrypoint: ["/bin/sh", "-c", "echo bye"] }), short);
      expect(await shortJob.exited).toMatchObject({ exitCode: 0, status: "success" });
      await two.cleanup(shortJob);

      // The first supervisor's job runs on and answers.
      expect(longJob.status()).toBe("running");
      longJob.writeConsole(Buffer.from("echo still-$((20+22))\n"));
      await long.waitFor("console", /still-42/);
      await one.stop(longJob, { graceMs: 1000 });
      expect(await longJob.exited).toMatchObject({ stopped: true });
      await one.cleanup(longJob);
    } finally {
      await Promise.all([one.close(), two.close()]);
    }
  }, 60000);
});
