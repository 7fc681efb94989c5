/**
 * Job rows and the transitions every part of the job system shares: loading a
 * job as a `Job` message, recording timeline events (job_events, the audit log
 * and the 'treadmill_jobs' notification, in the caller's transaction),
 * finalizing a job or restarting it as a new attempt.
 *
 * Channels (PostgreSQL LISTEN/NOTIFY), all notified inside the transaction
 * that made the change, so a listener that reads after the notification sees
 * it:
 * - 'treadmill_jobs', payload a job id: the job changed (WatchJob/WatchJobs).
 * - 'treadmill_schedule', empty payload: the scheduler may have work (a job
 *   was queued, a slot was released, a host attached or was enabled).
 * - 'treadmill_commands', payload a host id: what the host's supervisor should
 *   be running changed; the replica holding its stream re-reads the database
 *   and sends the commands. Also tells an older stream it was superseded.
 * - 'treadmill_hosts', payload a host id (contract with the catalog): the host
 *   row or its current jobs changed.
 */
import { create, fromJson, type JsonValue } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Sql, TransactionSql } from "postgres";
import { pipeline } from "../db/reserved.js";
import { type EventInput, loadEvents, recordEvents } from "../db/queries/events.js";
import { clipText } from "../shared/common.js";
import {
  ExitStatus,
  FinalizeReason,
  type Job,
  type JobEvent,
  JobEventKind,
  JobSchema,
  JobSpecSchema,
  JobStage,
  JobState,
  LogStatus,
  ReasonClass,
} from "../../gen/treadmill/coordinator/v1/job_pb.js";

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

/** The reasons whose class is INFRASTRUCTURE: only these restart a job. */
export const INFRASTRUCTURE_REASONS: ReadonlySet<DbReason> = new Set(["host_dropped", "host_start_failure", "internal_error"]);

const REASON_CLASS: Record<DbReason, ReasonClass> = {
  workload_exited: ReasonClass.JOB,
  job_timeout: ReasonClass.JOB,
  canceled: ReasonClass.USER,
  queue_timeout: ReasonClass.USER,
  image_error: ReasonClass.USER,
  host_dropped: ReasonClass.INFRASTRUCTURE,
  host_start_failure: ReasonClass.INFRASTRUCTURE,
  internal_error: ReasonClass.INFRASTRUCTURE,
};

/** `queued` <-> JobState.QUEUED and alike (enum names are the upper-case db values). */
export function stateEnum(state: string | null): JobState {
  return state ? (JobState[state.toUpperCase() as keyof typeof JobState] ?? JobState.UNSPECIFIED) : JobState.UNSPECIFIED;
}
export function stateName(state: JobState): DbState | undefined {
  const name = JobState[state];
  return name && state !== JobState.UNSPECIFIED ? (name.toLowerCase() as DbState) : undefined;
}
export function stageEnum(stage: string | null): JobStage {
  return stage ? (JobStage[stage.toUpperCase() as keyof typeof JobStage] ?? JobStage.UNSPECIFIED) : JobStage.UNSPECIFIED;
}
export function stageName(stage: JobStage): string | null {
  return stage === JobStage.UNSPECIFIED || JobStage[stage] === undefined ? null : JobStage[stage].toLowerCase();
}
export function reasonEnum(reason: string | null): FinalizeReason {
  return reason
    ? (FinalizeReason[reason.toUpperCase() as keyof typeof FinalizeReason] ?? FinalizeReason.UNSPECIFIED)
    : FinalizeReason.UNSPECIFIED;
}
export function reasonName(reason: FinalizeReason): DbReason | undefined {
  return reason === FinalizeReason.UNSPECIFIED || FinalizeReason[reason] === undefined
    ? undefined
    : (FinalizeReason[reason].toLowerCase() as DbReason);
}

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

/** A job's timeline, oldest first. */
export async function loadTimeline(sql: Db, jobId: string): Promise<JobEvent[]> {
  const rows = await loadEvents(sql, jobId);
  return rows.map((r) => ({
    $typeName: "treadmill.coordinator.v1.JobEvent",
    time: timestampFromDate(r.at),
    kind: JobEventKind[r.kind.toUpperCase() as keyof typeof JobEventKind] ?? JobEventKind.UNSPECIFIED,
    state: stateEnum(r.state),
    stage: stageEnum(r.stage),
    message: r.message,
    attempt: r.attempt ?? 0,
    hostId: r.host_id ?? "",
  }));
}

/** The Job message of a row (secret values were never stored in `spec`). */
export function jobMessage(row: JobRow, timeline: JobEvent[] = []): Job {
  const reason = row.reason;
  return create(JobSchema, {
    id: row.id,
    ownerUserId: row.owner_id,
    spec: fromJson(JobSpecSchema, row.spec, { ignoreUnknownFields: true }),
    state: stateEnum(row.state),
    stage: stageEnum(row.stage),
    finalizeReason: reasonEnum(reason),
    reasonClass: reason ? REASON_CLASS[reason] : ReasonClass.UNSPECIFIED,
    exitStatus: row.exit_status === "success" ? ExitStatus.SUCCESS : row.exit_status === "failure" ? ExitStatus.FAILURE : ExitStatus.UNSPECIFIED,
    exitCode: row.exit_code ?? undefined,
    statusMessage: row.status_message,
    attempt: row.attempt,
    hostIds: row.host_ids,
    cancelRequested: row.stop_reason === "canceled" && row.state !== "finalized",
    manifestDigest: row.manifest_digest,
    createTime: timestampFromDate(row.created_at),
    assignTime: row.assigned_at ? timestampFromDate(row.assigned_at) : undefined,
    startTime: row.started_at ? timestampFromDate(row.started_at) : undefined,
    finalizeTime: row.finalized_at ? timestampFromDate(row.finalized_at) : undefined,
    updateTime: timestampFromDate(row.updated_at),
    timeline,
    logServerUrls: row.log_server_urls,
    logStatus: LogStatus[(row.log_status ?? "unspecified").toUpperCase() as keyof typeof LogStatus],
    logBytesLost: BigInt(row.log_bytes_lost),
    logStatusMessage: row.log_status_message,
  });
}

/** Hosts still holding a slot for any attempt of the jobs (their streams must hear of a change). */
export async function notifyJobHosts(tx: Db, jobIds: string | string[]): Promise<void> {
  const ids = typeof jobIds === "string" ? [jobIds] : jobIds;
  if (ids.length === 0) return;
  await tx`
    select pg_notify('treadmill_commands', h.id::text), pg_notify('treadmill_hosts', h.id::text)
    from (select distinct host_id as id from job_hosts where job_id = any(${ids}::uuid[]) and released_at is null) h`;
}

export interface Ending {
  reason: DbReason;
  exitStatus?: "success" | "failure" | null;
  exitCode?: number | null;
  message: string;
  hostId?: string | null;
  actor: string;
}

/**
 * The restart policy: an attempt ending for an infrastructure reason, with
 * no stop requested and restarts left, becomes a new attempt; any other end
 * finalizes the job.
 */
export function endOutcome(job: Pick<JobHead, "stop_reason" | "attempt" | "max_restarts">, reason: DbReason): "restarted" | "finalized" {
  return INFRASTRUCTURE_REASONS.has(reason) && job.stop_reason === null && job.attempt - 1 < job.max_restarts ? "restarted" : "finalized";
}

/**
 * Ends the current attempt of a locked, unfinalized job. An infrastructure
 * reason with restarts left re-queues the job as a new attempt; anything else
 * finalizes it (secret values deleted: nothing will start it again). Streams
 * of the hosts still holding the attempt are told (they stop it).
 */
export async function endAttempt(tx: Db, job: JobHead, end: Ending): Promise<"restarted" | "finalized"> {
  const [outcome] = await endAttempts(tx, [{ job, end }]);
  return outcome;
}

/** endAttempt for several distinct jobs: a few statements in all, sent together. */
export async function endAttempts(tx: Db, items: { job: JobHead; end: Ending }[]): Promise<("restarted" | "finalized")[]> {
  const outcomes = items.map(({ job, end }) => endOutcome(job, end.reason));
  const restarts: { id: string; attempt: number; message: string }[] = [];
  const finals: { id: string; reason: DbReason; exit_status: string | null; exit_code: number | null; message: string }[] = [];
  const events: EventInput[] = [];
  items.forEach(({ job, end }, i) => {
    const message = clipText(end.message, 1024);
    if (outcomes[i] === "restarted") {
      const attempt = job.attempt + 1;
      restarts.push({ id: job.id, attempt, message });
      events.push({
        jobId: job.id,
        kind: "restarted",
        state: "queued",
        attempt,
        hostId: end.hostId,
        actor: end.actor,
        ownerId: job.owner_id,
        message: `attempt ${job.attempt} ended ${end.reason}: ${message}; restarting as attempt ${attempt}`,
      });
    } else {
      finals.push({
        id: job.id,
        reason: end.reason,
        exit_status: end.reason === "workload_exited" ? (end.exitStatus ?? null) : null,
        exit_code: end.exitCode ?? null,
        message,
      });
      events.push({
        jobId: job.id,
        kind: "state_changed",
        state: "finalized",
        attempt: job.attempt,
        hostId: end.hostId,
        actor: end.actor,
        ownerId: job.owner_id,
        message: message === "" ? end.reason : `${end.reason}: ${message}`,
      });
    }
  });
  // Independent statements: they go out together.
  await Promise.all([
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
    recordEvents(tx, events),
    notifyJobHosts(
      tx,
      items.map((it) => it.job.id),
    ),
  ]);
  return outcomes;
}
