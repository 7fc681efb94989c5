/**
 * The scheduler (DESIGN.md §5). A pass assigns queued jobs to hosts with free
 * slots, in one transaction:
 *
 * - Only one pass runs at a time across replicas: it takes a transaction-level
 *   advisory lock with pg_try_advisory_xact_lock; a replica that does not get
 *   it tries again shortly (the holder may have read the queue before the
 *   change that woke this one). Nothing in a pass ever waits for a lock: the
 *   host rows it places jobs on and the job rows it assigns are locked with
 *   FOR UPDATE SKIP LOCKED once the placements are chosen, and re-checked (a
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
 * - Order: effective priority (priority plus one point per `schedulerAgingMs`
 *   of waiting), then queued_at (age of the attempt), then created_at.
 * - A host matches a job when it is attached, enabled, not draining (neither
 *   by an admin nor by its supervisor), has a free slot, carries every
 *   required tag (its site counts as the tag site=<site>), is of the required
 *   site and driver, supports every layer media type of the image, and the
 *   job's owner may use it (treadmill_user_may_use_host, contract item 6).
 * - An N-host job gets N distinct hosts in the same transaction or none.
 * - No starvation of large jobs: walking the queue in order, a job that
 *   cannot be placed now but could be once busy matching hosts free up
 *   reserves the free matching hosts it sees, so that jobs behind it cannot
 *   take them. Every pass recomputes this from the head of the queue, so the
 *   oldest blocked large job collects hosts as they become free and starts as
 *   soon as it has N. (A job no attached host could ever satisfy reserves
 *   nothing: it waits for its queue timeout without blocking others.)
 * - Per-user limit: a user's jobs beyond `maxJobsPerUser` assigned or running
 *   wait (they neither run nor reserve).
 */
import type { ReservedSql } from "postgres";
import type { StartJob } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { Logger } from "../../lib/logger.js";
import type { CoordinatorContext } from "../context.js";
import { type StartRow, type StartTokens, mintStartTokens, startColumns, startJobMessages } from "./commands.js";
import type { JobConfig } from "./config.js";
import type { JobMetrics } from "./metrics.js";
import { ACTIVE_STATES } from "./store.js";
import { isDatabaseUnavailable } from "../db/errors.js";
import { pipeline, withReserved } from "../db/reserved.js";

/** pg_advisory lock key of a scheduling pass ("tmsched" in ASCII). */
const PASS_LOCK = 0x746d_7363_6865_64n;
const CHUNK = 1000;
const RETRY_MS = 15;

interface HostCandidate {
  id: string;
  name: string;
  tags: Record<string, string>;
  site: string;
  driver_kind: string;
  media_types: string[];
  free: number;
  attached_replica: string;
}

interface QueuedJob {
  id: string;
  owner_id: string;
  attempt: number;
  host_count: number;
  required_tags: Record<string, string>;
  required_site: string | null;
  required_driver: string | null;
  media_types: string[];
  manifest_digest: string;
  image_holder: string | null;
  job_timeout_ms: number;
}

/** A live log server or proxy. */
interface Service {
  kind: string;
  url: string;
  site: string;
}

interface Placement {
  job: QueuedJob;
  hosts: HostCandidate[];
}

export interface PassResult {
  assigned: number;
  /** Something was skipped because another transaction held it: run again soon. */
  retry: boolean;
}

/** Hands StartJob commands to the stream of `hostId` if this replica holds it. */
export type StartDelivery = (hostId: string, starts: StartJob[]) => void;

interface Assigned extends PassResult {
  /** StartJob rows of the hosts attached to this replica, by host. */
  local: Map<string, StartRow[]>;
  /** Their tokens, minted while the assignment was written: by host, then job. */
  tokens: Map<string, Map<string, Promise<StartTokens>>>;
}

function matches(job: QueuedJob, host: HostCandidate): boolean {
  if (job.required_site !== null && host.site !== job.required_site) return false;
  if (job.required_driver !== null && host.driver_kind !== job.required_driver) return false;
  for (const [k, v] of Object.entries(job.required_tags)) if (host.tags[k] !== v) return false;
  for (const t of job.media_types) if (!host.media_types.includes(t)) return false;
  return true;
}

export class Scheduler {
  private readonly log: Logger;
  private running = false;
  private dirty = false;
  private stopped = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private current: Promise<void> | undefined;
  private proxyTurn = 0;
  private logTurn = 0;
  /** Free slots seen by the last pass: sizes the first read of the queue. */
  private lastSlots = 0;
  /** Passes failed in a row: the retry backs off and the log says the start and the end of a streak. */
  private failures = 0;

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
    private readonly deliver: StartDelivery = () => undefined,
    private readonly metrics?: JobMetrics,
  ) {
    this.log = ctx.logger.child({ subsystem: "scheduler" });
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
          if (this.failures > 0) this.log.info({ failures: this.failures }, "scheduling passes succeed again");
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
        if (result.retry && !this.stopped && this.retryTimer === undefined) {
          // A pass that lost a race retries at once (15-30 ms); one that failed backs off up to 2 s.
          const delay = this.failures === 0 ? RETRY_MS : Math.min(2000, RETRY_MS * 2 ** Math.min(this.failures, 8));
          this.retryTimer = setTimeout(() => {
            this.retryTimer = undefined;
            this.wake();
          }, delay + Math.floor(Math.random() * delay));
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
    return { assigned: result.assigned, retry: result.retry };
  }

  private async assign(tx: ReservedSql): Promise<Assigned> {
    const end = async (retry: boolean): Promise<Assigned> => {
      await tx`commit`;
      return { assigned: 0, retry, local: new Map(), tokens: new Map() };
    };
    const limit = this.config.maxJobsPerUser;
    const aging = this.config.schedulerAgingMs;
    // The queue in order. Jobs of one base priority are in queued_at order
    // whatever the aging, so the first `offset + size` of the whole queue
    // are among the first `offset + size` of each priority: those are read
    // through the queue index (priorities found by a skip scan), and only
    // they are sorted, not the whole queue.
    const queue = (size: number, offset: number) => tx<QueuedJob[]>`
      with recursive p as (
        (select priority from jobs where state = 'queued' order by priority desc limit 1)
        union all
        select (select j.priority from jobs j where j.state = 'queued' and j.priority < p.priority order by j.priority desc limit 1)
        from p where p.priority is not null)
      select j.id, j.owner_id, j.attempt, j.host_count, j.required_tags, j.required_site, j.required_driver, j.media_types,
        j.manifest_digest, j.image_holder, j.job_timeout_ms::float8 as job_timeout_ms
      from p, lateral (
        select * from jobs j where j.state = 'queued' and j.priority = p.priority
        order by j.queued_at, j.created_at, j.id limit ${offset + size}) j
      order by j.priority + ${aging > 0 ? tx`floor(extract(epoch from (now() - j.queued_at)) * 1000 / ${aging})::int` : tx`0`} desc,
        j.queued_at, j.created_at, j.id
      limit ${size} offset ${offset}`;
    // The first chunk of the queue, sized to the free slots of the last pass
    // (a pass that can place a few jobs reads a few rows, not the whole queue).
    let size = Math.min(CHUNK, Math.max(32, 4 * this.lastSlots));
    // Pipelined: BEGIN, the pass lock, then the reads, in one round trip.
    pipeline(tx`begin`);
    pipeline(tx`set local plan_cache_mode = force_custom_plan`);
    const [[{ ok }], eligible, [{ grants }], counts, first, services] = await Promise.all([
      tx<{ ok: boolean }[]>`select pg_try_advisory_xact_lock(${PASS_LOCK.toString()}::bigint) as ok`,
      tx<HostCandidate[]>`
        select h.id, h.name, treadmill_host_match_tags(h.tags, h.site) as tags, h.site, h.driver_kind, h.media_types,
          h.attached_replica,
          greatest(0, least(h.capacity, coalesce(h.supervisor_capacity, h.capacity))
            - (select count(*) from job_hosts jh where jh.host_id = h.id and jh.released_at is null))::int as free
        from hosts h
        where h.attached_replica is not null and h.admin_state = 'enabled' and not h.supervisor_draining
        order by h.name`,
      tx<{ grants: boolean }[]>`select exists (select 1 from host_grants) as grants`,
      limit > 0
        ? tx<{ owner_id: string; n: number }[]>`
            select owner_id, count(*)::int as n from jobs where state in ${tx(ACTIVE_STATES)} group by owner_id`
        : Promise.resolve([]),
      queue(size, 0),
      tx<Service[]>`
        select kind, url, site from services
        where kind in ('log_server', 'proxy') and not draining
          and last_heartbeat_at > now() - (3 * heartbeat_interval_ms) * interval '1 millisecond'
        order by url`,
    ]);
    if (!ok) return end(true);
    const free = new Map(eligible.filter((h) => h.free > 0).map((h) => [h.id, h]));
    this.lastSlots = [...free.values()].reduce((n, h) => n + h.free, 0);
    if (free.size === 0 || first.length === 0) return end(false);

    const reserved = new Set<string>();
    const placements: Placement[] = [];
    const seen = new Set<string>();
    const running = new Map(counts.map((c) => [c.owner_id, c.n]));
    const denied = new Set<string>(); // `${owner} ${host}`
    const accessKnown = new Set<string>(); // owners whose access to the free hosts is loaded

    const available = () => [...free.values()].filter((h) => h.free > 0 && !reserved.has(h.id));
    for (let offset = 0, chunk = first; ; ) {
      const newOwners = [...new Set(chunk.map((j) => j.owner_id))].filter((o) => !accessKnown.has(o));
      if (grants && newOwners.length > 0) {
        const rows = await tx<{ owner: string; host: string }[]>`
          select o::text as owner, h::text as host
          from unnest(${newOwners}::uuid[]) o, unnest(${[...free.keys()]}::uuid[]) h
          where not treadmill_user_may_use_host(o, h)`;
        for (const r of rows) denied.add(`${r.owner} ${r.host}`);
      }
      for (const o of newOwners) accessKnown.add(o);

      for (const job of chunk) {
        if (seen.has(job.id)) continue;
        seen.add(job.id);
        if (limit > 0 && (running.get(job.owner_id) ?? 0) >= limit) continue;
        const candidates = available().filter((h) => matches(job, h) && !denied.has(`${job.owner_id} ${h.id}`));
        if (candidates.length >= job.host_count) {
          candidates.sort((a, b) => b.free - a.free || (a.name < b.name ? -1 : 1));
          const chosen = candidates.slice(0, job.host_count);
          for (const h of chosen) h.free -= 1;
          placements.push({ job, hosts: chosen });
          if (limit > 0) running.set(job.owner_id, (running.get(job.owner_id) ?? 0) + 1);
        } else if (candidates.length > 0 && (await this.couldFit(tx, job, eligible, grants))) {
          // Blocked, but it will fit once busy hosts free up: keep what it sees for it.
          for (const h of candidates) reserved.add(h.id);
        }
        if (available().length === 0) break;
      }
      if (chunk.length < size || available().length === 0) break;
      offset += size;
      size = CHUNK;
      chunk = await queue(size, offset);
    }
    if (placements.length === 0) return end(false);
    const { assigned, local, tokens } = await this.write(tx, placements, services);
    return { assigned, retry: assigned < placements.length, local, tokens };
  }

  /** Whether enough attached, enabled hosts (busy or not) match the job for it to run some day soon. */
  private async couldFit(tx: ReservedSql, job: QueuedJob, eligible: HostCandidate[], grants: boolean): Promise<boolean> {
    const matching = eligible.filter((h) => matches(job, h));
    if (matching.length < job.host_count) return false;
    if (!grants) return true;
    const [{ n }] = await tx<{ n: number }[]>`
      select count(*)::int as n from unnest(${matching.map((h) => h.id)}::uuid[]) h
      where treadmill_user_may_use_host(${job.owner_id}, h)`;
    return n >= job.host_count;
  }

  /**
   * Locks what the placements use (skipping rows busy elsewhere: hosts
   * re-checked to qualify and to have the slots, jobs to be still queued),
   * records the placements whose every row it locked, and commits. Returns
   * how many jobs it assigned and the StartJob rows of this replica's hosts.
   */
  private async write(
    tx: ReservedSql,
    placements: Placement[],
    services: Service[],
  ): Promise<{ assigned: number; local: Map<string, StartRow[]>; tokens: Map<string, Map<string, Promise<StartTokens>>> }> {
    const logServers = services.filter((s) => s.kind === "log_server").map((s) => s.url);
    const proxies = services.filter((s) => s.kind === "proxy");
    const replicas = Math.min(this.config.logReplicas, logServers.length);

    const plan = placements.map((p) => {
      const logs: string[] = [];
      for (let i = 0; i < replicas; i++) logs.push(logServers[(this.logTurn + i) % logServers.length]);
      this.logTurn = (this.logTurn + 1) % Math.max(1, logServers.length);
      const site = p.hosts[0].site;
      const local = proxies.filter((s) => s.site === site);
      const pool = local.length > 0 ? local : proxies;
      const proxy = pool.length > 0 ? pool[this.proxyTurn++ % pool.length].url : "";
      return {
        id: p.job.id,
        owner: p.job.owner_id,
        attempt: p.job.attempt,
        logs,
        proxy,
        message: `assigned to ${p.hosts.map((h) => h.name).join(", ")}`,
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
      tx<(StartRow & { host_id: string; local: boolean; n1: unknown; n2: unknown; n3: unknown })[]>`
        with v as materialized (
          select * from jsonb_to_recordset(${tx.json(plan as never)}::jsonb)
            as v(id uuid, owner uuid, attempt int, logs text[], proxy text, message text)),
        r as materialized (
          select * from jsonb_to_recordset(${tx.json(rows as never)}::jsonb)
            as r(job uuid, host uuid, attempt int, index int, local boolean)),
        lh as materialized (
          select h.id,
            least(h.capacity, coalesce(h.supervisor_capacity, h.capacity))
              - (select count(*) from job_hosts jh where jh.host_id = h.id and jh.released_at is null)::int as free
          from hosts h
          where h.id in (select host from r)
            and h.attached_replica is not null and h.admin_state = 'enabled' and not h.supervisor_draining
          order by h.id
          for update of h skip locked),
        lj as materialized (
          select id from jobs where id in (select id from v) and state = 'queued' order by id for update skip locked),
        -- All or none: a job whose every host (with the slots) and itself are locked.
        ok as materialized (
          select v.* from v
          where v.id in (select id from lj)
            and not exists (
              select 1 from r left join lh on lh.id = r.host
              where r.job = v.id
                and (lh.id is null or lh.free < (select count(*) from r r2 where r2.host = r.host)))),
        ins as (
          insert into job_hosts (job_id, host_id, attempt, host_index)
          select job, host, attempt, index from r where job in (select id from ok)),
        j as (
          update jobs j set state = 'assigned', stage = null, assigned_at = now(), started_at = null,
            deadline_at = now() + j.job_timeout_ms * interval '1 millisecond',
            log_server_urls = j.log_server_urls || array(select u from unnest(v.logs) u where u <> all(j.log_server_urls)),
            proxy_url = v.proxy, status_message = '', updated_at = now()
          from ok v where j.id = v.id
          returning j.id, j.attempt, j.spec, j.manifest_digest, j.owner_id, j.image_holder, j.deadline_at, j.log_server_urls, j.proxy_url),
        ev as (
          insert into job_events (job_id, kind, state, message, attempt)
          select id, 'state_changed', 'assigned', message, attempt from ok),
        au as (
          insert into audit_events (kind, actor, job_id, user_id, message, details)
          select 'job.state_changed', 'system', id, owner, message, jsonb_build_object('state', 'assigned', 'attempt', attempt) from ok)
        select ${startColumns(tx)}, r.index as host_index, r.host as host_id, r.local,
          pg_notify('treadmill_jobs', j.id::text) as n1, pg_notify('treadmill_hosts', r.host::text) as n2,
          case when not r.local then pg_notify('treadmill_commands', r.host::text) end as n3
        from j join r on r.job = j.id join hosts h on h.id = r.host`,
      tx`commit`.execute(),
    ]);
    const peers = new Map(placements.map((p) => [p.job.id, p.hosts.map((h, index) => ({ index, id: h.id, name: h.name }))]));
    const local = new Map<string, StartRow[]>();
    for (const { host_id, local: here, n1: _1, n2: _2, n3: _3, ...start } of starts) {
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
