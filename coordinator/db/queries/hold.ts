/**
 * Holds (JobSpec.hold_on_failure, issue #22): what the job system reads and
 * writes to keep a failed job's hosts as a lease of kind 'hold' when the
 * job goes RUNNING in stage HELD, and to end that lease when the job's
 * attempt ends. The lease itself is written by leases.ts (createHoldLease,
 * endLease), as every lease is.
 *
 * Lock order: leases.ts's is lease rows, job rows, host rows; a job's end
 * holds its row already, so its hold lease is taken SKIP LOCKED: a lease
 * locked meanwhile is being ended (or renewed) by the lease service or its
 * keeper, which then finds the job ended.
 */
import type { Sql, TransactionSql } from "postgres";
import { endLease, leaseSpansOf, openLeaseCount } from "./leases.js";

type Db = Sql | TransactionSql;

/** What decides a job's hold, read under its row lock. */
export interface HoldFacts {
  /** The attempt's hosts by host index (slots not released). */
  hostIds: string[];
  /** The lease the job runs inside already (a reservation's, or its open hold). */
  leaseId: string | null;
  /** An open hold lease of the job exists: it is held already. */
  held: boolean;
  holdMs: number;
  ownerIsAdmin: boolean;
}

export async function holdFacts(tx: Db, jobId: string, attempt: number): Promise<HoldFacts> {
  const [row] = await tx<{ host_ids: string[]; lease_id: string | null; held: boolean; hold_ms: number | null; admin: boolean }[]>`
    select array(select jh.host_id from job_hosts jh
        where jh.job_id = j.id and jh.attempt = ${attempt} and jh.released_at is null order by jh.host_index)::text[] as host_ids,
      j.lease_id,
      exists (select 1 from leases l where l.held_job_id = j.id and l.state <> 'ended') as held,
      j.hold_on_failure_ms as hold_ms,
      u.role = 'admin' as admin
    from jobs j join users u on u.id = j.owner_id
    where j.id = ${jobId}`;
  return {
    hostIds: row?.host_ids ?? [],
    leaseId: row?.lease_id ?? null,
    held: row?.held ?? false,
    holdMs: row?.hold_ms ?? 0,
    ownerIsAdmin: row?.admin ?? false,
  };
}

/** Spans of the owner's open leases over [from, to) and their number: what the per-user limits count. */
export async function ownerLeases(
  tx: Db,
  ownerId: string,
  from: Date,
  to: Date,
): Promise<{ open: number; spans: { starts_at: Date; ends_at: Date; host_count: number }[] }> {
  const [open, spans] = await Promise.all([openLeaseCount(tx, ownerId, null), leaseSpansOf(tx, ownerId, from, to, null, null)]);
  return { open, spans };
}

/**
 * Ends (RELEASED) the open hold leases of jobs whose attempt has ended (the
 * caller wrote the end first: the lease's end then cancels nothing). A job
 * among `restarted` leaves its hold lease first: its new attempt is queued
 * outside it. Leases locked by another transaction are left to it.
 */
export async function endHoldLeases(tx: Db, jobIds: string[], restarted: string[], actor: string): Promise<string[]> {
  if (jobIds.length === 0) return [];
  const leases = await tx<{ id: string; held_job_id: string }[]>`
    select id, held_job_id from leases
    where held_job_id = any(${jobIds}::uuid[]) and state <> 'ended' and kind = 'hold'
    order by id for update skip locked`;
  if (leases.length === 0) return [];
  if (restarted.length > 0) {
    await tx`update jobs set lease_id = null where id = any(${restarted}::uuid[]) and lease_id = any(${leases.map((l) => l.id)}::uuid[])`;
  }
  for (const l of leases) {
    await endLease(tx, l.id, { reason: "released", message: `job ${l.held_job_id} ended`, actor });
  }
  return leases.map((l) => l.id);
}
