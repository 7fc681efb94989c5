/**
 * The watchdog of the coordinator's background loops (coordinator/jobs/watchdog.ts):
 * a unit of work past the limit is reported once, counted until it settles,
 * and its end is reported too. Pure logic: a fake clock, no timers.
 */
import { describe, expect, it } from "@jest/globals";
import { Watchdog } from "../../coordinator/jobs/watchdog.js";
import { capturingLogger } from "../supervisor/drivers/helpers.js";

describe("the background loop watchdog", () => {
  it("reports a unit past the limit once, counts it until it settles, then reports its end", async () => {
    let now = 0;
    const { logger, lines } = capturingLogger();
    const dog = new Watchdog(logger, 1000, () => now);
    let finish!: () => void;
    const work = dog.track("scheduler", new Promise<void>((resolve) => (finish = resolve)));
    const quick = dog.track("sweep", Promise.resolve());
    await quick;
    now = 999;
    dog.check();
    expect(lines.filter((l) => l.includes("stalled"))).toHaveLength(0);
    now = 1500;
    dog.check();
    dog.check();
    const stalled = lines.filter((l) => l.includes("background loop stalled")).map((l) => JSON.parse(l));
    expect(stalled).toHaveLength(1);
    expect(stalled[0]).toMatchObject({ loop: "scheduler", runningMs: 1500 });
    expect((await dog.stalled.get()).values).toEqual([expect.objectContaining({ labels: { loop: "scheduler" }, value: 1 })]);
    now = 2000;
    finish();
    await work;
    await Promise.resolve();
    expect((await dog.stalled.get()).values[0].value).toBe(0);
    expect(lines.some((l) => l.includes("background loop resumed") && l.includes('"durationMs":2000'))).toBe(true);
  });
});
