import type { Sql, TransactionSql } from "postgres";
import type { Caller } from "./auth.js";

/**
 * One entry of the audit log (table `audit_events`, migration 0003). Written
 * in the same transaction as the change it records, so the log and the state
 * never disagree. Never put a secret (password, token, credential) in it.
 */
export interface AuditEvent {
  /** Dotted kind: "auth.login", "token.create", "host.update", "job.cancel"... */
  kind: string;
  /** Who did it: see `actorOf` ("user:alice", "host:rpi-3", "service:<id>", "system"). */
  actor?: string;
  jobId?: string;
  hostId?: string;
  /** The user the event is about (the subject, not necessarily the actor). */
  userId?: string;
  /** One human-readable line. */
  message?: string;
  /** Structured extras (JSON object). */
  details?: Record<string, unknown>;
}

/** Appends an event to the audit log; pass the transaction making the change. */
export async function audit(sql: Sql | TransactionSql, event: AuditEvent): Promise<void> {
  await sql`
    insert into audit_events (kind, actor, job_id, host_id, user_id, message, details)
    values (
      ${event.kind},
      ${event.actor ?? ""},
      ${event.jobId ?? null},
      ${event.hostId ?? null},
      ${event.userId ?? null},
      ${event.message ?? ""},
      ${sql.json((event.details ?? {}) as never)}
    )`;
}

/** The `actor` string of a caller: "user:<name>", "host:<name>", "service:<token id>", or "system". */
export function actorOf(caller: Caller | undefined): string {
  if (caller === undefined) return "system";
  switch (caller.kind) {
    case "user":
      return `user:${caller.name}`;
    case "host":
      return `host:${caller.hostName}`;
    case "service":
      return `service:${caller.tokenId}`;
  }
}
