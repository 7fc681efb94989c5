/**
 * Hosts' slots of jobs' attempts (table `job_hosts`): the job system's
 * statements on them. A row is a host's slot for one attempt: taken by the
 * scheduler's assignment, started when the supervisor acknowledges
 * StartJob or reports the attempt, terminated when the attempt ended there,
 * released when the supervisor no longer holds it (the slot is free).
 *
 * Lock order everywhere in the job system: job rows (in id order), then
 * their job_hosts rows, then host rows (triggers keep hosts.held_slots,
 * migration 0012: taking or releasing a slot updates its host row).
 */
import type { Sql, TransactionSql } from "postgres";
import type { DbReason, DbState } from "./jobs.js";

type Db = Sql | TransactionSql;

/** A host's slot for an attempt. */
export interface SlotAt {
  jobId: string;
  hostId: string;
  attempt: number;
}

/** An unreleased slot of a host as reconciliation reads it (with its job). */
export interface HostSlot {
  jobId: string;
  attempt: number;
  started: boolean;
  terminated: boolean;
  jobState: DbState;
  jobAttempt: number;
  stopReason: "canceled" | "job_timeout" | null;
}

/** The unreleased slots of `hostId`, their jobs locked (the attach transaction). */
export function lockHostSlots(tx: Db, hostId: string): Promise<HostSlot[]> {
  return tx<HostSlot[]>`
    select jh.job_id as "jobId", jh.attempt, jh.started, jh.terminated_at is not null as terminated,
      j.state as "jobState", j.attempt as "jobAttempt", j.stop_reason as "stopReason"
    from job_hosts jh join jobs j on j.id = jh.job_id
    where jh.host_id = ${hostId} and jh.released_at is null
    order by jh.job_id, jh.attempt
    for no key update of j`;
}

/**
 * The host's stream and unreleased slots, for its sync: one row per slot
 * (one with a null jobId when it holds none), none when the host is gone.
 */
export function hostSlotsForSync(
  sql: Db,
  hostId: string,
): Promise<(Omit<HostSlot, "jobId"> & { jobId: string | null; attach_session: string | null; startFailures: number })[]> {
  return sql`
    select h.attach_session, jh.job_id as "jobId", jh.attempt, jh.started, jh.terminated_at is not null as terminated,
      j.state as "jobState", j.attempt as "jobAttempt", j.stop_reason as "stopReason",
      coalesce(jh.start_failures, 0) as "startFailures"
    from hosts h
      left join job_hosts jh on jh.host_id = h.id and jh.released_at is null
      left join jobs j on j.id = jh.job_id
    where h.id = ${hostId}`;
}

/** Whether the unreleased slot `at` was started and terminated; undefined when there is none. */
export async function slotState(tx: Db, at: SlotAt): Promise<{ started: boolean; terminated: boolean } | undefined> {
  const [row] = await tx<{ started: boolean; terminated: boolean }[]>`
    select started, terminated_at is not null as terminated from job_hosts
    where job_id = ${at.jobId} and attempt = ${at.attempt} and host_id = ${at.hostId} and released_at is null`;
  return row;
}

/** The hosts hold their attempts (an acknowledged StartJob, a held job of a hello). */
export function markStarted(tx: Db, at: SlotAt[]): Promise<unknown> {
  return tx`
    update job_hosts jh set started = true
    from jsonb_to_recordset(${tx.json(at as never)}::jsonb) as v("jobId" uuid, "hostId" uuid, attempt int)
    where jh.job_id = v."jobId" and jh.attempt = v.attempt and jh.host_id = v."hostId" and jh.released_at is null`.execute();
}

/** An attempt's end on a host, as job_hosts keeps it. */
export interface SlotEnd {
  i: number;
  job: string;
  host: string;
  attempt: number;
  /** The supervisor no longer holds it: the slot is released. */
  released: boolean;
  termination: { reason: DbReason; exitStatus: string | null; exitCode: number | null; message: string };
}

/** Records ends on unreleased slots (the first end of a slot wins); returns the `i` of those that had one. */
export async function endSlots(tx: Db, ends: SlotEnd[]): Promise<Set<number>> {
  const rows = await tx<{ i: number }[]>`
    update job_hosts jh set
      termination = coalesce(jh.termination, v.termination),
      terminated_at = coalesce(jh.terminated_at, now()),
      released_at = case when v.released then now() else jh.released_at end
    from jsonb_to_recordset(${tx.json(ends as never)}::jsonb)
      as v(i int, job uuid, host uuid, attempt int, released boolean, termination jsonb)
    where jh.job_id = v.job and jh.attempt = v.attempt and jh.host_id = v.host and jh.released_at is null
    returning v.i`;
  return new Set(rows.map((r) => r.i));
}

/** Releases the unreleased slot `at` (and tells the scheduler and the catalog); whether there was one. */
export async function releaseSlot(tx: Db, at: SlotAt): Promise<boolean> {
  const rows = await tx`
    update job_hosts set released_at = now(), terminated_at = coalesce(terminated_at, now())
    where job_id = ${at.jobId} and attempt = ${at.attempt} and host_id = ${at.hostId} and released_at is null
    returning 1`;
  if (rows.length > 0) await notifySlotsFreed(tx, [at.hostId]);
  return rows.length > 0;
}

/** Slots of these hosts were released: the scheduler may place jobs, the catalog's watchers look again. */
export async function notifySlotsFreed(tx: Db, hostIds: string[]): Promise<void> {
  await tx`select pg_notify('treadmill_schedule', ''), pg_notify('treadmill_hosts', h::text) from unnest(${hostIds}::uuid[]) h`;
}

/** A host's report of the state it holds an attempt in. */
export interface SlotReport {
  i: number;
  job: string;
  host: string;
  attempt: number;
  state: string;
  stage: string | null;
}

/**
 * Records reports on live slots (released or terminated ones change
 * nothing), and reads back the states of every live slot of the reports'
 * attempts; two statements sent together. Returns the `i` of the reports
 * that took, and the slots' states by job in host-index order.
 */
export async function reportSlots(
  tx: Db,
  reports: SlotReport[],
): Promise<{ took: Set<number>; states: Map<string, { state: string | null; stage: string | null }[]> }> {
  const [updated, slots] = await Promise.all([
    tx<{ i: number }[]>`
      update job_hosts jh set started = true, state = v.state, stage = v.stage
      from jsonb_to_recordset(${tx.json(reports as never)}::jsonb) as v(i int, job uuid, host uuid, attempt int, state text, stage text)
      where jh.job_id = v.job and jh.attempt = v.attempt and jh.host_id = v.host
        and jh.released_at is null and jh.terminated_at is null
      returning v.i`,
    // After the update (statements run in order): the hosts' states with these reports.
    tx<{ job_id: string; state: string | null; stage: string | null }[]>`
      select h.job_id, h.state, h.stage
      from (select distinct job, attempt from jsonb_to_recordset(${tx.json(reports as never)}::jsonb) as v(job uuid, attempt int)) v,
        -- Through the primary key, one job at a time (offset 0 keeps the
        -- planner from a join that may scan job_hosts on stale statistics).
        lateral (select jh.job_id, jh.state, jh.stage, jh.host_index from job_hosts jh
          where jh.job_id = v.job and jh.attempt = v.attempt and jh.terminated_at is null offset 0) h
      order by h.job_id, h.host_index`,
  ]);
  const states = new Map<string, { state: string | null; stage: string | null }[]>();
  for (const h of slots) {
    const list = states.get(h.job_id);
    if (list) list.push(h);
    else states.set(h.job_id, [h]);
  }
  return { took: new Set(updated.map((u) => u.i)), states };
}

/** The stream of `hostId` broke with these StartJobs unanswered: each counts toward giving up. */
export async function countStartFailures(sql: Db, hostId: string, starts: { job: string; attempt: number }[]): Promise<void> {
  await sql`
    update job_hosts jh set start_failures = jh.start_failures + 1
    from jsonb_to_recordset(${sql.json(starts as never)}::jsonb) as v(job uuid, attempt int)
    where jh.job_id = v.job and jh.attempt = v.attempt and jh.host_id = ${hostId}
      and not jh.started and jh.released_at is null`;
}

/** Live slots of current attempts on hosts detached longer than `graceMs` (at most `limit`). */
export function droppedSlots(sql: Db, graceMs: number, limit: number): Promise<{ job_id: string; host_id: string; attempt: number; host_name: string }[]> {
  return sql`
    select jh.job_id, jh.host_id, jh.attempt, h.name as host_name
    from job_hosts jh join hosts h on h.id = jh.host_id join jobs j on j.id = jh.job_id
    where h.attached_replica is null
      and coalesce(h.detached_at, '-infinity') < now() - ${graceMs} * interval '1 millisecond'
      and jh.released_at is null and jh.terminated_at is null
      and j.state <> 'finalized' and j.attempt = jh.attempt
    limit ${limit}`;
}
