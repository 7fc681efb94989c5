/**
 * What a host's news does to a job, in the caller's transaction. Lock order
 * everywhere in the job system: a host row (attach) before job rows, job rows
 * (in id order when several) before their job_hosts rows, so transactions
 * never wait on each other in a cycle.
 *
 * A multi-host attempt ends at the first end on any of its hosts (a workload
 * exit, a failure, a dropped host): the other hosts then hold an attempt that
 * is no longer current and get StopJob; their slots stay taken until they
 * report the end (or say they no longer hold it).
 *
 * Statements that do not depend on each other's results go out together
 * (pipelined on the transaction's connection, executed in the order written),
 * so a change costs two or three round trips, not one per statement.
 */
import type { Db, DbReason, DbState, JobRow } from "./store.js";
import { endAttempt, loadJob, recordEvent } from "./store.js";

export interface HostTermination {
  reason: DbReason;
  exitStatus?: "success" | "failure" | null;
  exitCode?: number | null;
  message: string;
}

const ORDER: Record<string, number> = { assigned: 0, initializing: 1, running: 2, terminating: 3 };

/**
 * The attempt ended on `hostId` (reported by its supervisor, or decided by the
 * coordinator). `released`: the supervisor no longer holds it, the slot is
 * free. The job's current attempt ends with the requested stop's reason if one
 * was requested (it wins), else with this termination's.
 */
export async function hostEnded(
  tx: Db,
  at: { jobId: string; hostId: string; attempt: number },
  t: HostTermination,
  options: { released: boolean; actor: string },
): Promise<{ job: JobRow | undefined; outcome: "restarted" | "finalized" | "none" }> {
  const [job, updated] = await Promise.all([
    loadJob(tx, at.jobId, { lock: true }),
    tx`
      update job_hosts set
        termination = coalesce(termination, ${tx.json({ reason: t.reason, exitStatus: t.exitStatus ?? null, exitCode: t.exitCode ?? null, message: t.message } as never)}),
        terminated_at = coalesce(terminated_at, now()),
        released_at = ${options.released ? tx`now()` : tx`released_at`}
      where job_id = ${at.jobId} and attempt = ${at.attempt} and host_id = ${at.hostId} and released_at is null
      returning 1`,
  ]);
  // Only a host holding a slot of the attempt has a say (a report of another
  // host's job, or of an attempt already settled here, changes nothing).
  if (updated.length === 0) return { job, outcome: "none" };
  const released = options.released ? tx`select pg_notify('treadmill_schedule', ''), pg_notify('treadmill_hosts', ${at.hostId})` : undefined;
  if (!job || job.state === "finalized" || job.attempt !== at.attempt) {
    await released;
    return { job, outcome: "none" };
  }
  const reason: DbReason = job.stop_reason ?? t.reason;
  const [outcome] = await Promise.all([
    endAttempt(tx, job, {
      reason,
      exitStatus: reason === "workload_exited" ? t.exitStatus : null,
      exitCode: t.exitCode,
      message: t.message,
      hostId: at.hostId,
      actor: options.actor,
    }),
    released,
  ]);
  return { job, outcome };
}

/** Releases a host's slot of an attempt the supervisor does not hold. */
export async function releaseSlot(tx: Db, at: { jobId: string; hostId: string; attempt: number }): Promise<void> {
  const rows = await tx`
    update job_hosts set released_at = now(), terminated_at = coalesce(terminated_at, now())
    where job_id = ${at.jobId} and attempt = ${at.attempt} and host_id = ${at.hostId} and released_at is null
    returning 1`;
  if (rows.length > 0) await tx`select pg_notify('treadmill_schedule', ''), pg_notify('treadmill_hosts', ${at.hostId})`;
}

/**
 * A non-terminal report (or a held job in a hello): the host holds the
 * attempt in `state`/`stage`. The job's state is the least advanced of its
 * hosts' (TERMINATING as soon as one terminates).
 */
export async function hostProgress(
  tx: Db,
  at: { jobId: string; hostId: string; attempt: number },
  report: { state: string; stage: string | null; message: string },
  actor: string,
): Promise<void> {
  const [job, updated, hosts] = await Promise.all([
    loadJob(tx, at.jobId, { lock: true }),
    tx`
      update job_hosts set started = true, state = ${report.state}, stage = ${report.stage}
      where job_id = ${at.jobId} and attempt = ${at.attempt} and host_id = ${at.hostId}
        and released_at is null and terminated_at is null
      returning 1`,
    // After the update (statements run in order): the hosts' states with this report.
    tx<{ state: string | null; stage: string | null }[]>`
      select state, stage from job_hosts where job_id = ${at.jobId} and attempt = ${at.attempt} and terminated_at is null`,
  ]);
  if (updated.length === 0 || !job || job.state === "finalized" || job.attempt !== at.attempt) return;
  let state: DbState = "terminating";
  let stage: string | null = null;
  if (!hosts.some((h) => h.state === "terminating")) {
    const least = hosts.reduce((a, b) => (ORDER[a.state ?? "assigned"] <= ORDER[b.state ?? "assigned"] ? a : b));
    state = (least.state ?? "assigned") as DbState;
    stage = state === "initializing" ? least.stage : null;
  }
  if (state === job.state && stage === job.stage) return;
  await Promise.all([
    tx`
      update jobs set state = ${state}, stage = ${stage}, updated_at = now(),
        started_at = ${state === "running" ? tx`coalesce(started_at, now())` : tx`started_at`}
      where id = ${at.jobId}`,
    recordEvent(tx, {
      jobId: at.jobId,
      kind: state === job.state ? "stage_changed" : "state_changed",
      state,
      stage,
      attempt: at.attempt,
      hostId: at.hostId,
      actor,
      ownerId: job.owner_id,
      message: report.message,
    }),
  ]);
}
