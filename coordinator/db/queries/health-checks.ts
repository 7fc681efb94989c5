/**
 * Health checks and the health accounting of hosts (migration 0013;
 * health_service.proto; docs/health.md): the statements of HealthService,
 * of the health keeper that queues checks, of a scheduling pass placing
 * health jobs on their hosts, and of the accounting of job ends. A host's
 * health itself changes only through health.ts's setHostHealth.
 *
 * A check applies to a host when the host's tags plus site=<site> include
 * the check's host_tags and the driver matches (`applies`).
 */
import type { JsonValue } from "@bufbuild/protobuf";
import type { Fragment, Sql, TransactionSql } from "postgres";
import type { Health } from "./health.js";
import { bookingAllows } from "./hosts.js";

type Db = Sql | TransactionSql;

/** A health_checks row. */
export interface HealthCheckRow {
  id: string;
  name: string;
  image: string;
  parameters: { name: string; value: string }[];
  timeout_ms: string | number;
  host_tags: Record<string, string>;
  driver_kind: string | null;
  interval_ms: string | number | null;
  every_jobs: number;
  quarantine_after: number;
  return_needs_admin: boolean;
  description: string;
  owner_id: string;
  created_at: Date;
  updated_at: Date;
}

/** Check `c` applies to host `h` (the aliases every statement here uses). */
export const applies = (sql: Db): Fragment =>
  sql`treadmill_host_match_tags(h.tags, h.site) @> c.host_tags and (c.driver_kind is null or c.driver_kind = h.driver_kind)`;

/** The checks that apply to host `hostId`, by name. */
export function checksOfHost(sql: Db, hostId: string): Promise<HealthCheckRow[]> {
  return sql<HealthCheckRow[]>`
    select c.* from health_checks c, hosts h where h.id = ${hostId} and ${applies(sql)} order by c.name`;
}

/** What the accounting of job ends reads of a host, its row locked. */
export interface HostAccount {
  id: string;
  name: string;
  health: Health;
  infra_failures: number;
  infra_failed_jobs: string[];
  jobs_since_check: number;
  check_retries: number;
  /** A quarantined host waits for a retry of its checks (it was quarantined by failures, not by an admin). */
  retrying: boolean;
  /** Checks that apply to it. */
  checks: number;
  /** Smallest quarantine_after of those (3 when none). */
  k: number;
  /** Smallest every_jobs > 0 of those (null: none). */
  every_jobs: number | null;
  /** Whether any of those waits for an admin after a retried pass. */
  needs_admin: boolean;
  /** Health jobs of the host not finalized (read before this transaction's changes). */
  open_checks: number;
  /** Check id -> name, of every check (for reasons). */
  names: Record<string, string>;
}

/**
 * Locks hosts `ids` in id order and reads their accounting. Sent after the
 * job and job_hosts locks of the same transaction (the job system's lock
 * order: jobs, job_hosts, hosts), before its writes.
 */
export function lockHostAccounts(tx: Db, ids: string[]): Promise<HostAccount[]> {
  return tx<HostAccount[]>`
    select h.id, h.name, h.health, h.infra_failures, h.infra_failed_jobs::text[] as infra_failed_jobs, h.jobs_since_check,
      h.check_retries, h.check_failed_at is not null as retrying, s.checks, coalesce(s.k, 3) as k, s.every_jobs, coalesce(s.needs_admin, false) as needs_admin,
      (select count(*)::int from jobs j where j.pinned_host_id = h.id and j.state <> 'finalized') as open_checks,
      coalesce((select jsonb_object_agg(c.id, c.name) from health_checks c), '{}') as names
    from hosts h cross join lateral (
      select count(*)::int as checks, min(c.quarantine_after) as k,
        min(c.every_jobs) filter (where c.every_jobs > 0) as every_jobs, bool_or(c.return_needs_admin) as needs_admin
      from health_checks c where ${applies(tx)}) s
    where h.id = any(${[...new Set(ids)].sort()}::uuid[])
    order by h.id for update of h`;
}

/** New accounting columns of a host. */
export interface AccountWrite {
  id: string;
  infra_failures: number;
  infra_failed_jobs: string[];
  jobs_since_check: number;
  check_retries: number;
  /** The wait for the next retry of its checks starts now, stops, or stays as it is. */
  retry: "start" | "stop" | "keep";
}

/** Writes the accounting of several hosts in one statement. */
export async function writeAccounts(tx: Db, rows: AccountWrite[]): Promise<void> {
  if (rows.length === 0) return;
  await tx`
    update hosts h set infra_failures = v.infra_failures, infra_failed_jobs = v.infra_failed_jobs,
      jobs_since_check = v.jobs_since_check, check_retries = v.check_retries,
      check_failed_at = case v.retry when 'keep' then h.check_failed_at when 'start' then now() end
    from jsonb_to_recordset(${tx.json(rows as never)}::jsonb)
      as v(id uuid, infra_failures int, infra_failed_jobs uuid[], jobs_since_check int, check_retries int, retry text)
    where h.id = v.id`;
}

/** The backoff of a quarantined host's retries: initialMs, doubling per failed retry, at most maxMs. */
export interface RetryPolicy {
  initialMs: number;
  maxMs: number;
}

/** The health keeper (and the scheduler) may have work: a host's checks are due. */
export async function notifyHealth(tx: Db): Promise<void> {
  await tx`select pg_notify('treadmill_health', '')`;
}

/**
 * Hosts whose checks the keeper must queue now (none of their health jobs
 * is unfinished): UNKNOWN ones a check applies to (burn-in), CHECKING ones,
 * QUARANTINED ones whose retry is due, HEALTHY ones with a check whose
 * interval has passed since its last run there (or since it was defined).
 */
export function hostsDue(sql: Db, retry: RetryPolicy, limit: number): Promise<{ id: string; health: Health }[]> {
  return sql<{ id: string; health: Health }[]>`
    select h.id, h.health from hosts h
    where h.health in ('unknown', 'checking', 'quarantined', 'healthy')
      and not exists (select 1 from jobs j where j.pinned_host_id = h.id and j.state <> 'finalized')
      and (h.health = 'checking'
        or (h.health = 'unknown' and exists (select 1 from health_checks c where ${applies(sql)}))
        or (h.health = 'quarantined' and ${retryIsDue(sql, retry)} and exists (select 1 from health_checks c where ${applies(sql)}))
        or (h.health = 'healthy' and exists (
              select 1 from health_checks c
              where c.interval_ms is not null and ${applies(sql)}
                and coalesce((select max(j.created_at) from jobs j where j.pinned_host_id = h.id and j.health_check_id = c.id),
                             c.created_at) + c.interval_ms * interval '1 millisecond' <= now())))
    order by h.health_changed_at limit ${limit}`;
}

/** A quarantined host's (`h`) next retry of its checks is due: exponential backoff from its last failure. */
const retryIsDue = (sql: Db, r: RetryPolicy) =>
  sql`h.check_failed_at + least(${r.maxMs}::float8, ${r.initialMs}::float8 * power(2, least(h.check_retries, 60))) * interval '1 millisecond' <= now()`;

/** Whether quarantined host `id`'s next retry of its checks is due. */
export async function retryDue(sql: Db, id: string, retry: RetryPolicy): Promise<boolean> {
  const rows = await sql`select 1 from hosts h where h.id = ${id} and ${retryIsDue(sql, retry)}`;
  return rows.length > 0;
}

/** Locks host `id` if no other transaction holds it; its name and health, or undefined. */
export async function lockHostHealth(tx: Db, id: string): Promise<{ id: string; name: string; health: Health } | undefined> {
  const [row] = await tx<{ id: string; name: string; health: Health }[]>`
    select id, name, health from hosts where id = ${id} for update skip locked`;
  return row;
}

/** The checks of host `hostId` whose interval has passed since their last run there. */
export function checksDue(sql: Db, hostId: string): Promise<HealthCheckRow[]> {
  return sql<HealthCheckRow[]>`
    select c.* from health_checks c, hosts h
    where h.id = ${hostId} and c.interval_ms is not null and ${applies(sql)}
      and coalesce((select max(j.created_at) from jobs j where j.pinned_host_id = h.id and j.health_check_id = c.id),
                   c.created_at) + c.interval_ms * interval '1 millisecond' <= now()
    order by c.name`;
}

/** The unfinished health jobs of host `hostId`, by check. */
export function openHealthJobs(sql: Db, hostId: string): Promise<{ id: string; health_check_id: string }[]> {
  return sql<{ id: string; health_check_id: string }[]>`
    select id, health_check_id from jobs where pinned_host_id = ${hostId} and state <> 'finalized' order by id`;
}

/** A health job to insert (QUEUED): an ordinary job pinned to its host. */
export interface NewHealthJob {
  id: string;
  ownerId: string;
  spec: JsonValue;
  digest: string;
  holderId: string | null;
  mediaTypes: string[];
  jobTimeoutMs: number;
  queueTimeoutMs: number;
  checkId: string;
  hostId: string;
}

/** Inserts a health job; the caller records its `submitted` event. */
export async function insertHealthJob(tx: Db, j: NewHealthJob): Promise<void> {
  await tx`
    insert into jobs (id, owner_id, spec, priority, manifest_digest, image_holder, media_types, host_count, required_tags,
      max_restarts, queue_timeout_ms, job_timeout_ms, health_check_id, pinned_host_id)
    values (${j.id}, ${j.ownerId}, ${tx.json(j.spec as never)}, 100, ${j.digest}, ${j.holderId}, ${j.mediaTypes}, 1, '{}',
      0, ${j.queueTimeoutMs}, ${j.jobTimeoutMs}, ${j.checkId}, ${j.hostId})`;
}

/** Resets a host's "after every N jobs" count: its checks were queued. */
export async function checksQueued(tx: Db, hostId: string): Promise<void> {
  await tx`update hosts set jobs_since_check = 0 where id = ${hostId}`;
}

/** A queued health job with a free slot on its host, as a scheduling pass places it. */
export interface PinnedRow {
  id: string;
  owner_id: string;
  attempt: number;
  manifest_digest: string;
  image_holder: string | null;
  job_timeout_ms: number;
  host_id: string;
  host_name: string;
  site: string;
  attached_replica: string;
}

/**
 * Queued health jobs whose host is attached, enabled, not draining, not
 * retired and has a free slot: the oldest one per host (health jobs go to
 * their host whatever its health; user jobs never go to a host under check).
 * Like any job outside leases, never on a host an active lease holds, and
 * on a booked host only if it ends before the booking starts (backfill).
 */
export function placeableHealthJobs(tx: Db): Promise<PinnedRow[]> {
  return tx<PinnedRow[]>`
    select distinct on (h.id) j.id, j.owner_id, j.attempt, j.manifest_digest, j.image_holder,
      j.job_timeout_ms::float8 as job_timeout_ms, h.id as host_id, h.name as host_name, h.site, h.attached_replica
    from jobs j join hosts h on h.id = j.pinned_host_id
    where j.state = 'queued' and j.pinned_host_id is not null
      and h.attached_replica is not null and h.admin_state = 'enabled' and not h.supervisor_draining and h.health <> 'retired'
      and least(h.capacity, coalesce(h.supervisor_capacity, h.capacity)) > h.held_slots
      and h.lease_id is null and ${bookingAllows(tx, tx`j.job_timeout_ms`)}
    order by h.id, j.created_at`;
}

/** Why a host under check cannot take a job yet (it is about to pass or fail). */
export const CHECKING = "running its health check";
/** Why a host whose supervisor detached within its grace period cannot take a job yet (it is likely to come back). */
export const RECONNECTING = "reconnecting";
/** The reasons that do not make SubmitJob refuse a job: the host will likely take it soon. */
export const SOON = new Set([CHECKING, RECONNECTING]);

/** A host that matches a job's requirements, and why it cannot run it now (null: it can). */
export interface MatchingHost {
  name: string;
  why: string | null;
}

/**
 * The hosts (at most `limit`) that meet a job's requirements and that its
 * owner may use, each with why it cannot take the job now: retired,
 * quarantined, disabled, draining, offline, reconnecting (detached within
 * the grace period `graceMs`), under check; null when it can. Those that can
 * come first, then those that soon may (SOON).
 */
/** " (reason)" of a host's state, cut with an ellipsis past 400 characters; '' when there is none. */
const because = (sql: Db, reason: Fragment) => sql`
  case when ${reason} = '' then ''
       when length(${reason}) > 400 then ' (' || left(${reason}, 399) || '…)'
       else ' (' || ${reason} || ')' end`;

export function matchingHosts(
  sql: Db,
  r: { tags: Record<string, string>; site: string | null; driver: string | null; media: string[]; owner: string; graceMs: number },
  limit: number,
): Promise<MatchingHost[]> {
  return sql<MatchingHost[]>`
    select name, why from (
      select h.name,
        case when h.health = 'retired' then 'retired'
             when h.health = 'quarantined' then 'quarantined' || ${because(sql, sql`h.health_reason`)}
             when h.admin_state = 'disabled' then 'disabled' || ${because(sql, sql`h.admin_state_reason`)}
             when h.admin_state = 'draining' or h.supervisor_draining then 'draining'
             when h.attached_replica is null and h.detached_at > now() - ${r.graceMs} * interval '1 millisecond' then ${RECONNECTING}
             when h.attached_replica is null then 'offline'
             when h.health = 'checking' then ${CHECKING}
        end as why
      from hosts h
      where treadmill_host_match_tags(h.tags, h.site) @> ${sql.json(r.tags)}
        and (${r.site}::text is null or h.site = ${r.site}) and (${r.driver}::text is null or h.driver_kind = ${r.driver})
        and h.media_types @> ${r.media}::text[] and treadmill_user_may_use_host(${r.owner}, h.id)) m
    order by why is null desc, why in (${CHECKING}, ${RECONNECTING}) desc, name
    limit ${limit}`;
}
