/**
 * The periodic sweep (DESIGN.md §5): queue timeouts, job timeouts, the grace
 * period of detached hosts, hosts left attached to a dead replica, the
 * secret values finished jobs keep for re-runs (rerunSecretsMs), and this
 * replica's own heartbeat. Every replica sweeps; each change runs in its own
 * short transaction that re-checks its condition under the job's row lock,
 * so two replicas sweeping at once change each job once.
 */
import type { Logger } from "../../lib/logger.js";
import type { CoordinatorContext } from "../context.js";
import type { JobConfig } from "./config.js";
import type { JobMetrics } from "./metrics.js";
import { detachHostsOfDeadReplicas, replicaGone, replicaHeartbeat, stillDropped } from "../db/queries/hosts.js";
import { droppedSlots } from "../db/queries/job-hosts.js";
import { deleteOldSecrets, jobTimedOut, loadJob, lockJobTimedOut, lockQueueTimedOut, queueTimedOut, writeJobStates } from "../db/queries/jobs.js";
import { endAttempt } from "./store.js";
import { hostEnded } from "./transitions.js";

const BATCH = 200;
/** How often the secret values of finished jobs are looked at. */
const SECRETS_SWEEP_MS = 1000;

export class Sweeper {
  private readonly log: Logger;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private stopped = false;
  private beatTimer: NodeJS.Timeout | undefined;
  /**
   * Since when this replica's heartbeats have been recorded without a miss
   * (undefined: the last one failed). Other replicas are judged dead only
   * after this replica itself was heard for a whole staleness window: after
   * an outage of the database every replica's heartbeat is old, and each
   * needs one interval to beat again.
   */
  private beatingSince: number | undefined;
  private secretsSweptAt = 0;

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
    private readonly metrics?: JobMetrics,
  ) {
    this.log = ctx.logger.child({ subsystem: "sweeper" });
  }

  async start(): Promise<void> {
    await this.beat();
    // Its own timer: a slow sweep must not make this replica look dead.
    this.beatTimer = setInterval(() => {
      this.beat().catch((err) => {
        if (this.stopped) return;
        // The first miss of an outage is worth a line; the database's own loss is logged elsewhere.
        if (this.beatingSince !== undefined) this.log.warn({ err }, "cannot record this replica's heartbeat");
        this.beatingSince = undefined;
      });
    }, this.config.replicaHeartbeatMs);
    this.beatTimer.unref?.();
    this.timer = setInterval(() => {
      // While supervisors cannot attach here (the database is away) nobody is judged gone.
      if (this.running || this.stopped || !this.ctx.notifications.connected) return;
      const sweep = this.sweep();
      this.running = (this.metrics ? this.metrics.watch("sweep", sweep) : sweep)
        .catch((err) => {
          if (!this.stopped) this.log.warn({ err }, "sweep failed");
        })
        .finally(() => (this.running = undefined));
    }, this.config.jobSweepIntervalMs);
    this.timer.unref?.();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    clearInterval(this.beatTimer);
    await this.running;
    await replicaGone(this.ctx.sql, this.ctx.replicaId).catch(() => undefined);
  }

  /** Runs every check once (also for tests). */
  async sweep(): Promise<void> {
    await this.deadReplicas();
    await this.queueTimeouts();
    await this.jobTimeouts();
    await this.droppedHosts();
    await this.oldSecrets();
  }

  /** A finished job's secret values once its re-runs may no longer have them: at most one pass a second. */
  private async oldSecrets(): Promise<void> {
    const now = Date.now();
    if (now - this.secretsSweptAt < SECRETS_SWEEP_MS) return;
    this.secretsSweptAt = now;
    const n = await deleteOldSecrets(this.ctx.sql, this.config.rerunSecretsMs, BATCH);
    if (n > 0) this.log.info({ jobs: n }, "secret values of finished jobs deleted");
  }

  private async beat(): Promise<void> {
    await replicaHeartbeat(this.ctx.sql, this.ctx.replicaId);
    this.beatingSince ??= Date.now();
  }

  /**
   * Hosts attached to another replica that stopped heartbeating are detached
   * (their grace starts then); never this replica's own, and not before this
   * replica has beaten for a whole staleness window itself (see beatingSince).
   */
  private async deadReplicas(): Promise<void> {
    const stale = 3 * this.config.replicaHeartbeatMs;
    if (this.beatingSince === undefined || Date.now() - this.beatingSince < stale) return;
    const n = await detachHostsOfDeadReplicas(this.ctx.sql, this.ctx.replicaId, stale);
    if (n > 0) this.log.warn({ hosts: n }, "hosts of a dead coordinator replica detached");
  }

  private async queueTimeouts(): Promise<void> {
    const due = await queueTimedOut(this.ctx.sql, BATCH);
    for (const { id } of due) {
      await this.ctx.sql.begin(async (tx) => {
        if (!(await lockQueueTimedOut(tx, id))) return;
        const job = (await loadJob(tx, id))!;
        await endAttempt(tx, job, { reason: "queue_timeout", message: "no hosts were assigned within the queue timeout", actor: "system" });
      });
    }
  }

  /** Running past the deadline: ask the supervisors to stop (they report; JOB_TIMEOUT wins). */
  private async jobTimeouts(): Promise<void> {
    const due = await jobTimedOut(this.ctx.sql, BATCH);
    for (const { id } of due) {
      await this.ctx.sql.begin(async (tx) => {
        if (!(await lockJobTimedOut(tx, id))) return;
        const job = (await loadJob(tx, id))!;
        await writeJobStates(tx, [
          {
            kind: "stop",
            id,
            stopReason: "job_timeout",
            event: {
              jobId: id,
              kind: "state_changed",
              state: job.state,
              stage: job.stage,
              attempt: job.attempt,
              actor: "system",
              ownerId: job.owner_id,
              message: "job timeout: stopping",
            },
          },
        ]);
      });
    }
  }

  /** Hosts detached longer than the grace period: their attempts end HOST_DROPPED (or the requested stop). */
  private async droppedHosts(): Promise<void> {
    const due = await droppedSlots(this.ctx.sql, this.config.supervisorGraceMs, BATCH);
    for (const d of due) {
      await this.ctx.sql.begin(async (tx) => {
        // Re-check under the job's lock: the host may have come back meanwhile.
        const job = await loadJob(tx, d.job_id, { lock: true });
        const still = await stillDropped(tx, d.host_id, this.config.supervisorGraceMs);
        if (!job || !still || job.state === "finalized" || job.attempt !== d.attempt) return;
        // Not released: the supervisor may come back holding it; its hello settles the slot.
        await hostEnded(
          tx,
          { jobId: d.job_id, hostId: d.host_id, attempt: d.attempt },
          { reason: "host_dropped", message: `host ${d.host_name} stayed detached longer than the grace period` },
          { released: false, actor: "system" },
        );
      });
    }
  }
}
