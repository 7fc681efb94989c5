/**
 * Host control operations (table `host_controls`, migration 0014): the
 * statements of coordinator/jobs/host-control.ts, their only writer.
 * ControlHost inserts a control PENDING; the supervisor's HostControlResult,
 * or its host going away, ends it. 'treadmill_controls' (payload a host id)
 * tells the replica holding that host's stream to send ControlHostCommand.
 */
import type { Sql, TransactionSql } from "postgres";

type Db = Sql | TransactionSql;

export type HostActionName = "power-off" | "power-on" | "power-cycle" | "reset";

export interface ControlRow {
  id: string;
  job_id: string;
  attempt: number;
  host_id: string;
  host_index: number;
  action: HostActionName;
  requested_by: string;
  request_id: string | null;
  state: "pending" | "done" | "failed";
  error_code: number;
  message: string;
  created_at: Date;
  finished_at: Date | null;
}

/** A control with its host's name, its job's owner, and whether its attempt still runs. */
export type ControlView = ControlRow & { host_name: string; owner_id: string; attempt_running: boolean };

export async function control(sql: Db, id: string, options: { lock?: boolean } = {}): Promise<ControlView | undefined> {
  const [row] = await sql<ControlView[]>`
    select c.*, h.name as host_name, j.owner_id,
      (j.attempt = c.attempt and j.state in ('running', 'terminating')) as attempt_running
    from host_controls c
    join hosts h on h.id = c.host_id join jobs j on j.id = c.job_id
    where c.id = ${id} ${options.lock ? sql`for update of c` : sql``}`;
  return row;
}

export async function controlOfRequest(sql: Db, userId: string, requestId: string): Promise<ControlRow | undefined> {
  const [row] = await sql<ControlRow[]>`select * from host_controls where requested_by = ${userId} and request_id = ${requestId}`;
  return row;
}

/** The host of index `index` of the job's current attempt, and whether its supervisor is attached. */
export async function jobHostAt(
  sql: Db,
  jobId: string,
  attempt: number,
  index: number,
): Promise<{ id: string; name: string; driver_kind: string; online: boolean } | undefined> {
  const [host] = await sql<{ id: string; name: string; driver_kind: string; online: boolean }[]>`
    select h.id, h.name, h.driver_kind, h.attach_session is not null as online
    from job_hosts jh join hosts h on h.id = jh.host_id
    where jh.job_id = ${jobId} and jh.attempt = ${attempt} and jh.host_index = ${index}`;
  return host;
}

export async function insertControl(
  sql: Db,
  c: { id: string; jobId: string; attempt: number; hostId: string; hostIndex: number; action: HostActionName; requestedBy: string; requestId: string | null },
): Promise<void> {
  await sql`
    insert into host_controls (id, job_id, attempt, host_id, host_index, action, requested_by, request_id)
    values (${c.id}, ${c.jobId}, ${c.attempt}, ${c.hostId}, ${c.hostIndex}, ${c.action}, ${c.requestedBy}, ${c.requestId})`;
}

/** Ends a pending control (the row locked by the caller). */
export async function endControl(sql: Db, id: string, end: { ok: boolean; errorCode: number; message: string }): Promise<void> {
  await sql`
    update host_controls set state = ${end.ok ? "done" : "failed"}, error_code = ${end.errorCode}, message = ${end.message}, finished_at = now()
    where id = ${id} and state = 'pending'`;
}

/** The pending controls of a host whose attempts still run, oldest first. */
export async function pendingControlsOfHost(sql: Db, hostId: string): Promise<ControlRow[]> {
  return sql<ControlRow[]>`
    select c.* from host_controls c join jobs j on j.id = c.job_id
    where c.host_id = ${hostId} and c.state = 'pending' and j.attempt = c.attempt and j.state in ('running', 'terminating')
    order by c.created_at, c.id`;
}

/** Wakes the replica holding `hostId`'s stream to send its pending controls. */
export async function notifyControls(sql: Db, hostId: string): Promise<void> {
  await sql`select pg_notify('treadmill_controls', ${hostId})`;
}

/** Whether the host's supervisor is attached now. */
export async function hostOnline(sql: Db, hostId: string): Promise<boolean> {
  const [row] = await sql<{ online: boolean }[]>`select attach_session is not null as online from hosts where id = ${hostId}`;
  return row?.online ?? false;
}
