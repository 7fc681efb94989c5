/**
 * Reconciliation (DESIGN.md §4): what the coordinator does with what a
 * supervisor says it holds, against what the database records. Pure: the
 * session reads the rows, calls these, and carries out the actions
 * (session.ts); the tests walk the table row by row
 * (test/coordinator/reconciliation.test.ts).
 *
 * | database says                  | supervisor says            | coordinator does                         | here                     |
 * |--------------------------------|----------------------------|------------------------------------------|--------------------------|
 * | K not assigned to this host    | holds K                    | StopJob K                                | reconcileHello: stop     |
 * | J assigned, not yet started    | does not hold J            | StartJob J again                         | commandsFor: start       |
 * | J assigned or running          | holds J, not terminated    | adopt the reported state                 | reconcileHello: adopt    |
 * | J running                      | does not hold J            | finalize HOST_DROPPED, restart policy    | reconcileHello: end, settleEnd |
 * | J cancel or timeout requested  | holds J, not terminated    | StopJob J again                          | commandsFor: stop        |
 * | J cancel or timeout requested  | J terminated               | finalize with the requested reason       | reconcileHello: end, settleEnd |
 * | J running                      | J terminated               | finalize WORKLOAD_EXITED, acknowledge    | reconcileHello: end, settleEnd |
 * | J finalized                    | J terminated (retained)    | acknowledge; the slot becomes free       | reconcileHello: end, settleEnd |
 *
 * The hello is reconciled once, in the attach transaction (reconcileHello);
 * the commands follow from the database whenever it changes
 * (commandsFor), so a StopJob or StartJob of the table is sent by the same
 * path as one for a cancel or an assignment made later.
 */
import { ExitStatus, FinalizeReason, type JobStage, type JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import type { HostSlot } from "../db/queries/job-hosts.js";
import type { DbReason, DbState, JobHead } from "../db/queries/jobs.js";
import { endOutcome, reasonName, stageName, stateName } from "./store.js";

/** How an attempt ended on a host, as the job system records it. */
export interface HostTermination {
  reason: DbReason;
  exitStatus?: "success" | "failure" | null;
  exitCode?: number | null;
  message: string;
  /** The job was held after its workload failed (JobTermination.held): the workload's end stands over a requested stop. */
  held?: boolean;
}

/**
 * What the database records of an attempt this host holds a slot for (a
 * job_hosts row not released, and its job): whether the supervisor started
 * it, whether its end here is recorded, the job's state and current
 * attempt, and a requested stop not carried out yet.
 */
export type RecordedSlot = HostSlot;

/** A terminated attempt as the supervisor reports it (a JobTermination of the stream). */
export interface ReportedTermination {
  reason: FinalizeReason;
  exitStatus: ExitStatus;
  exitCode?: number;
  message: string;
  held?: boolean;
}

/** An attempt a supervisor says it holds (a HeldJob of its hello). */
export interface ReportedJob {
  jobId: string;
  attempt: number;
  state: JobState;
  stage: JobStage;
  termination?: ReportedTermination;
}

/** What to do about one attempt of a hello. */
export type HelloAction =
  /** The attempt ended on this host (the host no longer holds it: the slot is free); `ack`: acknowledge the retained report. */
  | { kind: "end"; jobId: string; attempt: number; termination: HostTermination; ack: boolean }
  /** The host holds the current attempt in this state. */
  | { kind: "adopt"; jobId: string; attempt: number; state: DbState; stage: string | null }
  /** The host holds an attempt that is no longer current: it runs (a StopJob follows from commandsFor). */
  | { kind: "mark-started"; jobId: string; attempt: number }
  /** The host does not hold an attempt that is no longer current: the slot is free. */
  | { kind: "release"; jobId: string; attempt: number }
  /** A retained report of an attempt the database does not assign here: acknowledge it, nothing else. */
  | { kind: "ack"; jobId: string; attempt: number }
  /** The host holds an attempt the database does not assign here: stop it. */
  | { kind: "stop"; jobId: string; attempt: number; reason: FinalizeReason; message: string };

/** Whether the slot's attempt is the job's live one on this host. */
export function isCurrent(slot: RecordedSlot): boolean {
  return slot.jobState !== "finalized" && slot.jobAttempt === slot.attempt && !slot.terminated;
}

/**
 * A supervisor's end of an attempt as the job system records it. Reasons a
 * supervisor may not claim (QUEUE_TIMEOUT, HOST_DROPPED, unknown ones) are
 * recorded INTERNAL_ERROR with what it said.
 */
export function termination(t: ReportedTermination): HostTermination {
  const reason = reasonName(t.reason);
  const valid = reason !== undefined && reason !== "queue_timeout" && reason !== "host_dropped";
  return {
    reason: valid ? reason : "internal_error",
    exitStatus: t.exitStatus === ExitStatus.SUCCESS ? "success" : t.exitStatus === ExitStatus.FAILURE ? "failure" : null,
    exitCode: t.exitCode ?? null,
    message: valid ? t.message.slice(0, 4096) : `supervisor reported an invalid end (${FinalizeReason[t.reason] ?? t.reason}): ${t.message.slice(0, 1024)}`,
    ...(valid && t.held === true ? { held: true } : {}),
  };
}

/**
 * The actions of a hello: for each recorded slot of this host (in the
 * order given) what the supervisor's side of it means, then for each
 * reported attempt the database does not assign here (in the hello's
 * order) an acknowledgement or a StopJob. A slot whose attempt is assigned
 * and not started, and not held, needs nothing here: commandsFor sends its
 * StartJob again.
 */
export function reconcileHello(hostName: string, recorded: readonly RecordedSlot[], reported: readonly ReportedJob[]): HelloAction[] {
  const held = new Map(reported.map((j) => [`${j.jobId}/${j.attempt}`, j]));
  const actions: HelloAction[] = [];
  for (const r of recorded) {
    const key = `${r.jobId}/${r.attempt}`;
    const h = held.get(key);
    held.delete(key);
    const at = { jobId: r.jobId, attempt: r.attempt };
    if (h?.termination) {
      // Terminated there: the attempt ends (settleEnd decides how) and the report is acknowledged.
      actions.push({ kind: "end", ...at, termination: termination(h.termination), ack: true });
    } else if (h) {
      if (isCurrent(r)) actions.push({ kind: "adopt", ...at, state: stateName(h.state) ?? "assigned", stage: stageName(h.stage) });
      else actions.push({ kind: "mark-started", ...at });
    } else if (!isCurrent(r)) {
      actions.push({ kind: "release", ...at });
    } else if (r.stopReason !== null) {
      // Asked to stop, and it does not run there: it is stopped.
      actions.push({ kind: "end", ...at, termination: { reason: "canceled", message: "not running on its host" }, ack: false });
    } else if (r.started) {
      actions.push({
        kind: "end",
        ...at,
        termination: { reason: "host_dropped", message: `host ${hostName} re-attached without the job` },
        ack: false,
      });
    }
  }
  for (const h of held.values()) {
    if (h.termination) actions.push({ kind: "ack", jobId: h.jobId, attempt: h.attempt });
    else actions.push({ kind: "stop", jobId: h.jobId, attempt: h.attempt, reason: FinalizeReason.INTERNAL_ERROR, message: "the job is not assigned to this host" });
  }
  return actions;
}

/** A recorded slot as a stream's sync reads it, with the StartJobs its stream broke over. */
export interface SyncSlot extends RecordedSlot {
  startFailures: number;
}

/** A command the database asks for. */
export type SyncAction =
  | { kind: "stop"; jobId: string; attempt: number; reason: FinalizeReason; message: string }
  | { kind: "start"; jobId: string; attempt: number }
  /** StartJob broke the stream `failures` times: not sent again, the attempt ends as a start failure. */
  | { kind: "give-up-start"; jobId: string; attempt: number; failures: number };

/**
 * The commands the host's slots ask for that this stream has not sent
 * (`sent(kind, jobId, attempt)`): StopJob for an attempt no longer current
 * or whose stop was requested, StartJob for one not started, unless its
 * StartJob broke the stream `maxStartFailures` times.
 */
export function commandsFor(
  slots: readonly SyncSlot[],
  sent: (kind: "start" | "stop", jobId: string, attempt: number) => boolean,
  maxStartFailures: number,
): SyncAction[] {
  const actions: SyncAction[] = [];
  for (const r of slots) {
    const current = isCurrent(r);
    const at = { jobId: r.jobId, attempt: r.attempt };
    if (!current || r.stopReason !== null) {
      if (sent("stop", r.jobId, r.attempt)) continue;
      if (!current) actions.push({ kind: "stop", ...at, reason: FinalizeReason.INTERNAL_ERROR, message: "the attempt is no longer current" });
      else if (r.stopReason === "job_timeout") actions.push({ kind: "stop", ...at, reason: FinalizeReason.JOB_TIMEOUT, message: "job timeout" });
      else actions.push({ kind: "stop", ...at, reason: FinalizeReason.CANCELED, message: "canceled" });
    } else if (!r.started && r.startFailures >= maxStartFailures) {
      actions.push({ kind: "give-up-start", ...at, failures: r.startFailures });
    } else if (!r.started && !sent("start", r.jobId, r.attempt)) {
      actions.push({ kind: "start", ...at });
    }
  }
  return actions;
}

/** How a job's attempt ends, once one of its hosts reports the end. */
export type Settled =
  | { outcome: "none" }
  | {
      outcome: "restarted" | "finalized";
      reason: DbReason;
      exitStatus: "success" | "failure" | null;
      exitCode: number | null;
      message: string;
    };

/**
 * What the end of `attempt` on a host does to its job: nothing when the
 * job is finalized or runs another attempt (a retained report is only
 * acknowledged); else the attempt ends with the requested stop's reason if
 * one was requested (it wins over the workload's exit, except for a held
 * job's: its workload had ended before the stop that ended the hold), or
 * with the host's, and the restart policy decides between a new attempt
 * and finalization.
 */
export function settleEnd(job: JobHead, attempt: number, t: HostTermination): Settled {
  if (job.state === "finalized" || job.attempt !== attempt) return { outcome: "none" };
  const heldExit = t.held === true && t.reason === "workload_exited";
  const reason: DbReason = heldExit ? t.reason : (job.stop_reason ?? t.reason);
  return {
    outcome: endOutcome(job, { reason, exitStatus: reason === "workload_exited" ? (t.exitStatus ?? null) : null }),
    reason,
    exitStatus: reason === "workload_exited" ? (t.exitStatus ?? null) : null,
    exitCode: t.exitCode ?? null,
    message: t.message,
  };
}
