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
import { pipeline } from "../reserved.js";
import { type EventInput, recordEvents } from "./events.js";

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
}

/** The select list of JobRow (jobs aliased `j`). */
export const jobColumns = (sql: Db) => sql`
  j.id, j.owner_id, j.spec, j.state, j.stage, j.reason, j.exit_status, j.exit_code, j.attempt,
  j.priority, j.max_restarts, j.manifest_digest, j.status_message, j.stop_reason, j.created_at,
  j.updated_at, j.queued_at, j.assigned_at, j.started_at, j.finalized_at, j.job_timeout_ms,
  j.log_server_urls, j.log_status, j.log_bytes_lost, j.log_status_message,
  coalesce((select array_agg(jh.host_id order by jh.host_index) from job_hosts jh
            where jh.job_id = j.id and jh.attempt = j.attempt), '{}') as host_ids`;

export async function loadJob(sql: Db, id: string, options: { lock?: boolean } = {}): Promise<JobRow | undefined> {
  const [row] = options.lock
    ? await sql<JobRow[]>`select ${jobColumns(sql)} from jobs j where j.id = ${id} for update of j`
    : await sql<JobRow[]>`select ${jobColumns(sql)} from jobs j where j.id = ${id}`;
  return row;
}

/** What the transitions read of a job: its state and what decides how an attempt ends. */
export type JobHead = Pick<JobRow, "id" | "owner_id" | "state" | "stage" | "attempt" | "max_restarts" | "stop_reason">;

/** The heads of several jobs by id (missing ones are absent), their rows locked in id order. */
export async function lockJobHeads(sql: Db, ids: string[]): Promise<Map<string, JobHead>> {
  if (ids.length === 0) return new Map();
  const rows = await sql<JobHead[]>`
    select id, owner_id, state, stage, attempt, max_restarts, stop_reason from jobs
    where id = any(${[...ids].sort()}::uuid[]) order by id for update`;
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
  return tx`select 1 from jobs where id = any(${[...ids].sort()}::uuid[]) order by id for update`.execute();
}

/** A change of one job's state (or of its requested stop), with the timeline event that says it. */
export type JobStateChange =
  /** The job's state follows its hosts' (INITIALIZING, RUNNING, TERMINATING, with a stage). */
  | { kind: "progress"; id: string; state: DbState; stage: string | null; event: EventInput }
  /** The attempt ended and the job is queued again as `attempt`. */
  | { kind: "restart"; id: string; attempt: number; message: string; event: EventInput }
  /** The job is finalized; its secret values are deleted (nothing will start it again). */
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
  const restarts = of("restart").map((c) => ({ id: c.id, attempt: c.attempt, message: c.message }));
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
          status_message = v.message, updated_at = now()
        from jsonb_to_recordset(${tx.json(restarts as never)}::jsonb) as v(id uuid, attempt int, message text)
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
    finals.length > 0 && tx`delete from job_secrets where job_id = any(${finals.map((f) => f.id)}::uuid[])`,
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
