/**
 * The audit log (table `audit_events`, migration 0003): every statement that
 * writes it. An entry is written in the same transaction as the change it
 * records, so the log and the state never disagree; never put a secret
 * (password, token, credential) in it.
 */
import type { Fragment, Sql, TransactionSql } from "postgres";

type Db = Sql | TransactionSql;

/** One entry of the audit log. */
export interface AuditEvent {
  /** Dotted kind: "auth.login", "token.create", "host.update", "job.cancel"... */
  kind: string;
  /** Who did it: see `actorOf` in coordinator/audit.ts ("user:alice", "host:rpi-3", "service:<id>", "system"). */
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
export async function audit(sql: Db, event: AuditEvent): Promise<void> {
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

/**
 * The insert of the audit twins (kind `job.<kind>`) of timeline events, as
 * the body of a CTE over `rows`, a relation with the columns of
 * events.ts's `eventWrites` (i, job, kind, message, host, actor, owner,
 * details), in `i` order.
 */
export function jobEventAudit(sql: Db, rows: Fragment): Fragment {
  return sql`
    insert into audit_events (kind, actor, job_id, host_id, user_id, message, details)
    select 'job.' || kind, actor, job, host, owner, message, details from ${rows} order by i`;
}

/** A command sent on a supervisor stream (StartJob, StopJob), never with its secrets or tokens. */
export interface SentCommand {
  kind: string;
  job: string;
  host: string;
  message: string;
  request: string;
  attempt: number;
}

/** Records commands sent by this replica (`replica`), in one statement. */
export async function auditCommandsSent(sql: Db, rows: SentCommand[], replica: string): Promise<void> {
  await sql`
    insert into audit_events (kind, actor, job_id, host_id, message, details)
    select v.kind, 'system', v.job, v.host, v.message,
      jsonb_build_object('requestId', v.request, 'attempt', v.attempt, 'replica', ${replica}::text)
    from jsonb_to_recordset(${sql.json(rows as never)}::jsonb)
      as v(kind text, job uuid, host uuid, message text, request text, attempt int)`;
}
