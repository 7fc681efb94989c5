/**
 * Results from a board's serial console (issue #23, docs/results.md) on the
 * all-in-one testbed: the simulated board's firmware prints KTAP, as a
 * kernel does with printk timestamps, and its cases are parsed as they are
 * printed: they are listed while the job still runs, each pointing at its
 * own bytes of the console log.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { JobState, TestOutcome } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { buildFirmwareImage } from "../../testbed/images.js";
import { pushTestImage } from "../../testbed/provision.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";
import { waitUntil } from "../support/wait.js";

describe("KTAP on a simulated board's serial console", () => {
  let tb: RunningTestbed;

  beforeAll(async () => {
    tb = await startTestbed({ supervisors: 0 });
  }, 120_000);
  afterAll(async () => {
    await tb?.stop();
  });

  it("parses the cases while the job runs, with their log ranges, and the rest at its end", async () => {
    // The firmware waits for this file (in the board's state directory) before its last case.
    const gate = resolve(join(tb.dir, "data", "boards", "board-1", `go-${randomUUID()}`));
    const lines = [
      "[    0.512000] KTAP version 1",
      "[    0.512100] 1..2",
      "[    0.512200]     KTAP version 1",
      "[    0.512300]     # Subtest: gpio",
      "[    0.512400]     1..2",
      "[    0.513000]     ok 1 gpio_toggle",
      "[    0.514000]     # gpio_irq: EXPECTATION FAILED at drivers/gpio/gpio-test.c:88",
      "[    0.514100]     not ok 2 gpio_irq",
      "[    0.515000] not ok 1 gpio",
    ];
    const script = [
      ...lines.map((l) => `echo '${l}'`),
      `while [ ! -f ${gate} ]; do sleep 0.1; done`,
      "echo '[    0.600000] ok 2 uart_loopback # SKIP no loopback plug'",
      "echo TREADMILL_EXIT=0",
      "while true; do sleep 1; done",
      "",
    ].join("\n");
    await pushTestImage(tb.admin, await buildFirmwareImage({ dir: join(tb.dir, "images"), script }), "test/ktap:1");
    const jobs = tb.client(JobService);
    const { job } = await jobs.submitJob({ spec: { image: "test/ktap:1", hosts: { hostCount: 1, tags: { board: "sim" } } } });
    const jobId = job!.id;

    await waitUntil(async () => (await jobs.listJobResults({ jobId })).cases.length === 2, "the first two cases while the job runs", 60_000);
    const live = await jobs.getJob({ jobId });
    expect(live.job!.state).toBe(JobState.RUNNING);
    expect(live.job!.results).toMatchObject({ total: 2n, passed: 1n, failed: 1n, complete: false });

    await writeFile(gate, "");
    const done = await tb.waitFinalized(jobId);
    expect(done.results).toMatchObject({ total: 3n, passed: 1n, failed: 1n, skipped: 1n, complete: true });
    const { cases } = await jobs.listJobResults({ jobId });
    expect(cases.map((c) => [c.suite, c.name, c.outcome])).toEqual([
      ["gpio", "gpio_toggle", TestOutcome.PASS],
      ["gpio", "gpio_irq", TestOutcome.FAIL],
      ["", "uart_loopback", TestOutcome.SKIP],
    ]);
    expect(cases[1]!.message).toBe("gpio_irq: EXPECTATION FAILED at drivers/gpio/gpio-test.c:88");
    // Each case's range is its own output in the console log.
    const log = Buffer.from(await tb.readLog(jobId, "console"));
    const slice = (c: (typeof cases)[number]) => log.subarray(Number(c.log!.startOffset), Number(c.log!.endOffset)).toString();
    expect(cases.every((c) => c.log?.channel === "console")).toBe(true);
    expect(slice(cases[1]!)).toBe(
      "[    0.514000]     # gpio_irq: EXPECTATION FAILED at drivers/gpio/gpio-test.c:88\r\n[    0.514100]     not ok 2 gpio_irq\r\n",
    );
    expect(slice(cases[2]!)).toMatch(/ok 2 uart_loopback # SKIP no loopback plug\r\n$/);
  }, 120_000);
});
