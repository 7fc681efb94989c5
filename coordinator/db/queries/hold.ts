/**
 * Holds (JobSpec.hold_on_failure, issue #22): the lease of kind 'hold' that
 * keeps a failed job's hosts as they are for a post-mortem, created when the
 * job goes RUNNING in stage HELD and ended when the job ends. The lease is
 * an ordinary ACTIVE lease (migration 0017): owned by the job's owner, over
 * the job's hosts (hosts.lease_id), from now until now + the hold, cut to
 * the hosts' next booking so that a hold never overlaps one; the lease
 * keeper ends it as any other (expiry, lost keepalive, release, revoke), and
 * its end cancels the job.
 *
 * Lock order (the job system's): the job's row (the caller holds it), then
 * its hosts' rows in id order, then the lease's rows.
 *
 * The one writer of a hold lease until the lease service's own
 * createHoldLease/endLease (db/queries/leases.ts) replace these statements.
 */
import type { Sql, TransactionSql } from "postgres";

type Db = Sql | TransactionSql;

/** A hold lease's keepalive grace: the lease policy's default (5 minutes). */
export const HOLD_GRACE_MS = 5 * 60_000;

/** A job whose hosts are to be held. */
export interface HoldInput {
  /** The new lease's id (uuidv7). */
  leaseId: string;
  jobId: string;
  attempt: number;
  ownerId: string;
}

/** What became of a hold. */
export type HoldOutcome =
  /** A hold lease now keeps the job's hosts until `endsAt`. */
  | { kind: "created"; leaseId: string; endsAt: Date }
  /** The job runs inside a lease already: that lease keeps its hosts. */
  | { kind: "inside"; leaseId: string }
  /** Nothing to do: held already, or the job no longer holds hosts. */
  | { kind: "none" };

/**
 * Creates the hold lease of a locked job whose hosts report HELD
 * (idempotent: a job with an open hold lease gets no second one).
 */
export async function createHoldLease(tx: Db, h: HoldInput): Promise<HoldOutcome> {
  const hosts = await tx<{ host_id: string; host_index: number; job_lease_id: string | null; hold_ms: number | null }[]>`
    select jh.host_id, jh.host_index, j.lease_id as job_lease_id, j.hold_on_failure_ms as hold_ms
    from jobs j join job_hosts jh on jh.job_id = j.id and jh.attempt = ${h.attempt} and jh.released_at is null
      join hosts ho on ho.id = jh.host_id
    where j.id = ${h.jobId}
      and not exists (select 1 from leases l where l.held_job_id = j.id and l.state <> 'ended')
    order by ho.id
    for update of ho`;
  if (hosts.length === 0) return { kind: "none" };
  const inside = hosts[0].job_lease_id;
  if (inside !== null) return { kind: "inside", leaseId: inside };
  const ids = hosts.map((r) => r.host_id);
  const holdMs = hosts[0].hold_ms ?? 0;
  const [lease] = await tx<{ ends_at: Date }[]>`
    with l as (
      insert into leases (id, owner_id, kind, state, host_count, starts_at, ends_at, grace_ms, keepalive_at, held_job_id,
        description, activated_at)
      values (${h.leaseId}, ${h.ownerId}, 'hold', 'active', ${ids.length}, now(),
        -- Never into a booking of one of the hosts; at least a second.
        greatest(now() + interval '1 second', least(now() + ${holdMs} * interval '1 millisecond',
          (select min(x.starts_at) from lease_hosts x where x.host_id = any(${ids}::uuid[]) and x.open and x.starts_at > now()))),
        ${HOLD_GRACE_MS}, now(), ${h.jobId}, ${`hold of job ${h.jobId} after its workload failed`}, now())
      returning id, ends_at),
    lh as (
      insert into lease_hosts (lease_id, host_id, host_index, starts_at, ends_at)
      select l.id, v.host, v.idx, now(), l.ends_at
      from l, unnest(${ids}::uuid[], ${hosts.map((r) => r.host_index)}::int[]) as v(host, idx)),
    ev as (
      insert into lease_events (lease_id, kind, state, message)
      select l.id, 'active', 'active', ${`holding the hosts of job ${h.jobId} after its workload failed`} from l),
    hu as (
      update hosts set lease_id = ${h.leaseId}, booked_from = least(booked_from, now())
      where id = any(${ids}::uuid[])
      returning pg_notify('treadmill_hosts', id::text)),
    ju as (update jobs set lease_id = ${h.leaseId}, updated_at = now() where id = ${h.jobId})
    select ends_at, (select count(*) from hu) as hosts from l`;
  return { kind: "created", leaseId: h.leaseId, endsAt: lease.ends_at };
}

/**
 * Ends the open hold leases of jobs whose attempt ended (RELEASED): their
 * hosts go back to the scheduler at once (hosts.lease_id cleared,
 * booked_from recomputed from the hosts' other open bookings,
 * 'treadmill_schedule'). A job among `restarted` leaves its hold lease (its
 * new attempt is queued outside it); a finalized one keeps naming it. The
 * caller holds the jobs' rows. Returns the leases ended.
 */
export async function endHoldLeases(tx: Db, jobIds: string[], restarted: string[] = []): Promise<string[]> {
  if (jobIds.length === 0) return [];
  const rows = await tx<{ id: string }[]>`
    with l as (
      update leases set state = 'ended', end_reason = 'released', ended_at = now(),
        status_message = 'its job ended'
      where held_job_id = any(${jobIds}::uuid[]) and state <> 'ended' and kind = 'hold'
      returning id),
    lh as (
      update lease_hosts set open = false where lease_id in (select id from l) returning host_id, lease_id),
    ev as (
      insert into lease_events (lease_id, kind, state, message)
      select l.id, 'ended', 'ended', 'released: its job ended' from l),
    hu as (
      -- The statement sees lease_hosts as before it: this lease's rows are left out by hand.
      update hosts h set lease_id = case when h.lease_id in (select id from l) then null else h.lease_id end,
        booked_from = (select min(x.starts_at) from lease_hosts x
          where x.host_id = h.id and x.open and x.lease_id not in (select id from l))
      where h.id in (select host_id from lh)
      returning pg_notify('treadmill_hosts', h.id::text), pg_notify('treadmill_schedule', '')),
    ju as (
      update jobs j set lease_id = null from l
      where j.id = any(${restarted}::uuid[]) and j.lease_id = l.id)
    select id, (select count(*) from hu) as hosts from l`;
  return rows.map((r) => r.id);
}
