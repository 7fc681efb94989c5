/**
 * What a host's news does to a job, in the caller's transaction. Lock order
 * everywhere in the job system: job rows (in id order when several), then
 * their job_hosts rows, then host rows (a released slot is counted on its
 * host row: migration 0012; an attach locks its host's jobs before the
 * host), so transactions never wait on each other in a cycle. The scheduler
 * alone locks hosts before jobs, and it skips locked rows, never waits.
 *
 * A multi-host attempt ends at the first end on any of its hosts (a workload
 * exit, a failure, a dropped host): the other hosts then hold an attempt that
 * is no longer current and get StopJob; their slots stay taken until they
 * report the end (or say they no longer hold it).
 *
 * The statements are db/queries/job-hosts.ts's and jobs.ts's; those that do
 * not depend on each other's results go out together
 * (pipelined on the transaction's connection, executed in the order written),
 * so a change costs two or three round trips, not one per statement.
 */
import { type HostTermination, settleEnd } from "./reconciliation.js";
import { endSlots, notifySlotsFreed, reportSlots } from "../db/queries/job-hosts.js";
import { type Db, type DbState, type JobHead, type JobStateChange, lockJobHeads, writeJobStates } from "../db/queries/jobs.js";
import { type Ending, endAttempts, endOutcome } from "./store.js";
import { lockHostAccounts } from "../db/queries/health-checks.js";
import { type EndFact, accountEnds } from "./health.js";
import { endHoldLeases } from "../db/queries/hold.js";
import { holdJobs } from "./holds.js";
import type { HoldPolicy } from "./config.js";

export type { HostTermination };

type Progress = Extract<JobStateChange, { kind: "progress" }>;

const ORDER: Record<string, number> = { assigned: 0, initializing: 1, running: 2, terminating: 3 };

export interface HostAt {
  jobId: string;
  hostId: string;
  attempt: number;
}

export interface HostEnd {
  at: HostAt;
  termination: HostTermination;
  /** The supervisor no longer holds the attempt: the slot is free. */
  released: boolean;
  actor: string;
}

export interface HostEndResult {
  job: JobHead | undefined;
  outcome: "restarted" | "finalized" | "none";
}

/**
 * The attempt ended on `hostId` (reported by its supervisor, or decided by the
 * coordinator). `released`: the supervisor no longer holds it, the slot is
 * free. The job's current attempt ends with the requested stop's reason if one
 * was requested (it wins), else with this termination's.
 */
export async function hostEnded(
  tx: Db,
  at: HostAt,
  t: HostTermination,
  options: { released: boolean; actor: string },
): Promise<HostEndResult> {
  const [result] = await hostsEnded(tx, [{ at, termination: t, ...options }]);
  return result;
}

/**
 * hostEnded for ends on distinct jobs, in two round trips and a few
 * statements whatever their number (the group commit's batches).
 */
export async function hostsEnded(tx: Db, ends: HostEnd[]): Promise<HostEndResult[]> {
  if (ends.length === 0) return [];
  const rows = ends.map((e, i) => ({
    i,
    job: e.at.jobId,
    host: e.at.hostId,
    attempt: e.at.attempt,
    released: e.released,
    termination: {
      reason: e.termination.reason,
      exitStatus: e.termination.exitStatus ?? null,
      exitCode: e.termination.exitCode ?? null,
      message: e.termination.message,
    },
  }));
  // The hosts' rows last (the lock order): their health accounting follows from these ends.
  const [jobs, took, accounts] = await Promise.all([
    lockJobHeads(
      tx,
      ends.map((e) => e.at.jobId),
    ),
    endSlots(tx, rows),
    lockHostAccounts(
      tx,
      ends.map((e) => e.at.hostId),
    ),
  ]);
  // Only a host holding a slot of the attempt has a say (a report of another
  // host's job, or of an attempt already settled here, changes nothing).
  const results: HostEndResult[] = ends.map((e) => ({ job: jobs.get(e.at.jobId), outcome: "none" }));
  const ending: { i: number; job: JobHead; end: Ending }[] = [];
  const facts: EndFact[] = [];
  const hostNames = new Map(accounts.map((a) => [a.id, a.name]));
  ends.forEach((e, i) => {
    const job = results[i].job;
    if (!took.has(i) || !job) return;
    const settled = settleEnd(job, e.at.attempt, e.termination);
    if (settled.outcome === "none") return;
    const { reason, exitStatus, exitCode, message } = settled;
    ending.push({ i, job, end: { reason, exitStatus, exitCode, message, hostId: e.at.hostId, hostName: hostNames.get(e.at.hostId), actor: e.actor } });
    facts.push({
      hostId: e.at.hostId,
      jobId: job.id,
      reason,
      exitStatus,
      message,
      checkId: job.health_check_id,
      attempt: job.attempt,
      state: settled.outcome === "restarted" ? "queued" : "finalized",
      ownerId: job.owner_id,
    });
  });
  const freed = ends.filter((e, i) => took.has(i) && e.released).map((e) => e.at.hostId);
  const [outcomes] = await Promise.all([
    endAttempts(tx, ending),
    freed.length > 0 && notifySlotsFreed(tx, freed),
    accountEnds(tx, new Map(accounts.map((a) => [a.id, a])), facts),
  ]);
  // A job's hold lease (hold_on_failure) ends with its attempt, once the end
  // is written (the lease's end then cancels nothing): its hosts go back at
  // once; a new attempt runs outside it.
  const leased = ending.filter((e) => e.job.lease_id !== null);
  if (leased.length > 0) {
    const restarted = leased.filter((e) => endOutcome(e.job, e.end) === "restarted").map((e) => e.job.id);
    await endHoldLeases(
      tx,
      leased.map((e) => e.job.id),
      restarted,
      leased[0].end.actor,
    );
  }
  ending.forEach((e, k) => (results[e.i].outcome = outcomes[k]));
  return results;
}

export interface HostReport {
  at: HostAt;
  state: string;
  stage: string | null;
  message: string;
  actor: string;
}

/**
 * A non-terminal report (or a held job in a hello): the host holds the
 * attempt in `state`/`stage`. The job's state is the least advanced of its
 * hosts' (TERMINATING as soon as one terminates).
 */
export async function hostProgress(
  tx: Db,
  at: HostAt,
  report: { state: string; stage: string | null; message: string },
  actor: string,
  policy: HoldPolicy,
): Promise<void> {
  await hostsProgress(tx, [{ at, ...report, actor }], policy);
}

/**
 * hostProgress for reports on distinct jobs, in two round trips and a few
 * statements whatever their number (more for a job that goes HELD: its
 * hold lease, holds.ts, under `policy`).
 */
export async function hostsProgress(tx: Db, reports: HostReport[], policy: HoldPolicy): Promise<void> {
  if (reports.length === 0) return;
  const rows = reports.map((r, i) => ({ i, job: r.at.jobId, host: r.at.hostId, attempt: r.at.attempt, state: r.state, stage: r.stage }));
  const [jobs, { took, states: byJob }] = await Promise.all([
    lockJobHeads(
      tx,
      reports.map((r) => r.at.jobId),
    ),
    reportSlots(tx, rows),
  ]);
  const changes: JobStateChange[] = [];
  reports.forEach((r, i) => {
    const job = jobs.get(r.at.jobId);
    const states = byJob.get(r.at.jobId) ?? [];
    if (!took.has(i) || !job || job.state === "finalized" || job.attempt !== r.at.attempt || states.length === 0) return;
    let state: DbState = "terminating";
    let stage: string | null = null;
    if (!states.some((h) => h.state === "terminating")) {
      const least = states.reduce((a, b) => (ORDER[a.state ?? "assigned"] <= ORDER[b.state ?? "assigned"] ? a : b));
      state = (least.state ?? "assigned") as DbState;
      stage = state === "initializing" ? least.stage : null;
      // Held on one host (its workload failed, hold_on_failure): the job is held.
      if (state === "running" && states.some((h) => h.stage === "held")) stage = "held";
    }
    if (state === job.state && stage === job.stage) return;
    changes.push({
      kind: "progress",
      id: r.at.jobId,
      state,
      stage,
      event: {
        jobId: r.at.jobId,
        kind: state === job.state ? "stage_changed" : "state_changed",
        state,
        stage,
        attempt: r.at.attempt,
        hostId: r.at.hostId,
        actor: r.actor,
        ownerId: job.owner_id,
        message: r.message,
      },
    });
  });
  await writeJobStates(tx, changes);
  const held = changes.filter((c): c is Progress => c.kind === "progress" && c.stage === "held" && jobs.get(c.id)?.stage !== "held");
  // Went HELD (hold_on_failure): a hold lease keeps their hosts.
  if (held.length > 0) await holdJobs(tx, held, policy);
}
