/**
 * What every part of the job system shares about jobs: the names of states,
 * stages and reasons on the wire and in the database, a job row as a `Job`
 * message with its timeline, and how an attempt ends (finalized, or
 * restarted as a new attempt by the restart policy). The statements are in
 * db/queries/jobs.ts and events.ts; a state change is written by their
 * writeJobStates.
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
import { create, fromJson } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { loadEvents } from "../db/queries/events.js";
import { type Db, type DbReason, type DbState, type JobHead, type JobRow, type JobStateChange, writeJobStates } from "../db/queries/jobs.js";
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

/** The class of a finalize reason (job.proto FinalizeReason's comments); UNSPECIFIED for a reason this version does not know. */
export function reasonClass(reason: string): ReasonClass {
  return REASON_CLASS[reason as DbReason] ?? ReasonClass.UNSPECIFIED;
}

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
    healthCheckId: row.health_check_id ?? "",
    leaseId: row.lease_id ?? "",
    results: row.results ? { ...row.results, total: BigInt(row.results.total), passed: BigInt(row.results.passed), failed: BigInt(row.results.failed), skipped: BigInt(row.results.skipped), errored: BigInt(row.results.errored) } : undefined,
    flaky: row.flaky,
    rerunOfJobId: row.rerun_of_job_id ?? "",
    rerunJobIds: row.rerun_job_ids ?? [],
  });
}

export interface Ending {
  reason: DbReason;
  exitStatus?: "success" | "failure" | null;
  exitCode?: number | null;
  message: string;
  hostId?: string | null;
  /** The host's name, for the timeline (the id stands in without it). */
  hostName?: string;
  actor: string;
}

/** An ending as the retry and restart policies read it. */
type EndFacts = Pick<Ending, "reason" | "exitStatus">;

/**
 * The retry policy's condition (RetryCondition, db name) that an end meets
 * with budget left, or null: the workload failed (an infrastructure end
 * never counts as one) or the host failed to start it; never after a
 * requested stop (cancel, job timeout).
 */
export function retryCondition(job: Pick<JobHead, "stop_reason" | "retry_on" | "retry_max" | "retries">, end: EndFacts): string | null {
  if (job.stop_reason !== null || !job.retry_on || job.retry_on.length === 0) return null;
  const condition =
    end.reason === "workload_exited" && end.exitStatus === "failure" ? "workload_failure" : end.reason === "host_start_failure" ? "host_start_failure" : null;
  if (condition === null || !job.retry_on.includes(condition)) return null;
  return (job.retries?.[condition] ?? 0) < (job.retry_max ?? 0) ? condition : null;
}

/**
 * The retry policy first (its own budget per condition), then the restart
 * policy: an attempt ending for an infrastructure reason, with no stop
 * requested and restarts left, becomes a new attempt; any other end
 * finalizes the job. Restarts are counted as the attempts that were not
 * retries.
 */
export function endOutcome(job: Pick<JobHead, "stop_reason" | "attempt" | "max_restarts" | "retry_on" | "retry_max" | "retries">, end: EndFacts): "restarted" | "finalized" {
  if (retryCondition(job, end) !== null) return "restarted";
  const retried = Object.values(job.retries ?? {}).reduce((a, b) => a + b, 0);
  return INFRASTRUCTURE_REASONS.has(end.reason) && job.stop_reason === null && job.attempt - 1 - retried < job.max_restarts ? "restarted" : "finalized";
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
  const outcomes = items.map(({ job, end }) => endOutcome(job, end));
  const changes: JobStateChange[] = items.map(({ job, end }, i) => {
    const message = clipText(end.message, 1024);
    const event = { jobId: job.id, hostId: end.hostId, actor: end.actor, ownerId: job.owner_id };
    const condition = outcomes[i] === "restarted" ? retryCondition(job, end) : null;
    if (condition !== null) {
      const attempt = job.attempt + 1;
      const left = (job.retry_max ?? 0) - (job.retries?.[condition] ?? 0) - 1;
      const where = end.hostName ? ` on host ${end.hostName}` : end.hostId ? ` on host ${end.hostId}` : "";
      return {
        kind: "restart",
        id: job.id,
        attempt,
        message,
        retry: { condition, avoidHostId: job.retry_other_host ? (end.hostId ?? null) : null },
        event: {
          ...event,
          kind: "retried",
          state: "queued",
          attempt,
          message:
            `attempt ${job.attempt} ended ${end.reason}${where} (${condition.replaceAll("_", " ")}): ${message}; ` +
            `retrying as attempt ${attempt}${job.retry_other_host ? " on another host" : ""} (${left} ${condition.replaceAll("_", " ")} ${left === 1 ? "retry" : "retries"} left)`,
        },
      };
    }
    if (outcomes[i] === "restarted") {
      const attempt = job.attempt + 1;
      return {
        kind: "restart",
        id: job.id,
        attempt,
        message,
        event: {
          ...event,
          kind: "restarted",
          state: "queued",
          attempt,
          message: `attempt ${job.attempt} ended ${end.reason}: ${message}; restarting as attempt ${attempt}`,
        },
      };
    }
    return {
      kind: "finalize",
      id: job.id,
      reason: end.reason,
      exitStatus: end.reason === "workload_exited" ? (end.exitStatus ?? null) : null,
      exitCode: end.exitCode ?? null,
      message,
      event: {
        ...event,
        kind: "state_changed",
        state: "finalized",
        attempt: job.attempt,
        message: message === "" ? end.reason : `${end.reason}: ${message}`,
      },
    };
  });
  await writeJobStates(tx, changes);
  return outcomes;
}
