/**
 * Hold on failure in the job system (JobSpec.hold_on_failure, issue #22):
 * when a job's host reports it HELD (its workload failed and the supervisor
 * kept the host as it is), a lease of kind 'hold' keeps the job's hosts for
 * its owner under the lease policy (its longest duration, the per-user
 * limits, admins exempt, the default keepalive grace), and the job's
 * timeline says which lease and how to attach. A hold the policy or a
 * booking refuses stops the job instead: its supervisor ends the hold and
 * the job ends with its workload's exit, its hosts reset as usual.
 *
 * Runs in the transaction of the report, the job's row locked.
 */
import { type EventInput, recordEvents } from "../db/queries/events.js";
import { holdFacts, ownerLeases } from "../db/queries/hold.js";
import { type Db, type JobStateChange, writeJobStates } from "../db/queries/jobs.js";
import { createHoldLease } from "../db/queries/leases.js";
import { hostHoursOver, humanDuration } from "../leases/policy.js";
import { uuidv7 } from "../shared/common.js";
import type { HoldPolicy } from "./config.js";

/** A job that went HELD: its progress change (the event carries its attempt and owner). */
export interface HeldJob {
  id: string;
  event: EventInput;
}

/** Why the owner's lease policy refuses a hold of `hosts` hosts for `holdMs` from `now`, or undefined. */
export function holdRefusal(
  policy: HoldPolicy,
  owner: { admin: boolean; open: number; spans: { starts_at: Date; ends_at: Date; host_count: number }[] },
  hosts: number,
  now: Date,
  holdMs: number,
): string | undefined {
  if (owner.admin) return undefined;
  if (owner.open >= policy.leaseMaxConcurrentPerUser) return `its owner has ${owner.open} leases open, the most allowed`;
  const span = { starts_at: now, ends_at: new Date(now.getTime() + holdMs), host_count: hosts };
  const over = hostHoursOver(span, owner.spans, policy.leaseMaxHostHoursPerDay);
  if (over) return `it would take its owner's leases to ${over.hours.toFixed(1)} host-hours on ${over.day.toISOString().slice(0, 10)}, more than ${policy.leaseMaxHostHoursPerDay}`;
  return undefined;
}

/** Gives each job that went HELD its hold lease (or stops it, saying why). */
export async function holdJobs(tx: Db, held: HeldJob[], policy: HoldPolicy): Promise<void> {
  const events: EventInput[] = [];
  const stops: JobStateChange[] = [];
  for (const { id, event } of held) {
    const facts = await holdFacts(tx, id, event.attempt);
    if (facts.held || facts.hostIds.length === 0) continue;
    const attach = `attach with "tml console ${id}"`;
    if (facts.leaseId !== null) {
      events.push({ ...event, kind: "lease", message: `hosts held for a post-mortem inside lease ${facts.leaseId}: ${attach}; end the hold with "tml job cancel ${id}"` });
      continue;
    }
    const now = new Date();
    const holdMs = Math.min(facts.holdMs, policy.leaseMaxDurationMs);
    const owner = { admin: facts.ownerIsAdmin, ...(await ownerLeases(tx, event.ownerId!, now, new Date(now.getTime() + holdMs))) };
    let refusal = holdRefusal(policy, owner, facts.hostIds.length, now, holdMs);
    const leaseId = uuidv7();
    const lease =
      refusal === undefined
        ? await createHoldLease(tx, { id: leaseId, ownerId: event.ownerId!, jobId: id, hostIds: facts.hostIds, holdMs, graceMs: policy.leaseGraceDefaultMs })
        : undefined;
    if (lease === undefined) {
      refusal ??= "a booking of its hosts starts now";
      const message = `not held: ${refusal}; resetting its hosts`;
      stops.push({ kind: "stop", id, stopReason: "canceled", event: { ...event, kind: "lease", message } });
      continue;
    }
    events.push({
      ...event,
      kind: "lease",
      message:
        `hosts held for a post-mortem as lease ${lease.id} until ${lease.ends_at.toISOString()}: ${attach}; ` +
        `keep it with "tml lease renew ${lease.id}" (it ends after ${humanDuration(lease.grace_ms)} without one); ` +
        `end the hold with "tml lease release ${lease.id}" or "tml job cancel ${id}"`,
    });
  }
  await writeJobStates(tx, stops);
  await recordEvents(tx, events);
}
