/**
 * The lease keeper (docs/leases.md): moves leases along by time, every
 * `leaseSweepIntervalMs` (a waiting lease's host that frees is seen at the
 * next sweep; waking on every released slot would sweep without pause on a
 * busy testbed). For each lease due
 * (db/queries/leases.ts leasesDue), policy.ts `decide`s:
 *
 * - not ACTIVE by its deadline (its end when none): ended UNSERVED;
 * - ACTIVE past its end: ended EXPIRED;
 * - a hold whose job has ended: ended RELEASED (the job's end releases its
 *   hold itself, but leaves a lease another transaction holds locked);
 * - no keepalive for its grace period, counted from its start: ended LOST.
 *   Never earlier than a grace period after this keeper started: a
 *   coordinator restart does not count against the holder, whose client is
 *   reconnecting meanwhile;
 * - REQUESTED: booked again (the calendar may have room now);
 * - WAITING, its start come: a booked host gone out of service since is
 *   replaced by another matching one when one is free, and (a lease by
 *   selector) a booked host still busy by a matching one free now; then
 *   ACTIVE when none of its hosts runs a job (its session job submitted),
 *   else it says which host it waits for.
 *
 * Every replica runs one; each lease is handled in its own transaction
 * under its row lock (SKIP LOCKED), its facts re-read there, so two keepers
 * act on a lease once.
 */
import { SweepLoop } from "../../lib/async/sweep-loop.js";
import type { Logger } from "../../lib/logger.js";
import type { CoordinatorContext } from "../context.js";
import { endLease, leasesDue, loadLease, lockBookings, lockLeaseDue, lockLeaseJobs } from "../db/queries/leases.js";
import type { LeaseConfig } from "./config.js";
import { activate, bookLease } from "./lifecycle.js";
import { decide, humanDuration } from "./policy.js";

const BATCH = 100;

export class LeaseKeeper {
  private readonly log: Logger;
  private readonly loop: SweepLoop;
  /** When this keeper started: no lease is lost for a silence that began before it. */
  private startedAt = new Date();

  constructor(
    private readonly ctx: CoordinatorContext,
    config: LeaseConfig,
  ) {
    this.log = ctx.logger.child({ subsystem: "leases" });
    // While the database is away (the notifications connection lost) the sweep waits, as the other loops do.
    this.loop = new SweepLoop(
      async () => ctx.notifications.connected && this.sweep(),
      config.leaseSweepIntervalMs,
      (err) => this.log.warn({ err }, "lease sweep failed"),
    );
  }

  start(): void {
    this.startedAt = new Date(this.ctx.clock());
    this.loop.start();
  }

  stop(): Promise<void> {
    return this.loop.stop();
  }

  /** Runs a sweep now, or once more right after the running one. */
  wake(): void {
    this.loop.wake();
  }

  /** Acts on every lease due once (also for tests); true when there may be more. */
  async sweep(): Promise<boolean> {
    const due = await leasesDue(this.ctx.sql, this.startedAt, BATCH);
    for (const { id, state } of due) {
      if (this.loop.isStopped) return false;
      await this.ctx.sql.begin(async (tx) => {
        // The lock order: the bookings' lock (booking, or replacing a host at activation), the lease's jobs, the lease.
        if (state === "requested" || state === "waiting") await lockBookings(tx);
        await lockLeaseJobs(tx, id);
        const facts = await lockLeaseDue(tx, id, this.startedAt);
        if (!facts) return;
        const { lease } = facts;
        const action = decide({ state: lease.state, ...facts });
        switch (action) {
          case "unserved": {
            const at = (lease.deadline_at ?? lease.ends_at).toISOString();
            await endLease(tx, id, { reason: "unserved", message: `not served by ${at}${lease.status_message ? `: ${lease.status_message}` : ""}`, actor: "system" });
            break;
          }
          case "expired":
            await endLease(tx, id, { reason: "expired", message: `its end time ${lease.ends_at.toISOString()} passed`, actor: "system" });
            break;
          case "lost":
            await endLease(tx, id, { reason: "lost", message: `no keepalive for ${humanDuration(lease.grace_ms)}`, actor: "system" });
            break;
          case "held-job-ended":
            await endLease(tx, id, { reason: "released", message: `its held job ${lease.held_job_id} ended`, actor: "system" });
            break;
          case "book":
            if ((await bookLease(tx, lease, facts.now)) && facts.started) {
              await activate(tx, this.ctx, (await loadLease(tx, id))!, "system");
            }
            break;
          case "activate":
            await activate(tx, this.ctx, lease, "system");
            break;
          case "none":
            break;
        }
        if (action !== "none") this.log.info({ leaseId: id, action }, "lease keeper acted");
      });
    }
    return due.length === BATCH;
  }
}
