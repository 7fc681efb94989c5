/**
 * The health keeper (docs/health.md): queues the health checks that are due
 * and that nothing else queues. Woken by 'treadmill_health' (the accounting
 * sent a host to CHECKING or QUARANTINED, a check was defined) and every
 * `healthSweepIntervalMs` (schedules and quarantine retries come due by
 * time). For each host due (health-checks.ts hostsDue) with none of its
 * health jobs unfinished:
 *
 * - UNKNOWN with a check applying: CHECKING, every check queued (burn-in);
 * - CHECKING: every check queued; HEALTHY at once when none applies;
 * - QUARANTINED whose retry is due (exponential backoff from its last
 *   failure, healthRetryInitialMs doubling up to healthRetryMaxMs; computed
 *   in SQL so that every replica agrees): its checks queued, the host stays
 *   QUARANTINED until one passes;
 * - HEALTHY with a check whose interval has passed: CHECKING, those checks
 *   queued.
 *
 * Every replica runs one; each host is changed in its own transaction under
 * its row lock (SKIP LOCKED), re-checked there, so two keepers queue a check
 * once.
 */
import { SweepLoop } from "../../lib/async/sweep-loop.js";
import type { Logger } from "../../lib/logger.js";
import type { CoordinatorContext } from "../context.js";
import { setHostHealth } from "../db/queries/health.js";
import { type RetryPolicy, checksDue, checksOfHost, hostsDue, lockHostHealth, openHealthJobs, retryDue } from "../db/queries/health-checks.js";
import type { Db } from "../db/queries/jobs.js";
import type { JobConfig } from "./config.js";
import { queueChecks, startChecks } from "./health.js";

const BATCH = 100;

export class HealthKeeper {
  private readonly log: Logger;
  private readonly loop: SweepLoop;

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
  ) {
    this.log = ctx.logger.child({ subsystem: "health" });
    this.loop = new SweepLoop(() => this.sweep(), config.healthSweepIntervalMs, (err) => this.log.warn({ err }, "health sweep failed"));
  }

  start(): void {
    this.loop.start();
  }

  stop(): Promise<void> {
    return this.loop.stop();
  }

  /** Runs a sweep now, or once more right after the running one. */
  wake(): void {
    this.loop.wake();
  }

  private retry(): RetryPolicy {
    return { initialMs: this.config.healthRetryInitialMs, maxMs: this.config.healthRetryMaxMs };
  }

  /** Queues every due check once (also for tests); true when there may be more. */
  async sweep(): Promise<boolean> {
    const due = await hostsDue(this.ctx.sql, this.retry(), BATCH);
    for (const { id } of due) {
      if (this.loop.isStopped) return false;
      await this.ctx.sql.begin((tx) => this.checkHost(tx, id));
    }
    return due.length === BATCH;
  }

  private async checkHost(tx: Db, id: string): Promise<void> {
    const host = await lockHostHealth(tx, id);
    // Busy elsewhere (the next sweep looks again), or its checks already queued.
    if (!host || (await openHealthJobs(tx, id)).length > 0) return;
    const checks = await checksOfHost(tx, id);
    let jobs: string[] = [];
    switch (host.health) {
      case "unknown":
        if (checks.length > 0) jobs = await startChecks(tx, this.ctx, host, checks, "system", "burn-in: the host's first health check");
        break;
      case "checking":
        if (checks.length === 0) await setHostHealth(tx, { hostId: id, health: "healthy", reason: "", actor: "system", details: { noCheck: true } });
        else jobs = await startChecks(tx, this.ctx, host, checks, "system", "checking the host");
        break;
      case "quarantined":
        if (checks.length > 0 && (await retryDue(tx, id, this.retry()))) jobs = (await queueChecks(tx, this.ctx, host, checks, "system", "retrying the checks of a quarantined host")).jobs;
        break;
      case "healthy": {
        const scheduled = await checksDue(tx, id);
        if (scheduled.length > 0) {
          jobs = await startChecks(tx, this.ctx, host, scheduled, "system", `scheduled check ${scheduled.map((c) => c.name).join(", ")}`);
        }
        break;
      }
      default:
        break;
    }
    if (jobs.length > 0) this.log.info({ hostId: id, host: host.name, health: host.health, jobs }, "health checks queued");
  }
}
