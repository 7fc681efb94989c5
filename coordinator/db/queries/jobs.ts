/**
 * Jobs (tables `jobs`, `job_secrets`): the job system's statements on them.
 *
 * A job's state changes in one place, `writeJobStates`: the state write,
 * its timeline event and audit entry (events.ts), and the notifications
 * ('treadmill_jobs'; 'treadmill_commands' to the hosts still holding a slot
 * when what they run changes; 'treadmill_schedule' when a job is queued
 * again), all in the caller's transaction, their statements sent together.
 * Every writer of job state calls it (the transitions of a host's news, the
 * end or restart of an attempt, a cancel, a job timeout) except two that
 * write their change as part of one statement for speed, with their events
 * through the same `eventWrites`: SubmitJob's insert (recordEvent) and the
 * scheduler's assignment (`assignJobs`).
 */
import type { JsonValue } from "@bufbuild/protobuf";
import type { Sql, TransactionSql } from "postgres";
import { isUniqueViolation } from "../../shared/common.js";
import { pipeline } from "../reserved.js";
import { type EventInput, eventWrites, recordEvents } from "./events.js";
import { leaseSchedulable } from "./hosts.js";

export type Db = Sql | TransactionSql;

/**
 * Plans every statement of the transaction for its parameters. The job system's
 * statements are prepared; a generic plan cached while a table was small (a
 * fresh database filling up faster than autovacuum analyzes it) would scan
 * the whole table where an index lookup is due. Pipelined ahead of the
 * transaction's first statement: it costs no round trip.
 */
export function customPlans(tx: Db): void {
  pipeline(tx`set local plan_cache_mode = force_custom_plan`);
}

export const ACTIVE_STATES = ["assigned", "initializing", "running", "terminating"] as const;
export type DbState = "queued" | (typeof ACTIVE_STATES)[number] | "finalized";
export type DbReason =
  | "workload_exited"
  | "canceled"
  | "job_timeout"
  | "queue_timeout"
  | "host_dropped"
  | "image_error"
  | "host_start_failure"
  | "internal_error";

/** A jobs row as the job system reads it, with the hosts of its current attempt. */
export interface JobRow {
  id: string;
  owner_id: string;
  spec: JsonValue;
  state: DbState;
  stage: string | null;
  reason: DbReason | null;
  exit_status: "success" | "failure" | null;
  exit_code: number | null;
  attempt: number;
  priority: number;
  max_restarts: number;
  manifest_digest: string;
  status_message: string;
  stop_reason: "canceled" | "job_timeout" | null;
  created_at: Date;
  updated_at: Date;
  queued_at: Date;
  assigned_at: Date | null;
  started_at: Date | null;
  finalized_at: Date | null;
  job_timeout_ms: string | number;
  log_server_urls: string[];
  host_ids: string[];
  log_status: "shipping" | "complete" | "incomplete" | null;
  log_bytes_lost: string | number;
  log_status_message: string;
  /** The health check of a health job (migration 0013), else null. */
  health_check_id: string | null;
  /** The lease the job runs inside (migration 0017), else null. */
  lease_id: string | null;
  /** The counts of the latest attempt with test results (migration 0022), else null. */
  results: ResultCountsRow | null;
  /** A case failed on one attempt and passed on a later one. */
  flaky: boolean;
  /** The job this one re-runs (migration 0024), else null. */
  rerun_of_job_id: string | null;
  /** The jobs that re-run this one, oldest first. */
  rerun_job_ids: string[];
}

/** A job_results row's counts as jobColumns reads them (bigints as JSON numbers). */
export interface ResultCountsRow {
  attempt: number;
  total: number;
  passed: number;
  failed: number;
  skipped: number;
  errored: number;
  complete: boolean;
}

/** The select list of JobRow (jobs aliased `j`). */
export const jobColumns = (sql: Db) => sql`
  j.id, j.owner_id, j.spec, j.state, j.stage, j.reason, j.exit_status, j.exit_code, j.attempt,
  j.priority, j.max_restarts, j.manifest_digest, j.status_message, j.stop_reason, j.created_at,
  j.updated_at, j.queued_at, j.assigned_at, j.started_at, j.finalized_at, j.job_timeout_ms,
  j.log_server_urls, j.log_status, j.log_bytes_lost, j.log_status_message, j.health_check_id, j.lease_id,
  (select to_jsonb(r) from (select attempt, total, passed, failed, skipped, errored, complete from job_results
     where job_id = j.id order by attempt desc limit 1) r) as results,
  -- Flaky: a case failed, then passed on a later attempt; or the workload
  -- failed, and a retry of it (JobSpec.retry) passed.
  (exists (select 1 from job_results where job_id = j.id and flaky)
   or (j.state = 'finalized' and j.exit_status = 'success'
       and coalesce((j.retries->>'workload_failure')::int, 0) > 0)) as flaky,
  j.rerun_of_job_id, array(select r.id from jobs r where r.rerun_of_job_id = j.id order by r.id) as rerun_job_ids,
  coalesce((select array_agg(jh.host_id order by jh.host_index) from job_hosts jh
            where jh.job_id = j.id and jh.attempt = j.attempt), '{}') as host_ids`;

/**
 * A job; with `lock`, its row locked until the transaction ends. Job rows
 * are locked FOR NO KEY UPDATE everywhere: it orders every change of a job,
 * and it lets a transaction insert a row that references the job (its
 * foreign-key check takes FOR KEY SHARE) without waiting. With FOR UPDATE,
 * a second ControlHost call holding its job waited for the first call's
 * answer (its control row, same request id), and the answer waited to
 * insert the job's timeline event: a deadlock, one call INTERNAL.
 */
export async function loadJob(sql: Db, id: string, options: { lock?: boolean } = {}): Promise<JobRow | undefined> {
  const [row] = options.lock
    ? await sql<JobRow[]>`select ${jobColumns(sql)} from jobs j where j.id = ${id} for no key update of j`
    : await sql<JobRow[]>`select ${jobColumns(sql)} from jobs j where j.id = ${id}`;
  return row;
}

/**
 * What the transitions read of a job: its state and what decides how an
 * attempt ends; `lease_id` (when read) tells whether a hold lease may end
 * with the attempt.
 */
export type JobHead = Pick<JobRow, "id" | "owner_id" | "state" | "stage" | "attempt" | "max_restarts" | "stop_reason" | "health_check_id"> & {
  lease_id?: string | null;
  /** The retry policy (migration 0024; absent: none): its conditions, budget per condition, retries used per condition. */
  retry_on?: string[];
  retry_max?: number;
  retries?: Record<string, number>;
  retry_other_host?: boolean;
};

/** The heads of several jobs by id (missing ones are absent), their rows locked in id order. */
export async function lockJobHeads(sql: Db, ids: string[]): Promise<Map<string, JobHead>> {
  if (ids.length === 0) return new Map();
  const rows = await sql<JobHead[]>`
    select id, owner_id, state, stage, attempt, max_restarts, stop_reason, health_check_id, lease_id,
      retry_on, retry_max, retries, retry_other_host from jobs
    where id = any(${[...ids].sort()}::uuid[]) order by id for no key update`;
  return new Map(rows.map((r) => [r.id, r]));
}

/** Hosts still holding a slot for any attempt of the jobs (their streams must hear of a change). */
async function notifyJobHosts(tx: Db, jobIds: string | string[]): Promise<void> {
  const ids = typeof jobIds === "string" ? [jobIds] : jobIds;
  if (ids.length === 0) return;
  await tx`
    select pg_notify('treadmill_commands', h.id::text), pg_notify('treadmill_hosts', h.id::text)
    from (select distinct host_id as id from job_hosts where job_id = any(${ids}::uuid[]) and released_at is null) h`;
}

/** Locks the rows of jobs `ids` in id order (the lock order); starts it at once, ahead of what follows on the connection. */
export function lockJobs(tx: Db, ids: string[]): Promise<unknown> {
  return tx`select 1 from jobs where id = any(${[...ids].sort()}::uuid[]) order by id for no key update`.execute();
}

/** A change of one job's state (or of its requested stop), with the timeline event that says it. */
export type JobStateChange =
  /** The job's state follows its hosts' (INITIALIZING, RUNNING, TERMINATING, with a stage). */
  | { kind: "progress"; id: string; state: DbState; stage: string | null; event: EventInput }
  /** The attempt ended and the job is queued again as `attempt`. */
  | {
      kind: "restart";
      id: string;
      attempt: number;
      message: string;
      event: EventInput;
      /** A retry (JobSpec.retry): the condition whose budget it uses, and a host to avoid from now on (other_host). */
      retry?: { condition: string; avoidHostId: string | null };
    }
  /** The job is finalized (its secret values stay for a re-run: migration 0024). */
  | {
      kind: "finalize";
      id: string;
      reason: DbReason;
      exitStatus: "success" | "failure" | null;
      exitCode: number | null;
      message: string;
      event: EventInput;
    }
  /** A stop is requested (cancel, job timeout): the hosts are told to stop it. */
  | { kind: "stop"; id: string; stopReason: "canceled" | "job_timeout"; event: EventInput };

/**
 * Records changes of distinct jobs, locked by the caller: the state writes,
 * their events (job_events, audit, 'treadmill_jobs') in the order given,
 * and the notifications. A few statements whatever their number, sent
 * together.
 */
export async function writeJobStates(tx: Db, changes: JobStateChange[]): Promise<void> {
  if (changes.length === 0) return;
  const of = <K extends JobStateChange["kind"]>(kind: K) => changes.filter((c): c is Extract<JobStateChange, { kind: K }> => c.kind === kind);
  const progress = of("progress").map((c) => ({ id: c.id, state: c.state, stage: c.stage }));
  const restarts = of("restart").map((c) => ({
    id: c.id,
    attempt: c.attempt,
    message: c.message,
    condition: c.retry?.condition ?? null,
    avoid: c.retry?.avoidHostId ?? null,
  }));
  const finals = of("finalize").map((c) => ({
    id: c.id,
    reason: c.reason,
    exit_status: c.exitStatus,
    exit_code: c.exitCode,
    message: c.message,
  }));
  const stops = of("stop").map((c) => ({ id: c.id, reason: c.stopReason }));
  // The hosts of a job that ends, restarts or is to stop must hear of it.
  const told = changes.filter((c) => c.kind !== "progress").map((c) => c.id);
  await Promise.all([
    progress.length > 0 &&
      tx`
        update jobs j set state = v.state, stage = v.stage, updated_at = now(),
          started_at = case when v.state = 'running' then coalesce(j.started_at, now()) else j.started_at end
        from jsonb_to_recordset(${tx.json(progress as never)}::jsonb) as v(id uuid, state text, stage text)
        where j.id = v.id`,
    restarts.length > 0 &&
      tx`
        update jobs j set state = 'queued', stage = null, attempt = v.attempt, queued_at = now(),
          assigned_at = null, started_at = null, deadline_at = null, proxy_url = '',
          status_message = v.message, updated_at = now(),
          retries = case when v.condition is null then j.retries
            else j.retries || jsonb_build_object(v.condition, coalesce((j.retries->>v.condition)::int, 0) + 1) end,
          avoid_host_ids = case when v.avoid is null or v.avoid = any(j.avoid_host_ids) then j.avoid_host_ids
            else j.avoid_host_ids || v.avoid end
        from jsonb_to_recordset(${tx.json(restarts as never)}::jsonb) as v(id uuid, attempt int, message text, condition text, avoid uuid)
        where j.id = v.id
        returning pg_notify('treadmill_schedule', '')`,
    finals.length > 0 &&
      tx`
        update jobs j set state = 'finalized', stage = null, reason = v.reason, exit_status = v.exit_status,
          exit_code = v.exit_code, status_message = v.message, stop_reason = null,
          finalized_at = now(), updated_at = now()
        from jsonb_to_recordset(${tx.json(finals as never)}::jsonb)
          as v(id uuid, reason text, exit_status text, exit_code int, message text)
        where j.id = v.id`,
    stops.length > 0 &&
      tx`
        update jobs j set stop_reason = v.reason, stop_requested_at = now(), updated_at = now()
        from jsonb_to_recordset(${tx.json(stops as never)}::jsonb) as v(id uuid, reason text)
        where j.id = v.id`,
    recordEvents(
      tx,
      changes.map((c) => c.event),
    ),
    notifyJobHosts(tx, told),
  ]);
}

/** What a StartJob is built from: a job row (`j`), its host (`h`) and what they point at. */
export interface StartRow {
  id: string;
  attempt: number;
  spec: JsonValue;
  manifest_digest: string;
  owner_id: string;
  /** The holder the image token names (jobs.image_holder; null: the owner). */
  image_holder: string | null;
  deadline_at: Date | null;
  log_server_urls: string[];
  proxy_url: string;
  host_index: number;
  secrets: Record<string, string>;
  locations: string[] | null;
  cache_url: string | null;
  peers: { index: number; id: string; name: string }[] | null;
}

/**
 * The select list of a StartRow but for `host_index` and `peers`: the job's
 * columns from `j` (jobs, or an update's returned rows), the secret values,
 * the image's locations (the host's site first) and the site's cache from `h`
 * (hosts).
 */
export const startColumns = (sql: Db) => sql`
  j.id, j.attempt, j.spec, j.manifest_digest, j.owner_id, j.image_holder, j.deadline_at, j.log_server_urls, j.proxy_url,
  (select coalesce(jsonb_object_agg(s.name, s.value), '{}') from job_secrets s where s.job_id = j.id) as secrets,
  (select array_agg(u order by same_site desc, first_seen)
     from (select l->>'url' as u, bool_or(coalesce(l->>'site', '') = h.site) as same_site, min(i.created_at) as first_seen
           from images i, jsonb_array_elements(i.locations) l
           where i.digest = j.manifest_digest and coalesce(l->>'url', '') <> ''
           group by l->>'url') loc) as locations,
  (select s.url from services s
     where s.kind = 'image_cache' and s.site = h.site and not s.draining
       and s.last_heartbeat_at > now() - (3 * s.heartbeat_interval_ms) * interval '1 millisecond'
     order by s.active_streams, s.url limit 1) as cache_url`;

/** The StartJob rows of the current, unfinalized attempts of `jobIds` on `hostId`. */
export function startRows(sql: Db, hostId: string, jobIds: string[]): Promise<StartRow[]> {
  return sql<StartRow[]>`
    select ${startColumns(sql)}, jh.host_index,
      (select jsonb_agg(jsonb_build_object('index', p.host_index, 'id', p.host_id, 'name', ph.name) order by p.host_index)
         from job_hosts p join hosts ph on ph.id = p.host_id
         where p.job_id = j.id and p.attempt = j.attempt) as peers
    from jobs j
      join job_hosts jh on jh.job_id = j.id and jh.attempt = j.attempt and jh.host_id = ${hostId}
      join hosts h on h.id = jh.host_id
    where j.id = any(${jobIds}::uuid[]) and j.state <> 'finalized'`;
}

// A scheduling pass (jobs/scheduler.ts): its reads, sent together, and its
// one writing statement.

/** pg_advisory lock key of a scheduling pass ("tmsched" in ASCII). */
const PASS_LOCK = 0x746d_7363_6865_64n;

/** Takes the pass lock for the transaction, if no other pass holds it: one pass at a time across replicas. */
export async function tryPassLock(tx: Db): Promise<boolean> {
  const [{ ok }] = await tx<{ ok: boolean }[]>`select pg_try_advisory_xact_lock(${PASS_LOCK.toString()}::bigint) as ok`;
  return ok;
}

/** A queued job as a pass reads it. */
export interface QueuedJobRow {
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
  /** The lease it runs inside (queuedLeaseJobs), else null. */
  lease_id: string | null;
  /** Hosts its earlier attempts ran on, which a retry with other_host must not take (migration 0024). */
  avoid_host_ids?: string[];
}

/** The columns of a QueuedJobRow (jobs aliased `j`). */
const queuedColumns = (tx: Db) => tx`
  j.id, j.owner_id, j.attempt, j.host_count, j.required_tags, j.required_site, j.required_driver, j.media_types,
  j.manifest_digest, j.image_holder, j.job_timeout_ms::float8 as job_timeout_ms, j.lease_id, j.avoid_host_ids`;

/**
 * `size` queued jobs from `offset` in the scheduler's order (health jobs,
 * pinned to their hosts, and jobs inside leases are placed apart:
 * placeableHealthJobs, queuedLeaseJobs): effective
 * priority (priority plus one point per `agingMs` of waiting; 0: none),
 * queued_at, created_at, id.
 */
export function readQueue(tx: Db, size: number, offset: number, aging: number): Promise<QueuedJobRow[]> {
    // The queue in order. Jobs of one base priority are in queued_at order
  // whatever the aging, so the first `offset + size` of the whole queue
  // are among the first `offset + size` of each priority: those are read
  // through the queue index (priorities found by a skip scan), and only
  // they are sorted, not the whole queue.
  return tx<QueuedJobRow[]>`
      with recursive p as (
        (select priority from jobs where state = 'queued' order by priority desc limit 1)
        union all
        select (select j.priority from jobs j where j.state = 'queued' and j.priority < p.priority order by j.priority desc limit 1)
        from p where p.priority is not null)
      select ${queuedColumns(tx)}
      from p, lateral (
        select * from jobs j where j.state = 'queued' and j.priority = p.priority and j.pinned_host_id is null and j.lease_id is null
        order by j.queued_at, j.created_at, j.id limit ${offset + size}) j
      order by j.priority + ${aging > 0 ? tx`floor(extract(epoch from (now() - j.queued_at)) * 1000 / ${aging})::int` : tx`0`} desc,
        j.queued_at, j.created_at, j.id
      limit ${size} offset ${offset}`;
}

/**
 * The queued jobs inside the leases that have a free host, FIFO per lease
 * (queued_at, created_at, id), at most as many per lease as its free slots
 * (each job takes one at least), by lease; through jobs_lease_queued_idx,
 * empty while no lease job is queued.
 */
export function queuedLeaseJobs(tx: Db): Promise<QueuedJobRow[]> {
  return tx<QueuedJobRow[]>`
    with f as (
      select h.lease_id, sum(least(h.capacity, coalesce(h.supervisor_capacity, h.capacity)) - h.held_slots)::int as free
      from hosts h
      where h.lease_id in (select q.lease_id from jobs q where q.lease_id is not null and q.state = 'queued')
        and ${leaseSchedulable(tx)} and h.held_slots < least(h.capacity, coalesce(h.supervisor_capacity, h.capacity))
      group by h.lease_id)
    select ${queuedColumns(tx)}
    from f, lateral (
      select * from jobs j where j.lease_id = f.lease_id and j.state = 'queued'
      order by j.queued_at, j.created_at, j.id limit f.free) j
    order by j.lease_id, j.queued_at, j.created_at, j.id`;
}

/** Jobs assigned or running per owner (the per-user limit). */
export function activeJobsPerOwner(tx: Db): Promise<{ owner_id: string; n: number }[]> {
  return tx<{ owner_id: string; n: number }[]>`
    select owner_id, count(*)::int as n from jobs where state in ${tx(ACTIVE_STATES)} group by owner_id`;
}

/** A live log server or proxy (services), where a job's logs and sessions go. */
export interface LiveService {
  kind: string;
  url: string;
  site: string;
}

/** The live, non-draining log servers and proxies, by url. */
export function liveLogServersAndProxies(tx: Db): Promise<LiveService[]> {
  return tx<LiveService[]>`
    select kind, url, site from services
    where kind in ('log_server', 'proxy') and not draining
      and last_heartbeat_at > now() - (3 * heartbeat_interval_ms) * interval '1 millisecond'
    order by url`;
}

/** A placed job: its log servers, proxy and timeline message. */
export interface AssignedJob {
  id: string;
  owner: string;
  attempt: number;
  logs: string[];
  proxy: string;
  message: string;
  /** A health job on its own host: the host's health does not keep it away. */
  pinned?: boolean;
}

/** One host of a placed job (`local`: its stream is on this replica). */
export interface AssignedHost {
  job: string;
  host: string;
  attempt: number;
  index: number;
  local: boolean;
}

/**
 * The scheduler's one writing statement. Locks what the placements use,
 * skipping rows busy elsewhere (hosts re-checked to qualify and to have the
 * slots, jobs to be still queued), and records each placement whose every
 * row it locked (all or none): its slots, the job ASSIGNED, the timeline and
 * audit events (eventWrites, as recordEvents writes them), the
 * notifications. Returns the StartJob rows (but peers) of the assigned jobs'
 * hosts.
 */
export async function assignJobs(
  tx: Db,
  plan: AssignedJob[],
  rows: AssignedHost[],
): Promise<(Omit<StartRow, "peers"> & { host_id: string; local: boolean })[]> {
  // Planned afresh in every pass, as the pass's reads are (customPlans): a
  // generic plan saves the planning, 0.8 ms of each dispatch (the coordinator
  // benchmark's dispatch p50, 2.8 against 3.6 ms), but makes a pass of 70 jobs
  // take 64 ms instead of 28 (assignment throughput 970 against 1,300 jobs/s).
  // Sent now, ahead of the COMMIT the caller pipelines behind it. Awaited
  // alone, the statement would be handed to the connection a microtask after
  // that COMMIT (postgres.js sends a query once its promise is awaited), and
  // would run after the pass's transaction, outside its lock.
  const starts = tx<(StartRow & { host_id: string; local: boolean; n1: unknown; n2: unknown; n3: unknown })[]>`
    with v as materialized (
      select * from jsonb_to_recordset(${tx.json(plan as never)}::jsonb)
        as v(id uuid, owner uuid, attempt int, logs text[], proxy text, message text, pinned boolean)),
    r as materialized (
      select * from jsonb_to_recordset(${tx.json(rows as never)}::jsonb)
        as r(job uuid, host uuid, attempt int, index int, local boolean)),
    lh as materialized (
      select h.id,
        least(h.capacity, coalesce(h.supervisor_capacity, h.capacity)) - h.held_slots as free,
        -- A leased host under check takes its lease's jobs (leaseSchedulable).
        h.health in ('healthy', 'unknown') or (h.health = 'checking' and h.lease_id is not null) as healthy, h.lease_id, h.booked_from
      from hosts h
      where h.id in (select host from r)
        and h.attached_replica is not null and h.admin_state = 'enabled' and not h.supervisor_draining and h.health <> 'retired'
      order by h.id
      for update of h skip locked),
    lj as materialized (
      select id, lease_id, job_timeout_ms from jobs where id in (select id from v) and state = 'queued' order by id for no key update skip locked),
    -- All or none: a job whose every host (with the slots) and itself are
    -- locked, and whose hosts are its lease's, or (outside leases) held by
    -- no lease and booked no earlier than its end (the backfill rule).
    ok as materialized (
      select v.* from v join lj on lj.id = v.id
      where not exists (
          select 1 from r left join lh on lh.id = r.host
          where r.job = v.id
            and (lh.id is null or lh.free < (select count(*) from r r2 where r2.host = r.host)
              or (not lh.healthy and not coalesce(v.pinned, false))
              or lh.lease_id is distinct from lj.lease_id
              or (lj.lease_id is null and lh.booked_from < now() + lj.job_timeout_ms * interval '1 millisecond')))),
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
    -- The timeline and audit events of the assignments, written as recordEvents writes them.
    e as (
      select 0 as i, id as job, 'state_changed' as kind, 'assigned' as state, null::text as stage, message, attempt,
        null::uuid as host, 'system' as actor, owner, jsonb_build_object('state', 'assigned', 'attempt', attempt) as details
      from ok),
    ${eventWrites(tx, tx`e`)}
    select ${startColumns(tx)}, r.index as host_index, r.host as host_id, r.local,
      pg_notify('treadmill_jobs', j.id::text) as n1, pg_notify('treadmill_hosts', r.host::text) as n2,
      case when not r.local then pg_notify('treadmill_commands', r.host::text) end as n3
    from j join r on r.job = j.id join hosts h on h.id = r.host`.execute();
  return (await starts).map(({ n1: _1, n2: _2, n3: _3, ...start }) => start);
}

// The sweep (jobs/sweeper.ts): jobs past their timeouts, each re-checked
// under its row lock (rows busy elsewhere are left for the next sweep).

/** Queued jobs past their queue timeout, the longest past first (at most `limit`), through jobs_queue_deadline_idx (migration 0016). */
export function queueTimedOut(sql: Db, limit: number): Promise<{ id: string }[]> {
  return sql<{ id: string }[]>`
    select id from jobs
    where state = 'queued' and queue_deadline_at < now()
    order by queue_deadline_at limit ${limit}`;
}

/** Locks job `id` if it is still queued past its queue timeout (not busy elsewhere). */
export async function lockQueueTimedOut(tx: Db, id: string): Promise<boolean> {
  const rows = await tx`
    select id from jobs
    where id = ${id} and state = 'queued' and queue_deadline_at < now()
    for no key update skip locked`;
  return rows.length > 0;
}

/**
 * Jobs assigned or running past their deadline with no stop requested yet (at
 * most `limit`). Not a HELD job: its hold lease governs how long it lasts.
 */
export function jobTimedOut(sql: Db, limit: number): Promise<{ id: string }[]> {
  return sql<{ id: string }[]>`
    select id from jobs
    where state in ('assigned', 'initializing', 'running', 'terminating') and deadline_at < now() and stop_reason is null
      and stage is distinct from 'held'
    order by deadline_at limit ${limit}`;
}

/** Locks job `id` if it is still past its deadline with no stop requested (not busy elsewhere). */
export async function lockJobTimedOut(tx: Db, id: string): Promise<boolean> {
  const rows = await tx`
    select id from jobs
    where id = ${id} and state in ('assigned', 'initializing', 'running', 'terminating')
      and deadline_at < now() and stop_reason is null and stage is distinct from 'held'
    for no key update skip locked`;
  return rows.length > 0;
}

// JobService (jobs/job-service.ts).

/** An image of the catalog as SubmitJob reads it, with whether the caller may use it. */
export interface ImageForJob {
  name: string;
  tag: string;
  digest: string;
  media_types: string[];
  holder_id: string | null;
  allowed: boolean;
}

/** The catalog's image a job names (by digest: the one the user may use, held by the user first, oldest first). */
export async function imageForJob(
  sql: Db,
  userId: string,
  image: { digest: string } | { name: string; tag: string },
): Promise<ImageForJob | undefined> {
  const [row] =
    "digest" in image
      ? await sql<ImageForJob[]>`
          select name, tag, digest, media_types, holder_id, treadmill_user_may_use_image(${userId}, name, tag) as allowed
          from images where digest = ${image.digest}
          order by allowed desc, (holder_id = ${userId}) desc nulls last, created_at limit 1`
      : await sql<ImageForJob[]>`
          select name, tag, digest, media_types, holder_id, treadmill_user_may_use_image(${userId}, name, tag) as allowed
          from images where name = ${image.name} and tag = ${image.tag}`;
  return row;
}

/** A lease as SubmitJob reads it for a job to run inside it. */
export interface LeaseForJob {
  owner_id: string;
  state: "requested" | "waiting" | "active" | "ended";
  end_reason: string | null;
  status_message: string;
  /** Milliseconds from now to its end. */
  left_ms: number;
  /** Its booked hosts, or those it asks for while none is booked. */
  hosts: number;
}

/**
 * Lease `id` for a job to run inside it, its row share-locked until the
 * caller's commit: a lease ending meanwhile (its row updated) waits for
 * the job's insert and cancels the job with the lease's others, or ends
 * first and is seen ended here.
 */
export async function leaseForJob(tx: Db, id: string): Promise<LeaseForJob | undefined> {
  const [row] = await tx<LeaseForJob[]>`
    select l.owner_id, l.state, l.end_reason, l.status_message,
      (extract(epoch from (l.ends_at - now())) * 1000)::float8 as left_ms,
      coalesce(nullif((select count(*) from lease_hosts lh where lh.lease_id = l.id)::int, 0),
        case when cardinality(l.host_names) > 0 then cardinality(l.host_names) else l.host_count end) as hosts
    from leases l where l.id = ${id}
    for share of l`;
  return row;
}

/** The job a user submitted with `requestId` within the last 24 hours (older uses are forgotten). */
export async function jobOfRequest(tx: Db, ownerId: string, requestId: string): Promise<string | undefined> {
  await tx`
    update jobs set request_id = null
    where owner_id = ${ownerId} and request_id = ${requestId} and created_at < now() - interval '24 hours'`;
  const [existing] = await tx<{ id: string }[]>`select id from jobs where owner_id = ${ownerId} and request_id = ${requestId}`;
  return existing?.id;
}

/** A user's unfinished jobs. */
export async function unfinishedJobs(tx: Db, ownerId: string): Promise<number> {
  const [{ n }] = await tx<{ n: number }[]>`select count(*)::int as n from jobs where owner_id = ${ownerId} and state <> 'finalized'`;
  return n;
}

/** A new job, QUEUED. */
export interface NewJob {
  id: string;
  ownerId: string;
  spec: JsonValue;
  priority: number;
  digest: string;
  holderId: string | null;
  mediaTypes: string[];
  hostCount: number;
  requiredTags: Record<string, string>;
  requiredSite: string | null;
  requiredDriver: string | null;
  maxRestarts: number;
  queueTimeoutMs: number;
  jobTimeoutMs: number;
  requestId: string | null;
  /** JobSpec.hold_on_failure in ms; absent or null: a failed job is not held. */
  holdOnFailureMs?: number | null;
  /** name -> value of the secret parameters (job_secrets). */
  secrets: ReadonlyMap<string, string>;
  /** The lease it runs inside (JobSpec.lease_id), else null. */
  leaseId?: string | null;
  /** The job it re-runs (RerunJob), else null. */
  rerunOf?: string | null;
  /** JobSpec.retry: conditions (db names), retries per condition, other_host. */
  retry?: { on: string[]; max: number; otherHost: boolean };
}

/**
 * Inserts a job and its secret values; returns its id, or the id of the job
 * another call created with the same request id meanwhile (then nothing is
 * inserted). The caller records the `submitted` event.
 */
export async function insertJob(tx: TransactionSql, j: NewJob): Promise<string> {
  try {
    await tx.savepoint(async (sp) => {
      await sp`
        insert into jobs (id, owner_id, spec, priority, manifest_digest, image_holder, media_types, host_count, required_tags,
          required_site, required_driver, max_restarts, queue_timeout_ms, job_timeout_ms, request_id, lease_id, hold_on_failure_ms,
          rerun_of_job_id, retry_on, retry_max, retry_other_host)
        values (${j.id}, ${j.ownerId}, ${sp.json(j.spec as never)}, ${j.priority},
          ${j.digest}, ${j.holderId}, ${j.mediaTypes}, ${j.hostCount}, ${sp.json(j.requiredTags)},
          ${j.requiredSite}, ${j.requiredDriver}, ${j.maxRestarts}, ${j.queueTimeoutMs},
          ${j.jobTimeoutMs}, ${j.requestId}, ${j.leaseId ?? null}, ${j.holdOnFailureMs ?? null},
          ${j.rerunOf ?? null}, ${j.retry?.on ?? []}::text[], ${j.retry?.max ?? 0}, ${j.retry?.otherHost ?? false})`;
    });
  } catch (err) {
    if (!isUniqueViolation(err, "jobs_owner_request_id_idx")) throw err;
    const [existing] = await tx<{ id: string }[]>`select id from jobs where owner_id = ${j.ownerId} and request_id = ${j.requestId}`;
    return existing.id;
  }
  if (j.secrets.size > 0) {
    const names = [...j.secrets.keys()];
    await tx`
      insert into job_secrets (job_id, name, value)
      select ${j.id}, * from unnest(${names}::text[], ${names.map((n) => j.secrets.get(n)!)}::text[])`;
  }
  return j.id;
}

/** The secret values of job `id` by name (they stay with a finalized job for its re-runs). */
export async function jobSecrets(sql: Db, id: string): Promise<Map<string, string>> {
  const rows = await sql<{ name: string; value: string }[]>`select name, value from job_secrets where job_id = ${id}`;
  return new Map(rows.map((r) => [r.name, r.value]));
}

/**
 * Deletes the secret values of jobs finalized more than `keepMs` ago (at
 * most `limit` jobs' worth); returns how many jobs lost theirs.
 */
export async function deleteOldSecrets(sql: Db, keepMs: number, limit: number): Promise<number> {
  const rows = await sql`
    delete from job_secrets s
    where s.job_id in (
      select distinct s2.job_id from job_secrets s2 join jobs j on j.id = s2.job_id
      where j.state = 'finalized' and j.finalized_at < now() - ${keepMs} * interval '1 millisecond'
      limit ${limit})
    returning s.job_id`;
  return new Set(rows.map((r) => r.job_id as string)).size;
}

/** The scheduler may have work (a job was queued). */
export async function notifySchedule(tx: Db): Promise<void> {
  await tx`select pg_notify('treadmill_schedule', '')`;
}

/** ListJobs' and WatchJobs' filter, validated (owner forced for a non-admin). */
export interface JobFilterConditions {
  owner: string;
  states: string[];
  host: string;
  tags: Record<string, string>;
  /** Only health jobs (true) or only other jobs (false); undefined: both. */
  healthJobs?: boolean;
  /** Only the jobs inside this lease ("": any). */
  lease?: string;
}

function jobConditions(sql: Db, f: JobFilterConditions) {
  const empty = sql``;
  return sql`
    ${f.owner !== "" ? sql`and j.owner_id = ${f.owner}` : empty}
    ${f.states.length > 0 ? sql`and j.state = any(${f.states}::text[])` : empty}
    ${f.host !== "" ? sql`and exists (select 1 from job_hosts jh where jh.job_id = j.id and jh.attempt = j.attempt and jh.host_id = ${f.host})` : empty}
    ${Object.keys(f.tags).length > 0 ? sql`and j.spec->'tags' @> ${sql.json(f.tags)}::jsonb` : empty}
    ${f.healthJobs === true ? sql`and j.health_check_id is not null` : f.healthJobs === false ? sql`and j.health_check_id is null` : empty}
    ${f.lease ? sql`and j.lease_id = ${f.lease}` : empty}`;
}

/** A page of jobs matching `f`, newest first, before job `after` if given (keyset), at most `limit`. */
export function listJobRows(sql: Db, f: JobFilterConditions, after: string | undefined, limit: number): Promise<JobRow[]> {
  return sql<JobRow[]>`
    select ${jobColumns(sql)} from jobs j
    where true ${jobConditions(sql, f)} ${after !== undefined ? sql`and j.id < ${after}` : sql``}
    order by j.id desc limit ${limit}`;
}

/** Every unfinished job matching `f`, by id. */
export function unfinishedJobRows(sql: Db, f: JobFilterConditions): Promise<JobRow[]> {
  return sql<JobRow[]>`
    select ${jobColumns(sql)} from jobs j where j.state <> 'finalized' ${jobConditions(sql, f)} order by j.id`;
}

/** The proxy a job's sessions go through ("" when none was registered at its start); undefined for no such job. */
export async function proxyOf(sql: Db, jobId: string): Promise<{ proxy_url: string } | undefined> {
  const [row] = await sql<{ proxy_url: string }[]>`select proxy_url from jobs where id = ${jobId}`;
  return row;
}
