/**
 * Leases (migration 0017, lease_service.proto, docs/leases.md): every
 * statement on `leases`, `lease_hosts`, `lease_events` and the two lease
 * columns of `hosts`, and a lease row as a `Lease` message. LeaseService,
 * the lease keeper and the job system's hold on failure (`createHoldLease`)
 * write leases only through these.
 *
 * Invariants kept here, in the caller's transaction:
 * - a host has at most one open lease_hosts row over any instant (bookings
 *   are written under the host rows' locks, and between themselves under
 *   one advisory lock, `lockBookings`);
 * - `hosts.booked_from` is the earliest starts_at of the host's open
 *   lease_hosts rows (null if none), rewritten after every change of them
 *   (`refreshBookedFrom`): the scheduler backfills before it;
 * - `hosts.lease_id` names the ACTIVE lease holding the host, and only that.
 *
 * Lock order, the job system's with lease rows after job rows (a job's end,
 * under its row lock, may end its hold lease): `lockBookings`, job rows by
 * id (`lockLeaseJobs`), lease rows, host rows by id.
 *
 * Channel 'treadmill_leases', payload a lease id: the lease changed
 * (WatchLease). Ending a lease also notifies 'treadmill_schedule' (its hosts
 * are free for the queue) and 'treadmill_hosts' per host.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Sql, TransactionSql } from "postgres";
import { DriverKind } from "../../../gen/treadmill/coordinator/v1/host_pb.js";
import {
  type Lease,
  LeaseEndReason,
  type LeaseEvent,
  LeaseEventKind,
  LeaseEventSchema,
  LeaseKind,
  LeaseSchema,
  LeaseState,
} from "../../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { clipText, durationOf, ts } from "../../shared/common.js";
import { audit } from "./audit.js";
import { type EventInput, recordEvents } from "./events.js";
import { type JobHead, type JobStateChange, lockJobHeads, notifySchedule, writeJobStates } from "./jobs.js";

type Db = Sql | TransactionSql;

export type LeaseStateName = "requested" | "waiting" | "active" | "ended";
export type LeaseEndReasonName = "released" | "expired" | "revoked" | "lost" | "unserved";
export type LeaseEventKindName = "requested" | "booked" | "waiting" | "active" | "extended" | "job" | "keepalive" | "ended";

/** A leases row, with its owner's name. */
export interface LeaseRow {
  id: string;
  owner_id: string;
  owner_username: string;
  kind: "reservation" | "hold";
  state: LeaseStateName;
  end_reason: LeaseEndReasonName | null;
  status_message: string;
  host_count: number;
  required_tags: Record<string, string>;
  required_site: string | null;
  required_driver: string | null;
  host_names: string[];
  image: string;
  manifest_digest: string | null;
  parameters: { name: string; value: string }[];
  starts_at: Date;
  ends_at: Date;
  deadline_at: Date | null;
  grace_ms: number;
  keepalive_at: Date;
  held_job_id: string | null;
  description: string;
  request_id: string | null;
  /** The session job started when it became active (migration 0018). */
  session_job_id: string | null;
  created_at: Date;
  activated_at: Date | null;
  ended_at: Date | null;
}

/** One booked host of a lease, with the lease's job running on it now. */
export interface LeaseHostRow {
  lease_id: string;
  host_id: string;
  host_name: string;
  host_index: number;
  job_id: string | null;
}

/** One entry of a lease's timeline. */
export interface LeaseEventRow {
  seq: string;
  time: Date;
  kind: LeaseEventKindName;
  state: LeaseStateName;
  message: string;
  host_id: string | null;
}

const leaseColumns = (sql: Db) => sql`l.*, u.name as owner_username`;

/** Lease `id`, locked when `lock` (the lease rows come first in the lock order). */
export async function loadLease(sql: Db, id: string, options: { lock?: boolean } = {}): Promise<LeaseRow | undefined> {
  const [row] = await sql<LeaseRow[]>`
    select ${leaseColumns(sql)} from leases l join users u on u.id = l.owner_id
    where l.id = ${id} ${options.lock ? sql`for update of l` : sql``}`;
  return row;
}

/** The lease a user created with `requestId`, if any. */
export async function leaseOfRequest(sql: Db, ownerId: string, requestId: string): Promise<string | undefined> {
  const [row] = await sql<{ id: string }[]>`select id from leases where owner_id = ${ownerId} and request_id = ${requestId}`;
  return row?.id;
}

/** Leases newest first (by id: UUIDv7), of one owner or everyone's, optionally in some states, after id `after`. */
export function listLeaseRows(sql: Db, f: { owner: string | null; states: string[] }, after: string | undefined, limit: number): Promise<LeaseRow[]> {
  return sql<LeaseRow[]>`
    select ${leaseColumns(sql)} from leases l join users u on u.id = l.owner_id
    where true ${f.owner !== null ? sql`and l.owner_id = ${f.owner}` : sql``}
      ${f.states.length > 0 ? sql`and l.state = any(${f.states}::text[])` : sql``}
      ${after !== undefined ? sql`and l.id < ${after}` : sql``}
    order by l.id desc limit ${limit}`;
}

/** The booked hosts of leases `ids`, by lease and host index. */
export function leaseHostsOf(sql: Db, ids: string[]): Promise<LeaseHostRow[]> {
  if (ids.length === 0) return Promise.resolve([]);
  return sql<LeaseHostRow[]>`
    select lh.lease_id, lh.host_id, h.name as host_name, lh.host_index,
      (select jh.job_id from job_hosts jh join jobs j on j.id = jh.job_id and j.attempt = jh.attempt
       where jh.host_id = lh.host_id and jh.released_at is null and j.lease_id = lh.lease_id and j.state <> 'finalized'
       order by j.id desc limit 1) as job_id
    from lease_hosts lh join hosts h on h.id = lh.host_id
    where lh.lease_id = any(${ids}::uuid[])
    order by lh.lease_id, lh.host_index`;
}

/** A lease's timeline entries after `afterSeq` (0: all), oldest first. */
export function leaseEvents(sql: Db, id: string, afterSeq = "0"): Promise<LeaseEventRow[]> {
  return sql<LeaseEventRow[]>`
    select seq::text, time, kind, state, message, host_id from lease_events
    where lease_id = ${id} and seq > ${afterSeq}::bigint order by seq`;
}

const enumOf = <E extends Record<string, string | number>>(e: E, prefix: string, name: string | null): E[keyof E] =>
  (name ? (e[`${prefix}${name.toUpperCase()}` as keyof E] ?? e[`${prefix}UNSPECIFIED` as keyof E]) : e[`${prefix}UNSPECIFIED` as keyof E]) as E[keyof E];

export const leaseStateEnum = (s: string | null): LeaseState => enumOf(LeaseState, "", s);

/** `active` <-> LeaseState.ACTIVE and alike. */
export function leaseStateName(state: LeaseState): LeaseStateName | undefined {
  return state === LeaseState.UNSPECIFIED || LeaseState[state] === undefined ? undefined : (LeaseState[state].toLowerCase() as LeaseStateName);
}

export function leaseEventMessage(e: LeaseEventRow): LeaseEvent {
  return create(LeaseEventSchema, {
    time: timestampFromDate(e.time),
    kind: enumOf(LeaseEventKind, "", e.kind),
    state: leaseStateEnum(e.state),
    message: e.message,
    hostId: e.host_id ?? "",
  });
}

/** The Lease message of a row, with its hosts and (GetLease) its timeline. */
export function leaseMessage(row: LeaseRow, hosts: readonly LeaseHostRow[], timeline: readonly LeaseEventRow[] = []): Lease {
  const byName = row.host_names.length > 0;
  return create(LeaseSchema, {
    id: row.id,
    ownerUserId: row.owner_id,
    ownerUsername: row.owner_username,
    kind: row.kind === "hold" ? LeaseKind.HOLD : LeaseKind.RESERVATION,
    state: leaseStateEnum(row.state),
    endReason: enumOf(LeaseEndReason, "", row.end_reason),
    statusMessage: row.status_message,
    hosts: byName
      ? undefined
      : {
          tags: row.required_tags,
          hostCount: row.host_count,
          site: row.required_site ?? undefined,
          driverKind: row.required_driver ? (DriverKind[row.required_driver.toUpperCase() as keyof typeof DriverKind] ?? DriverKind.UNSPECIFIED) : DriverKind.UNSPECIFIED,
        },
    hostNames: row.host_names,
    leaseHosts: hosts.filter((h) => h.lease_id === row.id).map((h) => ({ hostId: h.host_id, hostName: h.host_name, jobId: h.job_id ?? "" })),
    image: row.image,
    manifestDigest: row.manifest_digest ?? "",
    startTime: ts(row.starts_at),
    endTime: ts(row.ends_at),
    deadline: ts(row.deadline_at),
    gracePeriod: durationOf(row.grace_ms),
    keepaliveTime: ts(row.keepalive_at),
    heldJobId: row.held_job_id ?? "",
    description: row.description,
    createTime: ts(row.created_at),
    activeTime: ts(row.activated_at),
    endReachedTime: ts(row.ended_at),
    timeline: timeline.map(leaseEventMessage),
  });
}

/** A timeline entry to record. */
export interface LeaseEventInput {
  kind: LeaseEventKindName;
  state: LeaseStateName;
  message: string;
  hostId?: string | null;
  /** The request that wrote it (ExtendLease's request_id), for idempotent retries. */
  requestId?: string | null;
}

/** Records timeline entries of lease `id`, in order, and tells its watchers. */
export async function recordLeaseEvents(tx: Db, id: string, events: LeaseEventInput[]): Promise<void> {
  if (events.length === 0) return;
  const rows = events.map((e, i) => ({
    i,
    kind: e.kind,
    state: e.state,
    message: clipText(e.message, 4096),
    host: e.hostId ?? null,
    request: e.requestId ?? null,
  }));
  await tx`
    with ev as (
      insert into lease_events (lease_id, kind, state, message, host_id, request_id)
      select ${id}, kind, state, message, host, request from jsonb_to_recordset(${tx.json(rows as never)}::jsonb)
        as v(i int, kind text, state text, message text, host uuid, request text) order by i)
    select pg_notify('treadmill_leases', ${id})`;
}

/** Whether lease `id` has a timeline entry written by request `requestId`. */
export async function leaseRequestDone(sql: Db, id: string, requestId: string): Promise<boolean> {
  const rows = await sql`select 1 from lease_events where lease_id = ${id} and request_id = ${requestId}`;
  return rows.length > 0;
}

/**
 * Serialises bookings (CreateLease, the keeper booking a requested lease,
 * ExtendLease) among themselves for the rest of the transaction, taken
 * before any row lock. A hold (`createHoldLease`) does not take it: it
 * books hosts its job already holds, under their row locks.
 */
export async function lockBookings(tx: Db): Promise<void> {
  await tx`select pg_advisory_xact_lock(hashtext('treadmill_lease_bookings'))`;
}

/** Sets `booked_from` of hosts `ids` to the earliest start of their open bookings. */
export async function refreshBookedFrom(tx: Db, ids: string[]): Promise<void> {
  if (ids.length === 0) return;
  await tx`
    update hosts h set booked_from = (select min(lh.starts_at) from lease_hosts lh where lh.host_id = h.id and lh.open)
    where h.id = any(${ids}::uuid[])`;
}

/** What a lease asks of its hosts (its row's columns). */
export interface Selector {
  ownerId: string;
  hostCount: number;
  tags: Record<string, string>;
  site: string | null;
  driver: string | null;
  hostNames: string[];
  /** Media types the hosts must run (its image's); empty for a bare lease. */
  media: string[];
}

export function selectorOf(lease: LeaseRow, media: string[]): Selector {
  return {
    ownerId: lease.owner_id,
    hostCount: lease.host_count,
    tags: lease.required_tags,
    site: lease.required_site,
    driver: lease.required_driver,
    hostNames: lease.host_names,
    media,
  };
}

/** Host `h` is what the selector asks for and its owner may use (not whether it is in service). */
const matches = (sql: Db, s: Selector) => sql`
  ${
    s.hostNames.length > 0
      ? sql`h.name = any(${s.hostNames}::text[])`
      : sql`treadmill_host_match_tags(h.tags, h.site) @> ${sql.json(s.tags)}
          and (${s.site}::text is null or h.site = ${s.site}) and (${s.driver}::text is null or h.driver_kind = ${s.driver})`
  }
  and h.media_types @> ${s.media}::text[] and treadmill_user_may_use_host(${s.ownerId}, h.id)`;

/** Host `h` may be booked: enabled and neither quarantined nor retired. */
const inService = (sql: Db) => sql`h.admin_state = 'enabled' and h.health not in ('quarantined', 'retired')`;

/** Host `h` has no open booking overlapping [from, to). */
const freeOver = (sql: Db, from: Date, to: Date) => sql`
  not exists (select 1 from lease_hosts o where o.host_id = h.id and o.open and o.starts_at < ${to} and o.ends_at > ${from})`;

/** How many hosts in service match the selector at all (whatever their bookings). */
export async function matchingHostCount(sql: Db, s: Selector): Promise<number> {
  const [{ n }] = await sql<{ n: number }[]>`select count(*)::int as n from hosts h where ${matches(sql, s)} and ${inService(sql)}`;
  return n;
}

/** Named hosts: those that exist, whether the owner may use each, and its tags with its site. */
export async function namedHosts(sql: Db, names: string[], ownerId: string): Promise<{ name: string; allowed: boolean; tags: Record<string, string> }[]> {
  return sql<{ name: string; allowed: boolean; tags: Record<string, string> }[]>`
    select h.name, treadmill_user_may_use_host(${ownerId}, h.id) as allowed, treadmill_host_match_tags(h.tags, h.site) as tags
    from hosts h where h.name = any(${names}::text[])`;
}

/** Those of hosts `names` that another booking holds over [from, to). */
export async function namedHostsBusy(sql: Db, names: string[], from: Date, to: Date): Promise<string[]> {
  const rows = await sql<{ name: string }[]>`
    select distinct h.name from hosts h join lease_hosts o on o.host_id = h.id and o.open and o.starts_at < ${to} and o.ends_at > ${from}
    where h.name = any(${names}::text[]) order by h.name`;
  return rows.map((r) => r.name);
}

/**
 * Chooses `s.hostCount` hosts free over [from, to) and books them for lease
 * `leaseId` (lease_hosts rows, booked_from), under their row locks; the
 * caller holds `lockBookings`. Prefers, for a lease starting now, hosts free
 * now (online, no slot held), then those whose running jobs end soonest.
 * The hosts take host indices `indices` (default 0 to hostCount - 1).
 * Returns the booked host ids in that order, or undefined when the calendar
 * has no room.
 */
export async function bookHosts(
  tx: Db,
  leaseId: string,
  s: Selector,
  from: Date,
  to: Date,
  indices: number[] = Array.from({ length: s.hostCount }, (_, i) => i),
  options: { freeNow?: boolean } = {},
): Promise<string[] | undefined> {
  const freeNow = options.freeNow ? tx`and h.held_slots = 0 and h.attached_replica is not null` : tx``;
  for (let round = 0; round < 3; round++) {
    const chosen = await tx<{ id: string }[]>`
      select h.id from hosts h
      where ${matches(tx, s)} and ${inService(tx)} and ${freeOver(tx, from, to)} ${freeNow}
      order by (h.held_slots = 0 and h.attached_replica is not null) desc,
        (select max(coalesce(j.started_at, j.assigned_at, now()) + j.job_timeout_ms * interval '1 millisecond')
         from job_hosts jh join jobs j on j.id = jh.job_id and j.attempt = jh.attempt
         where jh.host_id = h.id and jh.released_at is null) asc nulls first,
        h.name
      limit ${s.hostCount}`;
    if (chosen.length < s.hostCount) return undefined;
    const ids = chosen.map((c) => c.id);
    await tx`select 1 from hosts where id = any(${[...ids].sort()}::uuid[]) order by id for update`;
    // Under the rows' locks: nothing else booked them meanwhile (a hold).
    const taken = await tx`
      select 1 from lease_hosts where host_id = any(${ids}::uuid[]) and open and starts_at < ${to} and ends_at > ${from} limit 1`;
    if (taken.length > 0) continue;
    await tx`
      insert into lease_hosts (lease_id, host_id, host_index, starts_at, ends_at)
      select ${leaseId}, id, i, ${from}, ${to} from unnest(${ids}::uuid[], ${indices}::int[]) as u(id, i)`;
    await refreshBookedFrom(tx, ids);
    await tx`select pg_notify('treadmill_hosts', id::text) from unnest(${ids}::uuid[]) as u(id)`;
    return ids;
  }
  return undefined;
}

/** An open booking of a lease that the lease keeper would move to another host, and why. */
export interface MovableBooking {
  host_id: string;
  name: string;
  host_index: number;
  why: string;
}

/** The open bookings of lease `leaseId` on hosts `hostIds`, each said to be busy with its job. */
export function bookingsOfBusyHosts(sql: Db, leaseId: string, busy: { id: string; job: string | null }[]): Promise<MovableBooking[]> {
  return sql<MovableBooking[]>`
    select lh.host_id, h.name, lh.host_index, 'still running ' || coalesce('job ' || b.job, 'a job') as why
    from lease_hosts lh join hosts h on h.id = lh.host_id
      join unnest(${busy.map((b) => b.id)}::uuid[], ${busy.map((b) => b.job)}::text[]) as b(id, job) on b.id = lh.host_id
    where lh.lease_id = ${leaseId} and lh.open
    order by lh.host_index`;
}

/** The open bookings of lease `leaseId` on hosts out of service now (disabled, draining, quarantined, retired), with why. */
export function bookingsOutOfService(sql: Db, leaseId: string): Promise<MovableBooking[]> {
  return sql<MovableBooking[]>`
    select lh.host_id, h.name, lh.host_index, case when h.health in ('quarantined', 'retired') then h.health else h.admin_state end as why
    from lease_hosts lh join hosts h on h.id = lh.host_id
    where lh.lease_id = ${leaseId} and lh.open and not (${inService(sql)})
    order by lh.host_index`;
}

/** Drops lease `leaseId`'s bookings of hosts `hostIds` (booked_from recomputed). */
export async function dropBookings(tx: Db, leaseId: string, hostIds: string[]): Promise<void> {
  await tx`select 1 from hosts where id = any(${[...hostIds].sort()}::uuid[]) order by id for update`;
  await tx`delete from lease_hosts where lease_id = ${leaseId} and host_id = any(${hostIds}::uuid[])`;
  await refreshBookedFrom(tx, hostIds);
  await tx`select pg_notify('treadmill_hosts', id::text) from unnest(${hostIds}::uuid[]) as u(id)`;
}

/** The hosts of a lease (their ids and names) locked in id order, with a job holding a slot on each, if any. */
export function lockLeaseHosts(tx: Db, leaseId: string): Promise<{ id: string; name: string; held_slots: number; busy_job: string | null }[]> {
  return tx<{ id: string; name: string; held_slots: number; busy_job: string | null }[]>`
    select h.id, h.name, h.held_slots,
      (select jh.job_id::text from job_hosts jh where jh.host_id = h.id and jh.released_at is null order by jh.job_id limit 1) as busy_job
    from hosts h where h.id in (select host_id from lease_hosts where lease_id = ${leaseId})
    order by h.id for update of h`;
}

/**
 * The latest end lease `leaseId` could have on its hosts, as far as other
 * bookings go: the earliest start of another open booking of one of them
 * at or after `from` (undefined: none), with the host.
 */
export async function nextBookingAfter(tx: Db, leaseId: string, from: Date): Promise<{ starts_at: Date; host_name: string } | undefined> {
  const [row] = await tx<{ starts_at: Date; host_name: string }[]>`
    select o.starts_at, h.name as host_name from lease_hosts mine
      join lease_hosts o on o.host_id = mine.host_id and o.open and o.lease_id <> mine.lease_id and o.ends_at > ${from}
      join hosts h on h.id = o.host_id
    where mine.lease_id = ${leaseId}
    order by o.starts_at limit 1`;
  return row;
}

/** Moves lease `lease`'s end (its bookings', its session job's timeout) to `endsAt`; the caller holds `lockBookings`, the lease's jobs (lockLeaseJobs) and the lease. */
export async function moveLeaseEnd(tx: Db, lease: LeaseRow, endsAt: Date): Promise<void> {
  const by = endsAt.getTime() - lease.ends_at.getTime();
  // Its session job runs until its end.
  if (lease.session_job_id !== null) {
    await tx`
      update jobs set job_timeout_ms = job_timeout_ms + ${by}, queue_timeout_ms = queue_timeout_ms + ${by},
        deadline_at = deadline_at + ${by} * interval '1 millisecond'
      where id = ${lease.session_job_id} and state <> 'finalized'`;
  }
  await tx`update leases set ends_at = ${endsAt} where id = ${lease.id}`;
  await tx`update lease_hosts set ends_at = ${endsAt} where lease_id = ${lease.id} and open`;
}

/** Leases (`l`-less: the leases table) whose selector, with its site, includes `scope` (null: every lease). */
const inScope = (sql: Db, scope: Record<string, string> | null) =>
  scope === null
    ? sql``
    : sql`and (required_tags || case when required_site is null then '{}'::jsonb else jsonb_build_object('site', required_site) end) @> ${sql.json(scope)}`;

/**
 * A user's leases (not `exceptId`, only those in `scope`) overlapping
 * [from, to), each with its start and effective end (an ended one's end)
 * and host count: what policy.ts sums per day.
 */
export function leaseSpansOf(
  sql: Db,
  ownerId: string,
  from: Date,
  to: Date,
  exceptId: string | null,
  scope: Record<string, string> | null,
): Promise<{ starts_at: Date; ends_at: Date; host_count: number }[]> {
  return sql<{ starts_at: Date; ends_at: Date; host_count: number }[]>`
    select starts_at, least(ends_at, coalesce(ended_at, ends_at)) as ends_at, host_count from leases
    where owner_id = ${ownerId} and starts_at < ${to} and least(ends_at, coalesce(ended_at, ends_at)) > ${from}
      ${exceptId !== null ? sql`and id <> ${exceptId}` : sql``} ${inScope(sql, scope)}`;
}

/** A user's leases not ended (only those in `scope`). */
export async function openLeaseCount(sql: Db, ownerId: string, scope: Record<string, string> | null): Promise<number> {
  const [{ n }] = await sql<{ n: number }[]>`
    select count(*)::int as n from leases where owner_id = ${ownerId} and state <> 'ended' ${inScope(sql, scope)}`;
  return n;
}

/**
 * Locks the unfinished jobs inside lease `leaseId` (its session job, jobs
 * run inside it, a hold's job) in id order: before the lease's row, in the
 * lock order. Returns their heads.
 */
export async function lockLeaseJobs(tx: Db, leaseId: string): Promise<Map<string, JobHead>> {
  const rows = await tx<{ id: string }[]>`select id from jobs where lease_id = ${leaseId} and state <> 'finalized'`;
  return lockJobHeads(
    tx,
    rows.map((r) => r.id),
  );
}

/** How a lease ends. */
export interface LeaseEnd {
  reason: LeaseEndReasonName;
  /** Why, for the holder (a revocation's reason); also the message of the cancels of its jobs. */
  message: string;
  actor: string;
  revokedBy?: string | null;
}

/**
 * Ends lease `leaseId` (any reason): every unfinished job inside it is
 * canceled (a queued one finalized CANCELED, a running one asked to stop;
 * each gets a LEASE event saying why), its bookings close, its hosts leave
 * it and their booked_from is recomputed, and the scheduler is woken so that
 * queued jobs get the hosts at once. Locks the lease, then its jobs, then
 * its hosts (the lock order). An ended lease is left as it is. Returns the lease row before
 * the end (undefined: no such lease).
 */
export async function endLease(tx: Db, leaseId: string, end: LeaseEnd): Promise<LeaseRow | undefined> {
  await lockLeaseJobs(tx, leaseId);
  const lease = await loadLease(tx, leaseId, { lock: true });
  if (!lease || lease.state === "ended") return lease;
  const message = clipText(end.message, 1024);
  // Under the lease's lock no job joins it any more; one that joined before it is locked now.
  const heads = await lockLeaseJobs(tx, leaseId);
  const changes: JobStateChange[] = [];
  const notes: EventInput[] = [];
  for (const job of heads.values()) {
    // A job that finalized while this waited for its lock is left as it ended.
    if (job.state === "finalized") continue;
    const base = { jobId: job.id, attempt: job.attempt, actor: end.actor, ownerId: job.owner_id };
    notes.push({ ...base, kind: "lease", state: job.state, stage: job.stage, message: `lease ${leaseId} ${end.reason}: ${message}` });
    if (job.state === "queued") {
      changes.push({
        kind: "finalize",
        id: job.id,
        reason: "canceled",
        exitStatus: null,
        exitCode: null,
        message,
        event: { ...base, kind: "state_changed", state: "finalized", message: `canceled: ${message}` },
      });
    } else if (job.stop_reason === null) {
      changes.push({
        kind: "stop",
        id: job.id,
        stopReason: "canceled",
        event: { ...base, kind: "cancel_requested", state: job.state, stage: job.stage, message },
      });
    }
  }
  await recordEvents(tx, notes);
  await writeJobStates(tx, changes);
  const hosts = await lockLeaseHosts(tx, leaseId);
  const hostIds = hosts.map((h) => h.id);
  await tx`update lease_hosts set open = false where lease_id = ${leaseId}`;
  await tx`update hosts set lease_id = null where lease_id = ${leaseId}`;
  await refreshBookedFrom(tx, hostIds);
  await tx`
    update leases set state = 'ended', end_reason = ${end.reason}, ended_at = now(), status_message = ${message},
      revoked_by = ${end.revokedBy ?? null}
    where id = ${leaseId}`;
  await recordLeaseEvents(tx, leaseId, [{ kind: "ended", state: "ended", message: message === "" ? end.reason : `${end.reason}: ${message}` }]);
  await audit(tx, {
    kind: `lease.${end.reason}`,
    actor: end.actor,
    userId: lease.owner_id,
    message: `lease ${leaseId} ${end.reason}${message ? `: ${message}` : ""}`,
    details: { leaseId, hosts: hosts.map((h) => h.name), canceledJobs: [...heads.keys()] },
  });
  await tx`select pg_notify('treadmill_hosts', id::text) from unnest(${hostIds}::uuid[]) as u(id)`;
  await notifySchedule(tx);
  return lease;
}

/**
 * Makes waiting lease `lease` ACTIVE when none of its hosts (locked here)
 * runs a job: the hosts become its (hosts.lease_id) and the scheduler is
 * woken for the jobs inside it. Otherwise returns the
 * busy hosts with a job each, and the lease stays WAITING.
 */
export async function activateLease(tx: Db, lease: LeaseRow, actor: string): Promise<{ busy: { id: string; name: string; job: string | null }[] }> {
  const hosts = await lockLeaseHosts(tx, lease.id);
  const busy = hosts.filter((h) => h.held_slots > 0).map((h) => ({ id: h.id, name: h.name, job: h.busy_job }));
  if (busy.length > 0) return { busy };
  await tx`update hosts set lease_id = ${lease.id} where id = any(${hosts.map((h) => h.id)}::uuid[])`;
  await tx`update leases set state = 'active', activated_at = now(), status_message = '' where id = ${lease.id}`;
  await recordLeaseEvents(tx, lease.id, [{ kind: "active", state: "active", message: `hosts ${hosts.map((h) => h.name).join(", ")} are the holder's` }]);
  await audit(tx, { kind: "lease.activate", actor, userId: lease.owner_id, message: `lease ${lease.id} active`, details: { leaseId: lease.id, hosts: hosts.map((h) => h.name) } });
  await tx`select pg_notify('treadmill_hosts', id::text) from unnest(${hosts.map((h) => h.id)}::uuid[]) as u(id)`;
  // Jobs submitted inside it while it waited can be placed now.
  await notifySchedule(tx);
  return { busy: [] };
}

/** Sets a lease's status message and, when it changed, records it as a WAITING entry. */
export async function leaseWaits(tx: Db, lease: LeaseRow, message: string): Promise<void> {
  if (lease.status_message === message) return;
  await tx`update leases set status_message = ${message} where id = ${lease.id}`;
  await recordLeaseEvents(tx, lease.id, [{ kind: "waiting", state: lease.state, message }]);
}

/** A hold of a failed job's hosts (JobSpec.hold_on_failure). */
export interface HoldInput {
  /** The new lease's id (UUIDv7). */
  id: string;
  ownerId: string;
  jobId: string;
  /** The job's hosts, by host index. */
  hostIds: string[];
  holdMs: number;
  graceMs: number;
}

/**
 * Creates an ACTIVE lease of kind 'hold' keeping a failed job's hosts (owner
 * = the job's owner, held_job_id = the job, ends_at = now + holdMs) and puts
 * the job inside it (jobs.lease_id). The caller holds the job's row lock;
 * the hosts are locked here, in id order. A booking of one of the hosts
 * that starts before now + holdMs cuts the hold to its start; when one has
 * already started (a lease waits for the host) there is no hold: returns
 * undefined and the caller ends the job as usual.
 */
export async function createHoldLease(tx: Db, h: HoldInput): Promise<LeaseRow | undefined> {
  const sorted = [...h.hostIds].sort();
  await tx`select 1 from hosts where id = any(${sorted}::uuid[]) order by id for update`;
  const [{ now, next }] = await tx<{ now: Date; next: Date | null }[]>`
    select now() as now, (select min(starts_at) from lease_hosts where host_id = any(${sorted}::uuid[]) and open and ends_at > now()) as next`;
  let endsAt = new Date(now.getTime() + h.holdMs);
  if (next !== null && next < endsAt) endsAt = next;
  if (endsAt.getTime() - now.getTime() < 1000) return undefined;
  await tx`
    insert into leases (id, owner_id, kind, state, host_count, starts_at, ends_at, grace_ms, keepalive_at, held_job_id, activated_at,
      description)
    values (${h.id}, ${h.ownerId}, 'hold', 'active', ${h.hostIds.length}, ${now}, ${endsAt}, ${h.graceMs}, ${now}, ${h.jobId}, ${now},
      ${`hosts of failed job ${h.jobId}, held for a post-mortem`})`;
  await tx`
    insert into lease_hosts (lease_id, host_id, host_index, starts_at, ends_at)
    select ${h.id}, id, i - 1, ${now}, ${endsAt} from unnest(${h.hostIds}::uuid[]) with ordinality as u(id, i)`;
  await tx`update hosts set lease_id = ${h.id} where id = any(${sorted}::uuid[])`;
  await refreshBookedFrom(tx, sorted);
  await tx`update jobs set lease_id = ${h.id} where id = ${h.jobId}`;
  const cut = endsAt.getTime() < now.getTime() + h.holdMs ? " (cut to the start of the next booking)" : "";
  await recordLeaseEvents(tx, h.id, [
    { kind: "active", state: "active", message: `hold of failed job ${h.jobId} until ${endsAt.toISOString()}${cut}` },
  ]);
  await audit(tx, { kind: "lease.hold", actor: "system", jobId: h.jobId, userId: h.ownerId, message: `lease ${h.id} holds the hosts of failed job ${h.jobId}`, details: { leaseId: h.id, until: endsAt.toISOString() } });
  await tx`select pg_notify('treadmill_hosts', id::text) from unnest(${sorted}::uuid[]) as u(id)`;
  return loadLease(tx, h.id);
}

/** Leases the keeper may have to act on now, soonest first. */
export function leasesDue(sql: Db, keeperStartedAt: Date, limit: number): Promise<{ id: string; state: LeaseStateName }[]> {
  return sql<{ id: string; state: LeaseStateName }[]>`
    select id, state from leases
    where state <> 'ended' and (
      state = 'requested'
      or (state = 'waiting' and (starts_at <= now() or coalesce(deadline_at, ends_at) <= now()))
      or ends_at <= now()
      or (kind = 'hold' and exists (select 1 from jobs j where j.id = held_job_id and j.state = 'finalized'))
      or (now() - greatest(keepalive_at, starts_at) > grace_ms * interval '1 millisecond'
          and now() - ${keeperStartedAt}::timestamptz > grace_ms * interval '1 millisecond'))
    order by least(starts_at, ends_at) limit ${limit}`;
}

/** What the keeper decides from, read in the transaction that acts, the lease locked (SKIP LOCKED). */
export interface LeaseDue {
  lease: LeaseRow;
  now: Date;
  started: boolean;
  over: boolean;
  pastDeadline: boolean;
  /** No keepalive for its grace period (counted from its start, and from this keeper's start). */
  silent: boolean;
  /** A hold whose held job is finalized. */
  heldJobEnded: boolean;
}

export async function lockLeaseDue(tx: Db, id: string, keeperStartedAt: Date): Promise<LeaseDue | undefined> {
  const [row] = await tx<{ id: string; now: Date; started: boolean; over: boolean; past_deadline: boolean; silent: boolean; held_job_ended: boolean }[]>`
    select id, now() as now, starts_at <= now() as started, ends_at <= now() as over,
      (kind = 'hold' and exists (select 1 from jobs j where j.id = held_job_id and j.state = 'finalized')) as held_job_ended,
      coalesce(deadline_at, ends_at) <= now() as past_deadline,
      (now() - greatest(keepalive_at, starts_at) > grace_ms * interval '1 millisecond'
        and now() - ${keeperStartedAt}::timestamptz > grace_ms * interval '1 millisecond') as silent
    from leases where id = ${id} and state <> 'ended' for update skip locked`;
  if (!row) return undefined;
  const lease = (await loadLease(tx, id))!;
  return { lease, now: row.now, started: row.started, over: row.over, pastDeadline: row.past_deadline, silent: row.silent, heldJobEnded: row.held_job_ended };
}

/** One interval of a host's calendar row. */
export interface CalendarRow {
  host_id: string;
  host_name: string;
  kind: "lease" | "job" | null;
  id: string | null;
  owner_id: string | null;
  owner_username: string | null;
  starts_at: Date | null;
  ends_at: Date | null;
  lease_state: LeaseStateName | null;
  private: boolean;
}

/**
 * The calendar over [from, to) of the hosts matching `tags`, `site` and
 * `driver` that user `viewer` may use (at most `limit` hosts, by name): per
 * host its bookings (open, or ended within the window) and its running
 * jobs (start to start plus timeout), or one row without an interval.
 */
export function calendarRows(
  sql: Db,
  f: { tags: Record<string, string>; site: string | null; driver: string | null; viewer: string },
  from: Date,
  to: Date,
  limit: number,
): Promise<CalendarRow[]> {
  return sql<CalendarRow[]>`
    with hs as (
      select h.id, h.name from hosts h
      where treadmill_host_match_tags(h.tags, h.site) @> ${sql.json(f.tags)}
        and (${f.site}::text is null or h.site = ${f.site}) and (${f.driver}::text is null or h.driver_kind = ${f.driver})
        and h.health <> 'retired' and treadmill_user_may_use_host(${f.viewer}, h.id)
      order by h.name limit ${limit}),
    entries as (
      select lh.host_id, 'lease' as kind, l.id::text as id, l.owner_id, lh.starts_at,
        case when lh.open then lh.ends_at else least(lh.ends_at, l.ended_at) end as ends_at, l.state as lease_state, false as private
      from lease_hosts lh join leases l on l.id = lh.lease_id
      where lh.host_id in (select id from hs) and lh.starts_at < ${to}
        and (case when lh.open then lh.ends_at else least(lh.ends_at, l.ended_at) end) > ${from}
      union all
      select jh.host_id, 'job', j.id::text, j.owner_id, coalesce(j.started_at, j.assigned_at),
        coalesce(j.started_at, j.assigned_at) + j.job_timeout_ms * interval '1 millisecond', null,
        j.owner_id <> ${f.viewer} and not exists (select 1 from users v where v.id = ${f.viewer} and v.role = 'admin')
      from job_hosts jh join jobs j on j.id = jh.job_id and j.attempt = jh.attempt
      where jh.host_id in (select id from hs) and jh.released_at is null and j.state <> 'finalized')
    select hs.id as host_id, hs.name as host_name, e.kind, e.id, e.owner_id, u.name as owner_username, e.starts_at, e.ends_at,
      e.lease_state, coalesce(e.private, false) as private
    from hs left join entries e on e.host_id = hs.id left join users u on u.id = e.owner_id
    order by hs.name, e.starts_at nulls first`;
}
