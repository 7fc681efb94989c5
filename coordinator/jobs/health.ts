/**
 * Host health (docs/health.md, issue #21): what the end of a job on a host
 * does to the host's health, and how a host's checks are queued as health
 * jobs. The decisions (`account`) are pure; `accountEnds` and `queueChecks`
 * carry them out in the caller's transaction, through health.ts's
 * setHostHealth for every change of health.
 *
 * The rules:
 * - Only an end that settles a job's attempt on this host counts (a host
 *   told to stop an attempt another host already ended is not charged).
 * - A user job that ends for an INFRASTRUCTURE reason (store.ts
 *   INFRASTRUCTURE_REASONS: host dropped, start failure -- image fetch,
 *   allocation, flashing, boot -- internal error) adds one to the host's
 *   failures in a row; K of them (the smallest quarantine_after of the
 *   checks that apply, 3 when none) quarantine it. A failure below K sends
 *   the host to CHECKING when a check applies. Any other end of a user job
 *   (the workload's own failure included) clears the count.
 * - User jobs ended since the last check reaching a check's every_jobs send
 *   a HEALTHY host to CHECKING.
 * - A health job that passes (exit 0) makes a CHECKING host HEALTHY once
 *   none of its checks is left unfinished, and returns a QUARANTINED one
 *   unless a check applying to it waits for an admin. One that fails in any
 *   other way (exit non-zero, timeout, start failure, host dropped)
 *   quarantines the host and schedules the retry of its checks with
 *   exponential backoff. A canceled health job decides nothing, and neither
 *   does any health job of a host an admin quarantined (or that waits for
 *   an admin after a pass): ReturnHost brings it back.
 * - Quarantine never stops a running job: it only keeps user jobs away.
 */
import { create, toJson } from "@bufbuild/protobuf";
import type { CoordinatorContext } from "../context.js";
import { recordEvents } from "../db/queries/events.js";
import { type Health, setHostHealth } from "../db/queries/health.js";
import {
  type AccountWrite,
  type HealthCheckRow,
  type HostAccount,
  checksQueued,
  insertHealthJob,
  notifyHealth,
  writeAccounts,
} from "../db/queries/health-checks.js";
import { type Db, type DbReason, imageForJob, notifySchedule } from "../db/queries/jobs.js";
import { audit } from "../db/queries/audit.js";
import { JobSpecSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { uuidv7 } from "../shared/common.js";
import { INFRASTRUCTURE_REASONS } from "./store.js";
import { parseImageReference } from "./validate.js";

/** How long a health job may wait for its host before it is finalized QUEUE_TIMEOUT (the keeper queues it again). */
const HEALTH_QUEUE_TIMEOUT_MS = 24 * 3600_000;

/** The end of a job's attempt on a host that settled the attempt. */
export interface EndFact {
  hostId: string;
  jobId: string;
  /** The attempt's reason (a requested stop's, else the host's). */
  reason: DbReason;
  exitStatus: "success" | "failure" | null;
  message: string;
  /** The job's health check, for a health job. */
  checkId: string | null;
  /** The ended attempt, and the job's state after this end (queued again by the restart policy, or finalized). */
  attempt: number;
  state: "queued" | "finalized";
  ownerId: string;
}

/** A change of the host's health, or of its reason alone (same health). */
export interface Verdict {
  health: Health;
  reason: string;
  jobId?: string;
  details?: Record<string, unknown>;
}

export interface Accounted {
  write: AccountWrite;
  verdict?: Verdict;
}

const checkName = (host: HostAccount, id: string | null) => (id ? (host.names[id] ?? id) : "");

/** What the settled ends `ends` (in order) do to `host`. */
export function account(host: HostAccount, ends: readonly EndFact[]): Accounted {
  const w: AccountWrite = {
    id: host.id,
    infra_failures: host.infra_failures,
    infra_failed_jobs: [...host.infra_failed_jobs],
    jobs_since_check: host.jobs_since_check,
    check_retries: host.check_retries,
    retry: "keep",
  };
  let health = host.health;
  let verdict: Verdict | undefined;
  let open = host.open_checks;
  const decide = (v: Verdict) => {
    verdict = v;
    health = v.health;
  };
  for (const e of ends) {
    if (health === "retired") break;
    if (e.checkId !== null) {
      open = Math.max(0, open - 1);
      if (e.reason === "canceled") continue;
      const name = checkName(host, e.checkId);
      const passed = e.reason === "workload_exited" && e.exitStatus === "success";
      // Quarantined by an admin (or waiting for one): only ReturnHost brings it back; a check decides nothing.
      if (health === "quarantined" && !host.retrying && w.retry !== "start") continue;
      if (passed && health === "quarantined") {
        if (host.needs_admin) {
          decide({ health, reason: `health check ${name} passed (job ${e.jobId}); waits for an admin to return the host`, jobId: e.jobId });
          w.retry = "stop";
        } else if (open === 0) {
          decide({ health: "healthy", reason: "", jobId: e.jobId, details: { check: name, passed: true } });
          Object.assign(w, { infra_failures: 0, infra_failed_jobs: [], check_retries: 0, retry: "stop" });
        }
      } else if (passed) {
        if (open === 0 && health !== "healthy") decide({ health: "healthy", reason: "", jobId: e.jobId, details: { check: name, passed: true } });
      } else {
        const how = e.reason === "workload_exited" ? `exited with ${e.exitStatus ?? "failure"}` : e.reason;
        const retries = health === "quarantined" ? w.check_retries + 1 : 0;
        decide({
          health: "quarantined",
          reason: `health check ${name} failed (job ${e.jobId}: ${how}${e.message ? `: ${e.message.slice(0, 300)}` : ""})`,
          jobId: e.jobId,
          details: { check: name, failedJob: e.jobId, finalizeReason: e.reason },
        });
        Object.assign(w, { check_retries: retries, retry: "start" });
      }
      continue;
    }
    w.jobs_since_check += 1;
    if (INFRASTRUCTURE_REASONS.has(e.reason)) {
      w.infra_failures += 1;
      w.infra_failed_jobs = [...w.infra_failed_jobs, e.jobId].slice(-Math.max(host.k, 1));
      if (w.infra_failures >= host.k && health !== "quarantined") {
        decide({
          health: "quarantined",
          reason: `${w.infra_failures} infrastructure failures in a row (jobs ${w.infra_failed_jobs.join(", ")}; last: ${e.reason}${e.message ? `: ${e.message.slice(0, 200)}` : ""})`,
          jobId: e.jobId,
          details: { failedJobs: w.infra_failed_jobs, quarantineAfter: host.k, lastReason: e.reason },
        });
        Object.assign(w, { check_retries: 0, retry: "start" });
      } else if (host.checks > 0 && (health === "healthy" || health === "unknown")) {
        decide({ health: "checking", reason: `infrastructure failure of job ${e.jobId} (${e.reason}): checking the host`, jobId: e.jobId });
      }
    } else {
      w.infra_failures = 0;
      w.infra_failed_jobs = [];
      if (health === "healthy" && host.every_jobs !== null && w.jobs_since_check >= host.every_jobs) {
        decide({ health: "checking", reason: `${w.jobs_since_check} jobs since its last check`, jobId: e.jobId });
      }
    }
  }
  return { write: w, verdict };
}

/**
 * Accounts the settled ends of jobs on hosts whose rows the caller locked
 * (lockHostAccounts, before the job rows): the counters, and each change of
 * health through setHostHealth. In the transaction that ends the attempts.
 */
export async function accountEnds(tx: Db, hosts: ReadonlyMap<string, HostAccount>, ends: readonly EndFact[]): Promise<void> {
  const byHost = new Map<string, EndFact[]>();
  for (const e of ends) if (hosts.has(e.hostId)) byHost.set(e.hostId, [...(byHost.get(e.hostId) ?? []), e]);
  if (byHost.size === 0) return;
  const writes: AccountWrite[] = [];
  const verdicts: { host: HostAccount; verdict: Verdict }[] = [];
  for (const [id, list] of byHost) {
    const host = hosts.get(id)!;
    const { write, verdict } = account(host, list);
    writes.push(write);
    if (verdict) verdicts.push({ host, verdict });
  }
  await writeAccounts(tx, writes);
  for (const { host, verdict } of verdicts) await applyVerdict(tx, host.id, host.health, verdict, "system");
  // The job that decided says so on its timeline.
  const decided = new Map(ends.map((e) => [e.jobId, e]));
  await recordEvents(
    tx,
    verdicts.flatMap(({ host, verdict }) => {
      const e = verdict.jobId === undefined ? undefined : decided.get(verdict.jobId);
      if (!e) return [];
      const what = verdict.health === host.health ? `host ${host.name} stays ${verdict.health}` : `host ${host.name} is now ${verdict.health}`;
      return [
        {
          jobId: e.jobId,
          kind: "host_health" as const,
          state: e.state,
          attempt: e.attempt,
          hostId: host.id,
          actor: "system",
          ownerId: e.ownerId,
          message: verdict.reason ? `${what}: ${verdict.reason}` : what,
        },
      ];
    }),
  );
  if (verdicts.some((v) => v.verdict.health === "checking" || v.verdict.health === "quarantined")) await notifyHealth(tx);
}

/** Sets the host's health, or (same health) records the new reason on the host and in the audit log. */
async function applyVerdict(tx: Db, hostId: string, before: Health, v: Verdict, actor: string): Promise<void> {
  if (v.health !== before) {
    await setHostHealth(tx, { hostId, health: v.health, reason: v.reason, actor, jobId: v.jobId, details: v.details });
    return;
  }
  await tx`update hosts set health_reason = ${v.reason.slice(0, 1400)} where id = ${hostId}
    returning pg_notify('treadmill_hosts', id::text)`;
  await audit(tx, { kind: "host.health", actor, hostId, jobId: v.jobId, message: `health ${v.health}: ${v.reason}`, details: { to: v.health } });
}

/** A health job that could not be queued: its check's image is gone or not usable by the check's owner. */
export interface QueueProblem {
  check: string;
  message: string;
}

/**
 * Queues one health job per check for host `host` (pinned to it, owned by
 * the check's owner, its image resolved now) and resets the host's count of
 * jobs since its last check. Returns the ids queued and the checks that
 * could not be. The caller holds the host's row lock and has set its health.
 */
export async function queueChecks(
  tx: Db,
  ctx: Pick<CoordinatorContext, "clock">,
  host: { id: string; name: string },
  checks: readonly HealthCheckRow[],
  actor: string,
  why: string,
): Promise<{ jobs: string[]; problems: QueueProblem[] }> {
  const jobs: string[] = [];
  const problems: QueueProblem[] = [];
  const events = [];
  for (const c of checks) {
    const image = await imageForJob(tx, c.owner_id, parseImageReference("image", c.image));
    if (!image || !image.allowed) {
      problems.push({ check: c.name, message: `health check ${c.name} cannot run: image ${c.image} ${image ? "is not visible to its owner" : "not found"}` });
      continue;
    }
    const id = uuidv7(ctx.clock());
    const spec = create(JobSpecSchema, {
      image: c.image,
      hosts: { hostCount: 1 },
      priority: 100,
      jobTimeout: { seconds: BigInt(Math.ceil(Number(c.timeout_ms) / 1000)) },
      parameters: c.parameters.map((p) => ({ name: p.name, value: p.value, secret: false })),
      tags: { "health-check": c.name },
      description: `health check ${c.name} of host ${host.name}`,
    });
    await insertHealthJob(tx, {
      id,
      ownerId: c.owner_id,
      spec: toJson(JobSpecSchema, spec),
      digest: image.digest,
      holderId: image.holder_id,
      mediaTypes: image.media_types,
      jobTimeoutMs: Number(c.timeout_ms),
      queueTimeoutMs: HEALTH_QUEUE_TIMEOUT_MS,
      checkId: c.id,
      hostId: host.id,
    });
    jobs.push(id);
    events.push({
      jobId: id,
      kind: "submitted" as const,
      state: "queued" as const,
      attempt: 1,
      actor,
      ownerId: c.owner_id,
      hostId: host.id,
      message: `health check ${c.name} of host ${host.name} (${why}): image ${image.name}:${image.tag} (${image.digest})`,
    });
  }
  await recordEvents(tx, events);
  await checksQueued(tx, host.id);
  if (jobs.length > 0) await notifySchedule(tx);
  return { jobs, problems };
}

/**
 * Moves a host whose checks are due to the health they run under (CHECKING,
 * or QUARANTINED staying so) and queues them; a check that cannot be queued
 * quarantines the host (nothing else can vouch for it). `before` is the
 * host's health, its row locked by the caller.
 */
export async function startChecks(
  tx: Db,
  ctx: Pick<CoordinatorContext, "clock">,
  host: { id: string; name: string; health: Health },
  checks: readonly HealthCheckRow[],
  actor: string,
  why: string,
): Promise<string[]> {
  if (host.health !== "quarantined") await setHostHealth(tx, { hostId: host.id, health: "checking", reason: why, actor });
  const { jobs, problems } = await queueChecks(tx, ctx, host, checks, actor, why);
  if (problems.length > 0) {
    const reason = problems.map((p) => p.message).join("; ");
    await applyVerdict(tx, host.id, host.health === "quarantined" ? "quarantined" : "checking", { health: "quarantined", reason, details: { problems } }, actor);
    await tx`update hosts set check_failed_at = now() where id = ${host.id}`;
  }
  return jobs;
}
