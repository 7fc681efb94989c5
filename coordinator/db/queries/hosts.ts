/** Hosts as stored (migrations 0001, 0003) and as protobuf messages: shared by HostService and the job system. */
import { create } from "@bufbuild/protobuf";
import type { Fragment, Sql, TransactionSql } from "postgres";
import { DriverKind, type Host, HostAdminState, HostHealth, HostSchema } from "../../../gen/treadmill/coordinator/v1/host_pb.js";
import type { HostFilter } from "../../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { checkPattern, checkTags, HOST_NAME, invalid, ts } from "../../shared/common.js";
import { pipeline } from "../reserved.js";

type Db = Sql | TransactionSql;

export const DRIVER_KINDS: Record<string, DriverKind> = {
  process: DriverKind.PROCESS,
  board: DriverKind.BOARD,
  qemu: DriverKind.QEMU,
};
export const ADMIN_STATES: Record<string, HostAdminState> = {
  enabled: HostAdminState.ENABLED,
  draining: HostAdminState.DRAINING,
  disabled: HostAdminState.DISABLED,
};

export const HEALTH_STATES: Record<string, HostHealth> = {
  unknown: HostHealth.UNKNOWN,
  checking: HostHealth.CHECKING,
  healthy: HostHealth.HEALTHY,
  quarantined: HostHealth.QUARANTINED,
  retired: HostHealth.RETIRED,
};

export function driverKindName(field: string, kind: DriverKind): string {
  const name = Object.keys(DRIVER_KINDS).find((k) => DRIVER_KINDS[k] === kind);
  if (name === undefined) throw invalid(`${field} must be DRIVER_KIND_PROCESS, DRIVER_KIND_BOARD or DRIVER_KIND_QEMU`);
  return name;
}

export function adminStateName(field: string, state: HostAdminState): string {
  const name = Object.keys(ADMIN_STATES).find((k) => ADMIN_STATES[k] === state);
  if (name === undefined) throw invalid(`${field} must be ENABLED, DRAINING or DISABLED`);
  return name;
}

export function healthName(field: string, health: HostHealth): string {
  const name = Object.keys(HEALTH_STATES).find((k) => HEALTH_STATES[k] === health);
  if (name === undefined) throw invalid(`${field} must be UNKNOWN, CHECKING, HEALTHY, QUARANTINED or RETIRED`);
  return name;
}

export interface HostRow {
  id: string;
  name: string;
  tags: Record<string, string>;
  driver_kind: string;
  media_types: string[];
  site: string;
  capacity: number;
  admin_state: string;
  admin_state_reason: string;
  attached_replica: string | null;
  last_seen_at: Date | null;
  supervisor_version: string;
  created_at: Date;
  updated_at: Date;
  current_job_ids: string[];
  health: string;
  health_reason: string;
  health_changed_at: Date;
}

export const hostColumns = (sql: Db) => sql`
  h.id, h.name, h.tags, h.driver_kind, h.media_types, h.site, h.capacity, h.admin_state, h.admin_state_reason,
  h.attached_replica, h.last_seen_at, h.supervisor_version, h.created_at, h.updated_at,
  h.health, h.health_reason, h.health_changed_at,
  coalesce((select array_agg(distinct jh.job_id::text) from job_hosts jh join jobs j on j.id = jh.job_id and j.attempt = jh.attempt
            where jh.host_id = h.id and j.state <> 'finalized'), '{}') as current_job_ids`;

export function hostMessage(row: HostRow): Host {
  return create(HostSchema, {
    id: row.id,
    name: row.name,
    tags: row.tags,
    driverKind: DRIVER_KINDS[row.driver_kind] ?? DriverKind.UNSPECIFIED,
    mediaTypes: row.media_types,
    site: row.site,
    capacity: row.capacity,
    adminState: ADMIN_STATES[row.admin_state] ?? HostAdminState.UNSPECIFIED,
    adminStateReason: row.admin_state_reason,
    online: row.attached_replica !== null,
    lastSeenTime: ts(row.last_seen_at),
    currentJobIds: [...row.current_job_ids].sort(),
    supervisorVersion: row.supervisor_version,
    createTime: ts(row.created_at),
    updateTime: ts(row.updated_at),
    health: HEALTH_STATES[row.health] ?? HostHealth.UNSPECIFIED,
    healthReason: row.health_reason,
    healthChangeTime: ts(row.health_changed_at),
  });
}

/** Validated filter of ListHosts and WatchHosts. */
export interface HostConditions {
  tags: Record<string, string>;
  site?: string;
  adminState?: string;
  online?: boolean;
  driverKind?: string;
  health?: string;
}

export function hostConditions(filter: HostFilter | undefined): HostConditions {
  if (!filter) return { tags: {} };
  const out: HostConditions = { tags: checkTags("filter.tags", filter.tags, { allowSite: true }) };
  if (filter.site !== undefined && filter.site !== "") out.site = checkPattern("filter.site", filter.site, HOST_NAME, "[a-z0-9][a-z0-9._-]{0,62}");
  else if (filter.site === "") out.site = "";
  if (filter.adminState !== HostAdminState.UNSPECIFIED) out.adminState = adminStateName("filter.admin_state", filter.adminState);
  if (filter.online !== undefined) out.online = filter.online;
  if (filter.driverKind !== DriverKind.UNSPECIFIED) out.driverKind = driverKindName("filter.driver_kind", filter.driverKind);
  if (filter.health !== HostHealth.UNSPECIFIED) out.health = healthName("filter.health", filter.health);
  return out;
}

/** The conditions as a WHERE fragment over `h` (the tag `site` matches the host's site). */
export function hostWhere(sql: Db, c: HostConditions): Fragment {
  const { site: siteTag, ...tags } = c.tags;
  return sql`
    h.tags @> ${sql.json(tags)}
    ${siteTag !== undefined ? sql`and h.site = ${siteTag}` : sql``}
    ${c.site !== undefined ? sql`and h.site = ${c.site}` : sql``}
    ${c.adminState !== undefined ? sql`and h.admin_state = ${c.adminState}` : sql``}
    ${c.online === true ? sql`and h.attached_replica is not null` : c.online === false ? sql`and h.attached_replica is null` : sql``}
    ${c.driverKind !== undefined ? sql`and h.driver_kind = ${c.driverKind}` : sql``}
    ${c.health !== undefined ? sql`and h.health = ${c.health}` : sql``}`;
}

/** Tells WatchHosts watchers (every replica) that a host changed; call in the changing transaction. */
export async function notifyHost(tx: Db, hostId: string): Promise<void> {
  await tx`select pg_notify('treadmill_hosts', ${hostId})`;
}

// The job system's statements on hosts: supervisors' streams attaching and
// detaching, and what a scheduling pass reads. A host is attached while a
// replica (attached_replica) holds a stream (attach_session) of its
// supervisor; a detached host's jobs survive its grace period (detached_at).

/** What a supervisor's hello says of its host. */
export interface Attachment {
  hostId: string;
  replica: string;
  session: string;
  supervisorVersion: string;
  /** 0: the host's own capacity. */
  capacity: number;
  draining: boolean;
}

/** Records the attachment of a host's new stream (superseding any other) and returns the host; undefined when it is gone. */
export async function attachHost(tx: Db, a: Attachment): Promise<HostRow | undefined> {
  const [h] = await tx<HostRow[]>`
    update hosts as h set attached_replica = ${a.replica}, attach_session = ${a.session}, attached_at = now(),
      last_seen_at = now(), detached_at = null, supervisor_version = ${a.supervisorVersion},
      supervisor_capacity = ${a.capacity > 0 ? a.capacity : null}, supervisor_draining = ${a.draining}
    where id = ${a.hostId}
    returning ${hostColumns(tx)}`;
  return h;
}

/** A host attached: its stream's replica re-reads its commands, the older stream hears it was superseded, the scheduler may place jobs. */
export async function notifyAttached(tx: Db, hostId: string): Promise<void> {
  await tx`select pg_notify('treadmill_commands', ${hostId}), pg_notify('treadmill_hosts', ${hostId}),
    pg_notify('treadmill_schedule', '')`;
}

/** Attaches again a host another replica detached while its stream `session` lives here; whether it was still detached. */
export async function reattachHost(sql: Db, hostId: string, replica: string, session: string): Promise<boolean> {
  const rows = await sql`
    update hosts set attached_replica = ${replica}, attach_session = ${session}, attached_at = now(), detached_at = null
    where id = ${hostId} and attach_session is null
    returning pg_notify('treadmill_hosts', id::text), pg_notify('treadmill_schedule', '')`;
  return rows.length > 0;
}

/** The supervisor of the stream `session` drains (takes no new jobs) or stops draining. */
export async function setSupervisorDraining(sql: Db, hostId: string, session: string, draining: boolean): Promise<void> {
  await sql`
    update hosts set supervisor_draining = ${draining}
    where id = ${hostId} and attach_session = ${session}
    returning pg_notify('treadmill_hosts', id::text), pg_notify('treadmill_schedule', '')`;
}

/** Records that the stream `session` of the host ended (its grace period starts); whether it was the host's stream. */
export async function detachHost(tx: Db, hostId: string, session: string): Promise<boolean> {
  const rows = await tx`
    update hosts set attached_replica = null, attach_session = null, attached_at = null, detached_at = now(),
      supervisor_draining = false
    where id = ${hostId} and attach_session = ${session}
    returning pg_notify('treadmill_hosts', id::text)`;
  return rows.length > 0;
}

/** Detaches the hosts recorded as attached to `replica` by a stream other than `live`; how many. */
export async function detachOrphans(sql: Db, replica: string, live: string[]): Promise<number> {
  const rows = await sql`
    update hosts set attached_replica = null, attach_session = null, attached_at = null, detached_at = now(),
      supervisor_draining = false
    where attached_replica = ${replica} and not (attach_session = any(${live}::uuid[]))
    returning id, pg_notify('treadmill_hosts', id::text)`;
  return rows.length;
}

/** Detached hosts whose grace (`windowMs` back) had not run out get it whole from now; how many. */
export async function restartGrace(sql: Db, windowMs: number): Promise<number> {
  const rows = await sql`
    update hosts set detached_at = now()
    where attached_replica is null and detached_at is not null and detached_at < now()
      and detached_at > now() - ${windowMs} * interval '1 millisecond'
    returning id`;
  return rows.length;
}

/** Supervisors heard from: their last-seen time, in one write; rows busy elsewhere are left for the next. */
export async function markSeen(sql: Db, ids: string[]): Promise<void> {
  await sql`
    update hosts h set last_seen_at = now()
    from (select id from hosts where id = any(${ids}::uuid[]) order by id for update skip locked) l
    where h.id = l.id`;
}

/** Whether host `hostId` is still detached and past the grace period `graceMs`. */
export async function stillDropped(tx: Db, hostId: string, graceMs: number): Promise<boolean> {
  const rows = await tx`
    select 1 from hosts h
    where h.id = ${hostId} and h.attached_replica is null
      and coalesce(h.detached_at, '-infinity') < now() - ${graceMs} * interval '1 millisecond'`;
  return rows.length > 0;
}

/** Records this replica's heartbeat (coordinator_replicas: which replicas live to hold streams). */
export async function replicaHeartbeat(sql: Db, replica: string): Promise<void> {
  await sql`
    insert into coordinator_replicas (id) values (${replica})
    on conflict (id) do update set heartbeat_at = now()`;
}

/** Removes this replica from coordinator_replicas (it stops). */
export async function replicaGone(sql: Db, replica: string): Promise<void> {
  await sql`delete from coordinator_replicas where id = ${replica}`;
}

/**
 * Detaches the hosts of other replicas silent for `staleMs` (their grace
 * starts at the dead replica's last heartbeat), and forgets replicas silent
 * for a day; how many hosts.
 */
export async function detachHostsOfDeadReplicas(sql: Db, replica: string, staleMs: number): Promise<number> {
  const rows = await sql`
    update hosts h set attached_replica = null, attach_session = null, attached_at = null,
      detached_at = coalesce((select r.heartbeat_at from coordinator_replicas r where r.id = h.attached_replica), now())
    where h.attached_replica is not null and h.attached_replica <> ${replica}
      and h.attached_at < now() - ${staleMs} * interval '1 millisecond'
      and not exists (
        select 1 from coordinator_replicas r
        where r.id = h.attached_replica and r.heartbeat_at > now() - ${staleMs} * interval '1 millisecond')
    returning h.id, pg_notify('treadmill_hosts', h.id::text)`;
  await sql`delete from coordinator_replicas where heartbeat_at < now() - interval '1 day'`;
  return rows.length;
}

/** An attached, enabled, non-draining host as a scheduling pass reads it, busy or not. */
export interface EligibleHost {
  id: string;
  name: string;
  /** Its tags with site=<site> added. */
  tags: Record<string, string>;
  site: string;
  driver_kind: string;
  media_types: string[];
  /** Free slots: its capacity (the supervisor's, if smaller) minus the slots it holds. */
  free: number;
  attached_replica: string;
  /** The start of its earliest open booking (hosts.booked_from), ms since the epoch; null: none. */
  booked_from: number | null;
}

/**
 * The condition of a host a pass may place user jobs on (hosts aliased `h`):
 * attached, enabled, not draining, and healthy or unknown (a host a health
 * check applies to is never left unknown: docs/health.md). Health jobs go
 * to their own hosts apart (health-checks.ts placeableHealthJobs).
 */
const schedulable = (tx: Db) =>
  tx`h.attached_replica is not null and h.admin_state = 'enabled' and not h.supervisor_draining and h.health in ('healthy', 'unknown')`;

/**
 * The condition of a host a job outside leases may go on: schedulable and
 * held by no active lease (a leased host takes only its lease's jobs:
 * leaseHostsFree). Its bookings ahead are the job's to check against its
 * timeout (`bookingAllows`).
 */
const outsideLeases = (tx: Db) => tx`${schedulable(tx)} and h.lease_id is null`;

/**
 * The backfill rule (docs/leases.md): a job outside leases whose timeout is
 * `timeoutMs` (null: it ends before every booking, as the pass found) may
 * take host `h` only if it ends before the host's earliest booking starts.
 */
export const bookingAllows = (tx: Db, timeoutMs: Fragment) =>
  tx`(h.booked_from is null or h.booked_from >= now() + ${timeoutMs} * interval '1 millisecond')`;

const bookedFrom = (tx: Db) => tx`(extract(epoch from h.booked_from) * 1000)::float8 as booked_from`;

/**
 * Every host a pass may place jobs on, by name, their free slots left out (0).
 * A pass reads them only once a job asks for several hosts: whether it could
 * fit once busy hosts free up decides whether it reserves. All of them, not
 * only the busy ones: a host that frees up between the pass's read of free
 * hosts and this one would otherwise be in neither, and a job that could
 * fit would look as if it never could.
 */
export function schedulableHosts(tx: Db): Promise<EligibleHost[]> {
  return tx<EligibleHost[]>`
    select h.id, h.name, treadmill_host_match_tags(h.tags, h.site) as tags, h.site, h.driver_kind, h.media_types,
      h.attached_replica, 0 as free, ${bookedFrom(tx)}
    from hosts h
    where ${outsideLeases(tx)}
    order by h.name`;
}

/** A host's slots: its capacity, or its supervisor's if smaller (hosts aliased `h`). */
const slots = (tx: Db) => tx`least(h.capacity, coalesce(h.supervisor_capacity, h.capacity))`;

/**
 * The condition of a host with a free slot that a job outside leases may
 * take: hosts_free_idx's predicate (migrations 0012, 0013, 0019), written
 * the same so that the planner reads that index. held_slots is kept by
 * triggers on job_hosts.
 */
const hasFreeSlot = (tx: Db) => tx`${schedulable(tx)} and h.held_slots < ${slots(tx)} and h.lease_id is null`;

/**
 * The free slots of every host a pass may place jobs outside leases on, in one aggregate
 * over the index of free hosts (no row per host leaves the database); 0
 * while no job is queued (the pass every attach wakes reads nothing more).
 */
export async function freeSlotCount(tx: Db): Promise<number> {
  const [{ n }] = await tx<{ n: number }[]>`
    select coalesce(sum(${slots(tx)} - h.held_slots), 0)::int as n
    from hosts h
    where ${hasFreeSlot(tx)} and exists (select 1 from jobs where state = 'queued')`;
  return n;
}

/** A kind of queued job (what a host must have) and how many hosts the pass wants for it. */
export interface HostDemand {
  tags: Record<string, string>;
  site: string | null;
  driver: string | null;
  media: string[];
  /** The owner whose access the hosts must grant (null: host grants do not exist, every host). */
  owner: string | null;
  /** The jobs' timeout, for the backfill rule; null: they end before every booking (any host). */
  timeout: number | null;
  /** At most this many hosts are read for it. */
  need: number;
}

/**
 * For each demand, its first `need` matching hosts with a free slot in the
 * placement's order (most free slots, then name), leaving out `known` (the
 * hosts the pass has read already): a pass reads the hosts its jobs may
 * take, not every free host (an idle lab of 10,000 hosts costs a dispatch a
 * few rows). A host may come for several demands: `demand` is its index.
 */
export function freeHostsFor(tx: Db, demands: HostDemand[], known: string[]): Promise<(EligibleHost & { demand: number })[]> {
  const columns = tx`
    h.id, h.name, treadmill_host_match_tags(h.tags, h.site) as tags, h.site, h.driver_kind, h.media_types, h.attached_replica,
    ${slots(tx)} - h.held_slots as free, ${bookedFrom(tx)}`;
  const fits = tx`
    ${hasFreeSlot(tx)} and h.id <> all(${known}::uuid[])
    and (d.site is null or h.site = d.site) and (d.driver is null or h.driver_kind = d.driver)
    and h.media_types @> d.media and treadmill_host_match_tags(h.tags, h.site) @> d.tags
    and (d.owner is null or treadmill_user_may_use_host(d.owner, h.id))
    and (d.timeout is null or ${bookingAllows(tx, tx`d.timeout`)})`;
  // Hosts of one slot (boards: most of a lab) come in name order through
  // the index of free hosts, stopping at `need`: the first `need` of them by
  // name are all the placement's order can want of them. Free hosts of
  // several slots are read whole (their free slots come first).
  //
  // The planner cannot estimate a demand's conditions (they come from the
  // JSON, not constants) and took them as matching one host in a thousand:
  // it then read every free host and sorted them rather than walk the index
  // and stop (10-30 ms of each dispatch at 2,000 hosts in `npm run bench --
  // scale`). Walking is never much worse (both read every free host when
  // none fits), so this one statement runs with bitmap and sequential scans
  // off, set for the transaction and put back right after it. Sorts too:
  // otherwise the planner, in some passes, read every attached host through
  // hosts_attached_replica_idx and sorted them by name (16 ms a pass at
  // 2,000 hosts in `npm run bench -- coordinator`, against 0.06 ms for the
  // walk); the sort of the few rows the walks return is still made.
  pipeline(
    tx`select set_config('enable_bitmapscan', 'off', true), set_config('enable_seqscan', 'off', true), set_config('enable_sort', 'off', true)`,
  );
  const rows = tx<(EligibleHost & { demand: number })[]>`
    select d.demand, h.*
    from jsonb_to_recordset(${tx.json(demands.map((d, demand) => ({ ...d, demand })) as never)}::jsonb)
        as d(tags jsonb, site text, driver text, media text[], owner uuid, timeout float8, need int, demand int),
      lateral (
        select * from (
          (select ${columns} from hosts h where ${fits} and ${slots(tx)} > 1)
          union all
          (select ${columns} from hosts h where ${fits} and ${slots(tx)} = 1 order by h.name limit d.need)) h
        order by h.free desc, h.name limit d.need) h`.execute();
  pipeline(tx`reset enable_bitmapscan`);
  pipeline(tx`reset enable_seqscan`);
  pipeline(tx`reset enable_sort`);
  return rows;
}

/**
 * The database's now and the earliest booking of any host (null: none), ms
 * since the epoch, through hosts_booked_from_idx: a job whose timeout ends
 * before it fits every host as far as bookings go (PassPlacement).
 */
export async function firstBooking(tx: Db): Promise<{ now: number; first: number | null }> {
  const [row] = await tx<{ now: number; first: number | null }[]>`
    select (extract(epoch from now()) * 1000)::float8 as now,
      (select (extract(epoch from h.booked_from) * 1000)::float8 from hosts h
       where h.booked_from is not null order by h.booked_from limit 1) as first`;
  return row;
}

/**
 * The condition of a leased host its lease's jobs may go on: attached,
 * enabled, not draining, and healthy, unknown or checking. A check due on
 * a leased host waits for the lease's end (a health job is never placed on
 * a leased host), and does not keep the holder off the host meanwhile.
 */
export const leaseSchedulable = (tx: Db) =>
  tx`h.attached_replica is not null and h.admin_state = 'enabled' and not h.supervisor_draining and h.health in ('healthy', 'unknown', 'checking')`;

/**
 * The free hosts of the active leases that have queued jobs (their jobs go
 * only there: placeLeaseJobs), by lease, then name. Nothing is read but the
 * index of queued lease jobs while none is queued.
 */
export function leaseHostsFree(tx: Db): Promise<(EligibleHost & { lease_id: string })[]> {
  return tx<(EligibleHost & { lease_id: string })[]>`
    select h.lease_id, h.id, h.name, treadmill_host_match_tags(h.tags, h.site) as tags, h.site, h.driver_kind, h.media_types,
      h.attached_replica, ${slots(tx)} - h.held_slots as free, ${bookedFrom(tx)}
    from hosts h
    where h.lease_id in (select j.lease_id from jobs j where j.lease_id is not null and j.state = 'queued')
      and ${leaseSchedulable(tx)} and h.held_slots < ${slots(tx)}
    order by h.lease_id, h.name`;
}

/** Whether any host grant exists (none: every user may use every host). */
export async function hostGrantsExist(tx: Db): Promise<boolean> {
  const [{ grants }] = await tx<{ grants: boolean }[]>`select exists (select 1 from host_grants) as grants`;
  return grants;
}

/** The (owner, host) pairs of `pairs` whose owner may not use the host (treadmill_user_may_use_host). */
export function deniedPairs(tx: Db, pairs: { owner: string; host: string }[]): Promise<{ owner: string; host: string }[]> {
  return tx<{ owner: string; host: string }[]>`
    select v.owner::text as owner, v.host::text as host
    from unnest(${pairs.map((p) => p.owner)}::uuid[], ${pairs.map((p) => p.host)}::uuid[]) as v(owner, host)
    where not treadmill_user_may_use_host(v.owner, v.host)`;
}
