/**
 * A host's health (migration 0011; host.proto HostHealth): the one statement
 * that changes it, so that the host row, its health timeline
 * (host_health_events) and the audit log never disagree.
 */
import type { Sql, TransactionSql } from "postgres";
import { audit } from "./audit.js";

type Db = Sql | TransactionSql;

export type Health = "unknown" | "checking" | "healthy" | "quarantined" | "retired";

export interface HealthChange {
  hostId: string;
  health: Health;
  /** Why: the failed check, the failing jobs, who retired it; '' when healthy. */
  reason: string;
  /** Who or what decided (coordinator/audit.ts actorOf, or "system"). */
  actor: string;
  /** The job that decided it, if one did. */
  jobId?: string;
  /** Extras for the audit event (the failing jobs, the check). */
  details?: Record<string, unknown>;
}

/**
 * Sets the host's health if it differs (a repeated change records nothing)
 * and records the change on its timeline and in the audit log, in the
 * caller's transaction; returns the previous health, undefined when nothing
 * changed or the host is gone.
 */
export async function setHostHealth(tx: Db, c: HealthChange): Promise<Health | undefined> {
  const [row] = await tx<{ previous: Health }[]>`
    with old as (select id, health from hosts where id = ${c.hostId} for update),
    changed as (
      update hosts h set health = ${c.health}, health_reason = ${c.reason}, health_changed_at = now()
      from old where h.id = old.id and old.health <> ${c.health}
      returning h.id, old.health as previous),
    timeline as (
      insert into host_health_events (host_id, health, reason, actor, job_id)
      select id, ${c.health}, ${c.reason}, ${c.actor}, ${c.jobId ?? null} from changed)
    select previous, pg_notify('treadmill_hosts', id::text), pg_notify('treadmill_schedule', '') from changed`;
  if (!row) return undefined;
  await audit(tx, {
    kind: "host.health",
    actor: c.actor,
    hostId: c.hostId,
    jobId: c.jobId,
    message: `health ${row.previous} -> ${c.health}${c.reason ? `: ${c.reason}` : ""}`,
    details: { from: row.previous, to: c.health, ...c.details },
  });
  return row.previous;
}
