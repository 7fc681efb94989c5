/**
 * The scheduler (DESIGN.md §5). A pass assigns queued jobs to hosts with free
 * slots, in one transaction:
 *
 * - Only one pass runs at a time across replicas: it takes a transaction-level
 *   advisory lock with pg_try_advisory_xact_lock; a replica that does not get
 *   it tries again shortly (the holder may have read the queue before the
 *   change that woke this one). Nothing in a pass ever waits for a lock: the
 *   host rows it places jobs on and the job rows it assigns are locked with
 *   FOR UPDATE / FOR NO KEY UPDATE (job rows, loadJob says why) SKIP LOCKED
 *   once the placements are chosen, and re-checked (a
 *   row another transaction is changing -- a host attaching or being
 *   disabled, a job being canceled -- is left for the next pass, with every
 *   placement that needs it). Hence no deadlock, and a job is never assigned
 *   twice. Only the scheduler takes slots, under the advisory lock, so a
 *   host's free slots read at the start of a pass can only have grown.
 * - Few round trips (DESIGN.md §5's dispatch latency): the reads of a pass go
 *   out together (pipelined on the transaction's connection), the locks
 *   together, and every write of the assignments -- job_hosts, jobs, their
 *   timeline and audit events -- is one statement that also returns what the
 *   StartJob commands are built from. Right after the commit, the StartJobs of
 *   hosts whose streams this replica holds are handed to those streams; other
 *   replicas hear of theirs by 'treadmill_commands'.
 * - What goes where is decided by placement.ts, a pure module (matching,
 *   co-allocation, reservations against starvation, the per-user limit, the
 *   choice of log servers and proxy). Two things stay in SQL. The queue's
 *   order (priority plus one point per `schedulerAgingMs` of waiting, then
 *   queued_at, created_at, id) is read through the queue index, chunk by
 *   chunk, so a pass reads the head of a 10,000-job queue rather than all of
 *   it. And the final check of each placement (its hosts still qualify and
 *   have the slots, the job is still queued) runs under the rows' locks in
 *   the writing statement: that is concurrency with other transactions, not
 *   a choice. The hosts are read per chunk and per kind of job: the free
 *   slots of all hosts in one aggregate, then for each kind (tags, site,
 *   driver, media types, owner when grants exist) its first free hosts in
 *   the placement's order, as many as its jobs ask for, both through the
 *   index of hosts with a free slot (hosts.held_slots, kept by triggers on
 *   job_hosts: migration 0012), so a busy lab costs no more than an idle
 *   one; busy hosts only for a job of several hosts. A pass stops at MAX_PLACEMENTS_PER_PASS and the
 *   next runs at once (`npm run bench -- scale`, docs/scale.md: 10,000
 *   hosts, 100,000 queued). placement.ts's decisions were already made in this process
 *   before it existed; moving them into a module (and the statements into
 *   db/queries) cost no throughput: `npm run bench -- coordinator`, 5,000
 *   jobs on 200 hosts, runs alternated on a loaded 2-core machine, 279 and
 *   433 jobs/s before, 705 and 637 after.
 */
import type { ReservedSql } from "postgres";
import type { StartJob } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { Logger } from "../../lib/logger.js";
import type { CoordinatorContext } from "../context.js";
import type { StartRow } from "../db/queries/jobs.js";
import { type StartTokens, mintStartTokens, startJobMessages } from "./commands.js";
import type { JobConfig } from "./config.js";
import type { JobMetrics } from "./metrics.js";
import { PassPlacement, type Placed, type Service, ServicePicker, placeLeaseJobs } from "./placement.js";
import { deniedPairs, firstBooking, freeHostsFor, freeSlotCount, hostGrantsExist, leaseHostsFree, schedulableHosts } from "../db/queries/hosts.js";
import {
  activeJobsPerOwner,
  assignJobs,
  customPlans,
  liveLogServersAndProxies,
  queuedLeaseJobs,
  readQueue,
  tryPassLock,
} from "../db/queries/jobs.js";
import { isDatabaseUnavailable } from "../db/errors.js";
import { recordWaiting } from "../db/queries/events.js";
import { type BackoffOptions, backoff } from "../../lib/retry.js";
import { pipeline, withReserved } from "../db/reserved.js";
import { type PinnedRow, placeableHealthJobs } from "../db/queries/health-checks.js";

/** A health job on its own host, as a placement. */
function pinnedPlacement(r: PinnedRow): Placed & { pinned: true } {
  return {
    pinned: true,
    job: {
      id: r.id,
      owner_id: r.owner_id,
      attempt: r.attempt,
      host_count: 1,
      required_tags: {},
      required_site: null,
      required_driver: null,
      media_types: [],
      manifest_digest: r.manifest_digest,
      image_holder: r.image_holder,
      job_timeout_ms: r.job_timeout_ms,
      lease_id: null,
    },
    hosts: [
      { id: r.host_id, name: r.host_name, tags: {}, site: r.site, driver_kind: "", media_types: [], free: 1, attached_replica: r.attached_replica, booked_from: null },
    ],
  };
}

const CHUNK = 1000;
/**
 * Jobs one pass assigns at most; a full pass is followed by the next at
 * once. Bounds a pass's time (its writing statement grows with its jobs)
 * when many slots free up together (every host of a lab attaching after a
 * restart): `npm run bench -- scale`.
 */
export const MAX_PLACEMENTS_PER_PASS = 128;
/** A pass that lost a race runs again at once: 15-30 ms, so replicas that lost together do not collide again. */
const RACE_RETRY: BackoffOptions = { initialMs: 15, maxMs: 30, jitter: "decorrelated" };
/** A pass that failed (the database away) backs off from 30-90 ms up to 2 s (decorrelated by 3: each delay grows from the last). */
const FAILURE_RETRY: BackoffOptions = { initialMs: 30, maxMs: 2000, factor: 3, jitter: "decorrelated" };

export interface PassResult {
  assigned: number;
  /** Something was skipped because another transaction held it: run again soon. */
  retry: boolean;
  /** The pass stopped at MAX_PLACEMENTS_PER_PASS: run again at once. */
  more?: boolean;
}

/** Hands StartJob commands to the stream of `hostId` if this replica holds it. */
export type StartDelivery = (hostId: string, starts: StartJob[]) => void;

interface Assigned extends PassResult {
  /** StartJob rows of the hosts attached to this replica, by host. */
  local: Map<string, StartRow[]>;
  /** Their tokens, minted while the assignment was written: by host, then job. */
  tokens: Map<string, Map<string, Promise<StartTokens>>>;
}

export class Scheduler {
  private readonly log: Logger;
  private running = false;
  private dirty = false;
  private stopped = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private current: Promise<void> | undefined;
  /** Log servers and proxies of placements, round-robin across passes. */
  private readonly services: ServicePicker;
  /** Free slots seen by the last pass: sizes the first read of the queue. */
  private lastSlots = 0;
  /** Passes failed in a row: the retry backs off and the log says the start and the end of a streak. */
  private failures = 0;
  private readonly raceDelays = backoff(RACE_RETRY);
  /** Started afresh by a pass that succeeds. */
  private failureDelays = backoff(FAILURE_RETRY);

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
    private readonly deliver: StartDelivery = () => undefined,
    private readonly metrics?: JobMetrics,
  ) {
    this.log = ctx.logger.child({ subsystem: "scheduler" });
    this.services = new ServicePicker(config.logReplicas);
  }

  /** Runs a pass now, or right after the running one. */
  wake(): void {
    if (this.stopped) return;
    if (this.running) {
      this.dirty = true;
      return;
    }
    this.running = true;
    this.current = this.loop();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    await this.current;
  }

  private async loop(): Promise<void> {
    try {
      do {
        this.dirty = false;
        let result: PassResult;
        try {
          const pass = this.pass();
          result = await (this.metrics ? this.metrics.watch("scheduler", pass) : pass);
          if (this.failures > 0) {
            this.log.info({ failures: this.failures }, "scheduling passes succeed again");
            this.failureDelays = backoff(FAILURE_RETRY);
          }
          this.failures = 0;
        } catch (err) {
          if (this.stopped) return;
          this.failures++;
          this.metrics?.passFailures.inc();
          const down = isDatabaseUnavailable(err);
          // The first failure of a streak and every 50th; the database's own loss is logged where it is noticed.
          if (this.failures === 1 || this.failures % 50 === 0) {
            this.log[down ? "warn" : "error"]({ err, failures: this.failures }, "scheduling pass failed; retrying");
          }
          result = { assigned: 0, retry: true };
        }
        if (result.more) this.dirty = true;
        if (result.retry && !this.stopped && this.retryTimer === undefined) {
          const delay = (this.failures === 0 ? this.raceDelays : this.failureDelays).next().value;
          this.retryTimer = setTimeout(() => {
            this.retryTimer = undefined;
            this.wake();
          }, delay);
          this.retryTimer.unref?.();
        }
      } while (this.dirty && !this.stopped);
    } finally {
      this.running = false;
    }
  }

  /**
   * One scheduling pass (also for tests). Two round trips when it assigns:
   * on a connection of its own, BEGIN, the lock and every read go out
   * together; the placements are chosen here; then one statement locks what
   * they use, writes them and returns the StartJob rows, with COMMIT right
   * behind it.
   */
  async pass(): Promise<PassResult> {
    const started = performance.now();
    const result = await withReserved(this.ctx.sql, (tx) => this.assign(tx));
    this.metrics?.passSeconds.observe((performance.now() - started) / 1000);
    this.metrics?.assigned.inc(result.assigned);
    for (const [hostId, rows] of result.local) {
      // After the commit: a StartJob goes out only for an assignment that exists.
      startJobMessages(this.ctx, hostId, rows, result.tokens.get(hostId)).then(
        (starts) => this.deliver(hostId, starts),
        (err) => this.log.warn({ err, hostId }, "cannot build StartJob (the stream's next sync sends it)"),
      );
    }
    return { assigned: result.assigned, retry: result.retry, more: result.more };
  }

  private async assign(tx: ReservedSql): Promise<Assigned> {
    const end = async (retry: boolean): Promise<Assigned> => {
      await tx`commit`;
      return { assigned: 0, retry, local: new Map(), tokens: new Map() };
    };
    const limit = this.config.maxJobsPerUser;
    const aging = this.config.schedulerAgingMs;
    const queue = (size: number, offset: number) => readQueue(tx, size, offset, aging);
    // The first chunk of the queue, sized to the free slots of the last pass
    // (a pass that can place a few jobs reads a few rows, not the whole queue).
    let size = Math.min(CHUNK, Math.max(32, 4 * Math.min(this.lastSlots, MAX_PLACEMENTS_PER_PASS)));
    // Pipelined: BEGIN, the pass lock, then the reads, in one round trip.
    pipeline(tx`begin`);
    customPlans(tx);
    const [ok, freeSlots, grants, counts, first, services, pinned, leaseJobs, leaseHosts, bookings] = await Promise.all([
      tryPassLock(tx),
      freeSlotCount(tx),
      hostGrantsExist(tx),
      limit > 0 ? activeJobsPerOwner(tx) : Promise.resolve([]),
      queue(size, 0),
      liveLogServersAndProxies(tx),
      placeableHealthJobs(tx),
      queuedLeaseJobs(tx),
      leaseHostsFree(tx),
      firstBooking(tx),
    ]);
    if (!ok) return end(true);
    this.lastSlots = freeSlots;
    // Jobs inside leases go to their leases' hosts first (no other job is
    // placed there), then health jobs to their own hosts, one per host and
    // pass (hosts under check take no user job: the placement never sees
    // them).
    const early = [...placeLeaseJobs(leaseJobs, leaseHosts), ...pinned.map(pinnedPlacement)];
    if (freeSlots === 0 || first.length === 0) {
      if (early.length === 0) return end(false);
      return this.finish(tx, early, services, false, false);
    }
    // The hosts come per chunk, per kind of job: those its jobs may take.
    const placement = new PassPlacement([], {
      maxJobsPerUser: limit,
      running: new Map(counts.map((c) => [c.owner_id, c.n])),
      grants,
      maxPlacements: MAX_PLACEMENTS_PER_PASS,
      busyKnown: false,
      freeSlots,
      now: bookings.now,
      firstBooking: bookings.first,
    });
    // The hosts taking a health job are known to the pass without a free slot: no user job is read for them.
    placement.addFree(pinned.map((p) => ({ ...pinnedPlacement(p).hosts[0], free: 0 })));
    // A kind whose read stopped at its need may have more free hosts: if one
    // of its jobs is left unplaced by a pass that placed others (they took
    // its hosts), the next pass runs at once.
    let cutShort = false;
    for (let offset = 0, chunk = first; ; ) {
      const demands = placement.demands(chunk);
      if (demands.length > 0) {
        const rows = await freeHostsFor(
          tx,
          demands.map(({ job, need }) => ({
            tags: job.required_tags,
            site: job.required_site,
            driver: job.required_driver,
            media: job.media_types,
            owner: grants ? job.owner_id : null,
            timeout: placement.bookingBound(job),
            // Hosts the job avoids (a retry on another host) may be among those read.
            need: need + (job.avoid_host_ids?.length ?? 0),
          })),
          placement.knownHosts(),
        );
        placement.addFree(rows.map(({ demand: _, ...h }) => h));
        const full = new Set(demands.filter((d, i) => rows.filter((r) => r.demand === i).length >= d.need).map((d) => d.kind));
        if (placement.needsBusy(chunk)) placement.addBusy(await schedulableHosts(tx));
        const ask = placement.accessToCheck(chunk);
        if (ask.length > 0) placement.learnDenied(await deniedPairs(tx, ask));
        placement.place(chunk);
        cutShort ||= chunk.some((j) => full.has(placement.kind(j)) && !placement.placed(j));
      }
      if (chunk.length < size || placement.exhausted || placement.full) break;
      offset += size;
      size = CHUNK;
      chunk = await queue(size, offset);
    }
    const placements = [...early, ...placement.placements];
    if (placements.length === 0) return end(false);
    return this.finish(tx, placements, services, placement.full, cutShort);
  }

  /** Writes the placements of a pass (or says why they wait) and commits. */
  private async finish(tx: ReservedSql, placements: (Placed & { pinned?: boolean })[], services: Service[], full: boolean, cutShort: boolean): Promise<Assigned> {
    if (!services.some((s) => s.kind === "log_server")) {
      // A job's output must have somewhere to go: the jobs wait, and say why.
      await this.waiting(tx, placements, "waiting for a log server: none is registered and live");
      await tx`commit`;
      return { assigned: 0, retry: false, local: new Map(), tokens: new Map() };
    }
    const { assigned, local, tokens } = await this.write(tx, placements, services);
    return { assigned, retry: assigned < placements.length, more: full || cutShort, local, tokens };
  }

  /**
   * Records why placeable jobs are not assigned (their status message and,
   * once per reason, a WAITING event on their timeline); the next
   * assignment clears the message.
   */
  private async waiting(tx: ReservedSql, placements: Placed[], message: string): Promise<void> {
    const ids = placements.map((p) => p.job.id);
    await recordWaiting(tx, ids, message);
    this.log.warn({ jobs: ids.length, reason: message }, "placeable jobs wait");
  }

  /**
   * Locks what the placements use (skipping rows busy elsewhere: hosts
   * re-checked to qualify and to have the slots, jobs to be still queued),
   * records the placements whose every row it locked, and commits. Returns
   * how many jobs it assigned and the StartJob rows of this replica's hosts.
   */
  private async write(
    tx: ReservedSql,
    placements: (Placed & { pinned?: boolean })[],
    services: Service[],
  ): Promise<{ assigned: number; local: Map<string, StartRow[]>; tokens: Map<string, Map<string, Promise<StartTokens>>> }> {
    const plan = placements.map((p) => {
      const { logs, proxy } = this.services.pick(p.hosts[0].site, services);
      return {
        id: p.job.id,
        owner: p.job.owner_id,
        attempt: p.job.attempt,
        logs,
        proxy,
        message: `assigned to ${p.hosts.map((h) => h.name).join(", ")}`,
        pinned: p.pinned,
      };
    });
    const rows = placements.flatMap((p) =>
      p.hosts.map((h, index) => ({ job: p.job.id, host: h.id, attempt: p.job.attempt, index, local: h.attached_replica === this.ctx.replicaId })),
    );
    // The StartJobs' tokens are signed while the statement runs (off the
    // event loop), not after the commit: dispatch latency. A placement the
    // statement skips leaves its tokens unused.
    const tokens = new Map<string, Map<string, Promise<StartTokens>>>();
    const deadlineFrom = this.ctx.clock();
    placements.forEach((p, i) => {
      for (const h of p.hosts) {
        if (h.attached_replica !== this.ctx.replicaId) continue;
        const minted = mintStartTokens(this.ctx, {
          hostId: h.id,
          jobId: p.job.id,
          digest: p.job.manifest_digest,
          ownerId: p.job.owner_id,
          holder: p.job.image_holder,
          withProxy: plan[i].proxy !== "",
          deadlineMs: deadlineFrom + p.job.job_timeout_ms,
        });
        minted.catch(() => undefined); // awaited (and reported) only if the placement was written
        const byJob = tokens.get(h.id) ?? new Map<string, Promise<StartTokens>>();
        byJob.set(p.job.id, minted);
        tokens.set(h.id, byJob);
      }
    });
    const [starts] = await Promise.all([
      assignJobs(tx, plan, rows),
      tx`commit`.execute(),
    ]);
    const peers = new Map(placements.map((p) => [p.job.id, p.hosts.map((h, index) => ({ index, id: h.id, name: h.name }))]));
    const local = new Map<string, StartRow[]>();
    for (const { host_id, local: here, ...start } of starts) {
      if (!here) continue;
      const list = local.get(host_id) ?? [];
      list.push({ ...start, peers: peers.get(start.id)! });
      local.set(host_id, list);
    }
    const assigned = new Set(starts.map((s) => s.id)).size;
    this.log.debug({ jobs: assigned, hosts: new Set(starts.map((s) => s.host_id)).size }, "jobs assigned");
    return { assigned, local, tokens };
  }
}
