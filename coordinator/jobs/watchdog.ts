/**
 * A background loop that stops making progress must be visible, never silent
 * (issue #18 defect 1): loops hand each unit of work (a scheduling pass, a
 * group commit, a sweep) to `track`, and a unit still running after
 * `limitMs` is logged as stalled (once, at error) and counted in the
 * `treadmill_coordinator_loop_stalled{loop}` gauge until it settles, which is
 * logged too. The watchdog only reports: what a stalled unit waits on (most
 * often the database) is the owner's to resolve.
 */
import { Gauge } from "prom-client";
import type { Logger } from "../../lib/logger.js";

interface Unit {
  loop: string;
  startedAt: number;
  reported: boolean;
}

export class Watchdog {
  readonly stalled = new Gauge({
    name: "treadmill_coordinator_loop_stalled",
    help: "Units of work of a background loop running for longer than the stall limit (0 when the loop makes progress).",
    labelNames: ["loop"],
    registers: [],
  });
  private readonly units = new Set<Unit>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly log: Logger,
    private readonly limitMs: number,
    private readonly clock: () => number = Date.now,
  ) {}

  /** Watches `work` of `loop` until it settles; returns it. */
  track<T>(loop: string, work: Promise<T>): Promise<T> {
    const unit: Unit = { loop, startedAt: this.clock(), reported: false };
    this.units.add(unit);
    const done = () => {
      this.units.delete(unit);
      if (!unit.reported) return;
      this.stalled.dec({ loop });
      this.log.warn({ loop, durationMs: this.clock() - unit.startedAt }, "background loop resumed");
    };
    work.then(done, done);
    return work;
  }

  /** Looks at the units every quarter of the limit. */
  start(): void {
    this.timer ??= setInterval(() => this.check(), Math.max(50, this.limitMs / 4));
    this.timer.unref?.();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Reports every unit past the limit (once each); also for tests. */
  check(): void {
    const now = this.clock();
    for (const unit of this.units) {
      if (unit.reported || now - unit.startedAt < this.limitMs) continue;
      unit.reported = true;
      this.stalled.inc({ loop: unit.loop });
      this.log.error({ loop: unit.loop, runningMs: now - unit.startedAt }, "background loop stalled");
    }
  }
}
