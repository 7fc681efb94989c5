/**
 * The periodic sweep (DESIGN.md §5): queue timeouts, job timeouts, the grace
 * period of detached hosts, hosts left attached to a dead replica, and this
 * replica's own heartbeat. Every replica sweeps; each change runs in its own
 * short transaction that re-checks its condition under the job's row lock,
 * so two replicas sweeping at once change each job once.
 */
import type { Logger } from "../../lib/logger.js";
import type { CoordinatorContext } from "../context.js";
import type { JobConfig } from "./config.js";
import type { JobMetrics } from "./metrics.js";
import { loadJob, writeJobStates } from "../db/queries/jobs.js";
import { endAttempt } from "./store.js";
import { hostEnded } from "./transitions.js";

const BATCH = 200;

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
    await this.ctx.sql`delete from coordinator_replicas where id = ${this.ctx.replicaId}`.catch(() => undefined);
  }

  /** Runs every check once (also for tests). */
  async sweep(): Promise<void> {
    await this.deadReplicas();
    await this.queueTimeouts();
    await this.jobTimeouts();
    await this.droppedHosts();
  }

  private async beat(): Promise<void> {
    await this.ctx.sql`
      insert into coordinator_replicas (id) values (${this.ctx.replicaId})
      on conflict (id) do update set heartbeat_at = now()`;
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
    const rows = await this.ctx.sql<{ id: string }[]>`
      update hosts h set attached_replica = null, attach_session = null, attached_at = null,
        detached_at = coalesce((select r.heartbeat_at from coordinator_replicas r where r.id = h.attached_replica), now())
      where h.attached_replica is not null and h.attached_replica <> ${this.ctx.replicaId}
        and h.attached_at < now() - ${stale} * interval '1 millisecond'
        and not exists (
          select 1 from coordinator_replicas r
          where r.id = h.attached_replica and r.heartbeat_at > now() - ${stale} * interval '1 millisecond')
      returning h.id, pg_notify('treadmill_hosts', h.id::text)`;
    if (rows.length > 0) this.log.warn({ hosts: rows.length }, "hosts of a dead coordinator replica detached");
    await this.ctx.sql`delete from coordinator_replicas where heartbeat_at < now() - interval '1 day'`;
  }

  private async queueTimeouts(): Promise<void> {
    const due = await this.ctx.sql<{ id: string }[]>`
      select id from jobs
      where state = 'queued' and queued_at + queue_timeout_ms * interval '1 millisecond' < now()
      order by queued_at limit ${BATCH}`;
    for (const { id } of due) {
      await this.ctx.sql.begin(async (tx) => {
        const [row] = await tx<{ id: string }[]>`
          select id from jobs
          where id = ${id} and state = 'queued' and queued_at + queue_timeout_ms * interval '1 millisecond' < now()
          for update skip locked`;
        if (!row) return;
        const job = (await loadJob(tx, id))!;
        await endAttempt(tx, job, { reason: "queue_timeout", message: "no hosts were assigned within the queue timeout", actor: "system" });
      });
    }
  }

  /** Running past the deadline: ask the supervisors to stop (they report; JOB_TIMEOUT wins). */
  private async jobTimeouts(): Promise<void> {
    const due = await this.ctx.sql<{ id: string }[]>`
      select id from jobs
      where state in ('assigned', 'initializing', 'running', 'terminating') and deadline_at < now() and stop_reason is null
      order by deadline_at limit ${BATCH}`;
    for (const { id } of due) {
      await this.ctx.sql.begin(async (tx) => {
        const [row] = await tx<{ id: string }[]>`
          select id from jobs
          where id = ${id} and state in ('assigned', 'initializing', 'running', 'terminating')
            and deadline_at < now() and stop_reason is null
          for update skip locked`;
        if (!row) return;
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
    const due = await this.ctx.sql<{ job_id: string; host_id: string; attempt: number; host_name: string }[]>`
      select jh.job_id, jh.host_id, jh.attempt, h.name as host_name
      from job_hosts jh join hosts h on h.id = jh.host_id join jobs j on j.id = jh.job_id
      where h.attached_replica is null
        and coalesce(h.detached_at, '-infinity') < now() - ${this.config.supervisorGraceMs} * interval '1 millisecond'
        and jh.released_at is null and jh.terminated_at is null
        and j.state <> 'finalized' and j.attempt = jh.attempt
      limit ${BATCH}`;
    for (const d of due) {
      await this.ctx.sql.begin(async (tx) => {
        // Re-check under the job's lock: the host may have come back meanwhile.
        const job = await loadJob(tx, d.job_id, { lock: true });
        const [still] = await tx`
          select 1 from hosts h
          where h.id = ${d.host_id} and h.attached_replica is null
            and coalesce(h.detached_at, '-infinity') < now() - ${this.config.supervisorGraceMs} * interval '1 millisecond'`;
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
