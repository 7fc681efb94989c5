/**
 * The scheduler (DESIGN.md §5). A pass assigns queued jobs to hosts with free
 * slots, in one transaction:
 *
 * - Only one pass runs at a time across replicas: it takes a transaction-level
 *   advisory lock with pg_try_advisory_xact_lock; a replica that does not get
 *   it tries again shortly (the holder may have read the queue before the
 *   change that woke this one). Nothing in a pass ever waits for a lock: the
 *   host rows it places jobs on and the job rows it assigns are locked with
 *   FOR UPDATE SKIP LOCKED (a row another transaction is changing -- a host
 *   attaching or being disabled, a job being canceled -- is left for the next
 *   pass). Hence no deadlock, and a job is never assigned twice.
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
import type { TransactionSql } from "postgres";
import type { Logger } from "../../lib/logger.js";
import type { CoordinatorContext } from "../context.js";
import type { JobConfig } from "./config.js";

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
  site_proxy?: string;
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

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
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
          result = await this.pass();
        } catch (err) {
          if (this.stopped) return;
          this.log.error({ err }, "scheduling pass failed");
          result = { assigned: 0, retry: true };
        }
        if (result.retry && !this.stopped && this.retryTimer === undefined) {
          this.retryTimer = setTimeout(() => {
            this.retryTimer = undefined;
            this.wake();
          }, RETRY_MS + Math.floor(Math.random() * RETRY_MS));
          this.retryTimer.unref?.();
        }
      } while (this.dirty && !this.stopped);
    } finally {
      this.running = false;
    }
  }

  /** One scheduling pass; exported for tests through `runPass`. */
  async pass(): Promise<PassResult> {
    return this.ctx.sql.begin(async (tx) => {
      const [{ ok }] = await tx<{ ok: boolean }[]>`select pg_try_advisory_xact_lock(${PASS_LOCK.toString()}::bigint) as ok`;
      if (!ok) return { assigned: 0, retry: true };
      return this.assign(tx);
    });
  }

  private async assign(tx: TransactionSql): Promise<PassResult> {
    let retry = false;
    const eligible = await tx<HostCandidate[]>`
      select h.id, h.name, treadmill_host_match_tags(h.tags, h.site) as tags, h.site, h.driver_kind, h.media_types,
        greatest(0, least(h.capacity, coalesce(h.supervisor_capacity, h.capacity))
          - (select count(*) from job_hosts jh where jh.host_id = h.id and jh.released_at is null))::int as free
      from hosts h
      where h.attached_replica is not null and h.admin_state = 'enabled' and not h.supervisor_draining
      order by h.name`;
    const withFree = eligible.filter((h) => h.free > 0);
    if (withFree.length === 0) return { assigned: 0, retry };
    const lockedIds = new Set(
      (
        await tx<{ id: string }[]>`
          select id from hosts
          where id = any(${withFree.map((h) => h.id)}::uuid[])
            and attached_replica is not null and admin_state = 'enabled' and not supervisor_draining
          for update skip locked`
      ).map((r) => r.id),
    );
    if (lockedIds.size < withFree.length) retry = true;
    const free = new Map(withFree.filter((h) => lockedIds.has(h.id)).map((h) => [h.id, h]));
    if (free.size === 0) return { assigned: 0, retry };

    const [{ grants }] = await tx<{ grants: boolean }[]>`select exists (select 1 from host_grants) as grants`;
    const reserved = new Set<string>();
    const placements: Placement[] = [];
    const seen = new Set<string>();
    const running = new Map<string, number>();
    const denied = new Set<string>(); // `${owner} ${host}`
    const accessKnown = new Set<string>(); // owners whose access to the free hosts is loaded
    const limit = this.config.maxJobsPerUser;
    const aging = this.config.schedulerAgingMs;

    const available = () => [...free.values()].filter((h) => h.free > 0 && !reserved.has(h.id));
    // Read the queue in chunks sized to the free slots: a pass that can place a
    // few jobs reads a few rows, not the whole queue.
    const slots = [...free.values()].reduce((n, h) => n + h.free, 0);
    let size = Math.min(CHUNK, Math.max(32, 4 * slots));
    for (let offset = 0; available().length > 0; offset += size, size = CHUNK) {
      const chunk = await tx<QueuedJob[]>`
        select id, owner_id, attempt, host_count, required_tags, required_site, required_driver, media_types
        from jobs
        where state = 'queued'
        order by priority + ${aging > 0 ? tx`floor(extract(epoch from (now() - queued_at)) * 1000 / ${aging})::int` : tx`0`} desc,
          queued_at, created_at, id
        limit ${size} offset ${offset}`;
      const owners = [...new Set(chunk.map((j) => j.owner_id))];
      const newOwners = owners.filter((o) => !accessKnown.has(o));
      if (grants && newOwners.length > 0) {
        const rows = await tx<{ owner: string; host: string }[]>`
          select o::text as owner, h::text as host
          from unnest(${newOwners}::uuid[]) o, unnest(${[...free.keys()]}::uuid[]) h
          where not treadmill_user_may_use_host(o, h)`;
        for (const r of rows) denied.add(`${r.owner} ${r.host}`);
      }
      for (const o of newOwners) accessKnown.add(o);
      if (limit > 0) {
        const counts = await tx<{ owner_id: string; n: number }[]>`
          select owner_id, count(*)::int as n from jobs
          where owner_id = any(${owners.filter((o) => !running.has(o))}::uuid[])
            and state in ('assigned', 'initializing', 'running', 'terminating')
          group by owner_id`;
        for (const o of owners) if (!running.has(o)) running.set(o, 0);
        for (const c of counts) running.set(c.owner_id, c.n);
      }

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
      if (chunk.length < size) break;
    }
    if (placements.length === 0) return { assigned: 0, retry };

    const lockedJobs = new Set(
      (
        await tx<{ id: string }[]>`
          select id from jobs where id = any(${placements.map((p) => p.job.id)}::uuid[]) and state = 'queued'
          for update skip locked`
      ).map((r) => r.id),
    );
    const final = placements.filter((p) => lockedJobs.has(p.job.id));
    if (final.length < placements.length) retry = true;
    if (final.length === 0) return { assigned: 0, retry };
    await this.write(tx, final);
    return { assigned: final.length, retry };
  }

  /** Whether enough attached, enabled hosts (busy or not) match the job for it to run some day soon. */
  private async couldFit(tx: TransactionSql, job: QueuedJob, eligible: HostCandidate[], grants: boolean): Promise<boolean> {
    const matching = eligible.filter((h) => matches(job, h));
    if (matching.length < job.host_count) return false;
    if (!grants) return true;
    const [{ n }] = await tx<{ n: number }[]>`
      select count(*)::int as n from unnest(${matching.map((h) => h.id)}::uuid[]) h
      where treadmill_user_may_use_host(${job.owner_id}, h)`;
    return n >= job.host_count;
  }

  private async write(tx: TransactionSql, placements: Placement[]): Promise<void> {
    const services = await tx<{ kind: string; url: string; site: string }[]>`
      select kind, url, site from services
      where kind in ('log_server', 'proxy') and not draining
        and last_heartbeat_at > now() - (3 * heartbeat_interval_ms) * interval '1 millisecond'
      order by url`;
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
    const rows = placements.flatMap((p) => p.hosts.map((h, index) => ({ job: p.job.id, host: h.id, attempt: p.job.attempt, index })));
    await tx`
      insert into job_hosts (job_id, host_id, attempt, host_index)
      select * from unnest(${rows.map((r) => r.job)}::uuid[], ${rows.map((r) => r.host)}::uuid[],
        ${rows.map((r) => r.attempt)}::int[], ${rows.map((r) => r.index)}::int[])`;
    const planJson = tx.json(plan as never);
    await tx`
      update jobs j set state = 'assigned', stage = null, assigned_at = now(), started_at = null,
        deadline_at = now() + j.job_timeout_ms * interval '1 millisecond',
        log_server_urls = j.log_server_urls || array(select u from unnest(v.logs) u where u <> all(j.log_server_urls)),
        proxy_url = v.proxy, status_message = '', updated_at = now()
      from jsonb_to_recordset(${planJson}::jsonb) as v(id uuid, logs text[], proxy text)
      where j.id = v.id`;
    await tx`
      with v as (select * from jsonb_to_recordset(${planJson}::jsonb) as v(id uuid, owner uuid, attempt int, message text)),
      e as (
        insert into job_events (job_id, kind, state, message, attempt)
        select id, 'state_changed', 'assigned', message, attempt from v)
      insert into audit_events (kind, actor, job_id, user_id, message, details)
      select 'job.state_changed', 'system', id, owner, message, jsonb_build_object('state', 'assigned', 'attempt', attempt) from v`;
    const hostIds = [...new Set(rows.map((r) => r.host))];
    await tx`
      select pg_notify('treadmill_jobs', id) from unnest(${plan.map((p) => p.id)}::text[]) id`;
    await tx`
      select pg_notify('treadmill_commands', id), pg_notify('treadmill_hosts', id) from unnest(${hostIds}::text[]) id`;
    this.log.debug({ jobs: plan.length, hosts: hostIds.length }, "jobs assigned");
  }
}
