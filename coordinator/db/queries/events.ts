/**
 * Jobs' timelines (table `job_events`): every statement that writes or reads
 * them. A timeline event is written with its audit twin (kind `job.<kind>`)
 * and a 'treadmill_jobs' notification of its job, in the caller's
 * transaction; `eventWrites` is that pair of inserts as CTEs, so that a
 * statement writing job state (the scheduler's assignment) records its
 * events the same way in the same statement.
 */
import type { Fragment, Sql, TransactionSql } from "postgres";
import { clipText } from "../../shared/common.js";
import { jobEventAudit } from "./audit.js";

type Db = Sql | TransactionSql;

/** A job state as stored (jobs.state). */
type StoredState = "queued" | "assigned" | "initializing" | "running" | "terminating" | "finalized";

export interface EventInput {
  jobId: string;
  /** job_events.kind: submitted, state_changed, stage_changed, cancel_requested, restarted, log_incomplete, host_health, lease, results, artifacts, rerun, retried, snapshot_*. */
  kind: "submitted" | "state_changed" | "stage_changed" | "cancel_requested" | "restarted" | "log_incomplete" | "host_health" | "lease" | "results" | "artifacts" | "rerun" | "retried";
  state: StoredState;
  stage?: string | null;
  message?: string;
  attempt: number;
  hostId?: string | null;
  /** For the audit log: "user:<name>", "host:<name>", "system". */
  actor: string;
  ownerId?: string;
}

/**
 * The inserts of timeline events and their audit twins, as two CTEs (`ev`,
 * `au`) over `rows`: a relation with the columns i (order), job, kind,
 * state, stage, message, attempt, host, actor, owner and details (the audit
 * entry's JSON).
 */
export function eventWrites(sql: Db, rows: Fragment): Fragment {
  return sql`
    ev as (
      insert into job_events (job_id, kind, state, stage, message, attempt, host_id)
      select job, kind, state, stage, message, attempt, host from ${rows} order by i),
    au as (${jobEventAudit(sql, rows)})`;
}

/** Records timeline events (job_events, the audit log, 'treadmill_jobs') in one statement, in the order given. */
export async function recordEvents(tx: Db, events: EventInput[]): Promise<void> {
  if (events.length === 0) return;
  const rows = events.map((e, i) => ({
    i,
    job: e.jobId,
    kind: e.kind,
    state: e.state,
    stage: e.stage ?? null,
    message: clipText(e.message ?? "", 4096),
    attempt: e.attempt,
    host: e.hostId ?? null,
    actor: e.actor,
    owner: e.ownerId ?? null,
  }));
  await tx`
    with v as materialized (
      select *, jsonb_build_object('state', state, 'stage', stage, 'attempt', attempt) as details
      from jsonb_to_recordset(${tx.json(rows as never)}::jsonb)
        as v(i int, job uuid, kind text, state text, stage text, message text, attempt int, host uuid, actor text, owner uuid)),
    ${eventWrites(tx, tx`v`)}
    select pg_notify('treadmill_jobs', job::text) from (select distinct job from v) n`;
}

/** Records one timeline event (see recordEvents). */
export async function recordEvent(tx: Db, e: EventInput): Promise<void> {
  await recordEvents(tx, [e]);
}

/**
 * Says why queued jobs wait: their status message and, once per reason, a
 * WAITING event on their timeline (no audit entry: nothing changed).
 */
export async function recordWaiting(tx: Db, jobIds: string[], message: string): Promise<void> {
  await tx`
    with w as (
      update jobs set status_message = ${message}, updated_at = now()
      where id = any(${jobIds}::uuid[]) and state = 'queued' and status_message <> ${message}
      returning id, attempt),
    ev as (
      insert into job_events (job_id, kind, state, message, attempt)
      select id, 'waiting', 'queued', ${message}, attempt from w)
    select pg_notify('treadmill_jobs', id::text) from w`;
}

/** A timeline event as stored. */
export interface EventRow {
  at: Date;
  kind: string;
  state: string | null;
  stage: string | null;
  message: string;
  attempt: number | null;
  host_id: string | null;
}

/** A job's timeline, oldest first. */
export async function loadEvents(sql: Db, jobId: string): Promise<EventRow[]> {
  return sql<EventRow[]>`
    select at, kind, state, stage, message, attempt, host_id from job_events where job_id = ${jobId} order by id`;
}
