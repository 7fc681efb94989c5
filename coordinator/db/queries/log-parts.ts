/**
 * The state of jobs' logs (table `job_log_parts`, and the summary columns
 * `log_status`, `log_bytes_lost`, `log_status_message` of `jobs`): the
 * statements of coordinator/jobs/log-status.ts, its only writer, from the
 * supervisors' JobLogReport and LogTokenRequest. A part is one host's share
 * of an attempt's log, the newest revision winning; the job's row carries
 * the summary over every part. The job's state is never written here.
 */
import type { Sql, TransactionSql } from "postgres";
import type { DbState } from "./jobs.js";

type Db = Sql | TransactionSql;

export type PartStatus = "shipping" | "complete" | "incomplete";

/** An attempt on a host: whose part of the log. */
export interface PartOf {
  jobId: string;
  attempt: number;
  hostId: string;
}

/** The job of an attempt that ran on the host, its row locked; undefined when none did. */
export async function lockJobOfPart(tx: Db, at: PartOf): Promise<{ state: DbState; owner_id: string } | undefined> {
  const [job] = await tx<{ state: DbState; owner_id: string }[]>`
    select j.state, j.owner_id from jobs j
    where j.id = ${at.jobId}
      and exists (select 1 from job_hosts jh where jh.job_id = j.id and jh.attempt = ${at.attempt} and jh.host_id = ${at.hostId})
    for no key update of j`;
  return job;
}

/** A part as recorded (sizes and revision as decimal text). */
export interface LogPartRow {
  status: PartStatus;
  bytes_lost: string;
  revision: string;
}

export async function logPart(tx: Db, at: PartOf): Promise<LogPartRow | undefined> {
  const [part] = await tx<LogPartRow[]>`
    select status, bytes_lost, revision from job_log_parts
    where job_id = ${at.jobId} and attempt = ${at.attempt} and host_id = ${at.hostId}`;
  return part;
}

/** Writes a part (the caller has checked that its revision is newer). */
export async function writeLogPart(tx: Db, at: PartOf, part: { status: PartStatus; bytesLost: bigint; message: string; revision: bigint }): Promise<void> {
  await tx`
    insert into job_log_parts (job_id, attempt, host_id, status, bytes_lost, message, revision)
    values (${at.jobId}, ${at.attempt}, ${at.hostId}, ${part.status}, ${part.bytesLost.toString()}, ${part.message},
      ${part.revision.toString()})
    on conflict (job_id, attempt, host_id) do update
      set status = excluded.status, bytes_lost = excluded.bytes_lost, message = excluded.message,
        revision = excluded.revision, updated_at = now()`;
}

/** The job's log summary as written. */
export interface LogSummary {
  log_status: PartStatus;
  log_bytes_lost: string;
  log_status_message: string;
}

/**
 * Writes the job's summary over its parts: INCOMPLETE if any lost bytes,
 * else SHIPPING while any ships, else COMPLETE; the bytes lost summed; the
 * message of the worst, newest part that is not complete.
 */
export async function summarizeLogParts(tx: Db, jobId: string): Promise<LogSummary | undefined> {
  const [summary] = await tx<LogSummary[]>`
    update jobs j set log_status = s.status, log_bytes_lost = s.lost, log_status_message = s.message, updated_at = now()
    from (
      select
        case when bool_or(status = 'incomplete') then 'incomplete'
             when bool_or(status = 'shipping') then 'shipping'
             else 'complete' end as status,
        sum(bytes_lost)::bigint as lost,
        coalesce((array_agg(message order by status = 'incomplete' desc, status = 'shipping' desc, updated_at desc)
                  filter (where status <> 'complete'))[1], '') as message
      from job_log_parts where job_id = ${jobId}) s
    where j.id = ${jobId}
    returning j.log_status, j.log_bytes_lost, j.log_status_message`;
  return summary;
}

/** Tells the job's watchers it changed ('treadmill_jobs'), for a change that records no event. */
export async function notifyJobChanged(tx: Db, jobId: string): Promise<void> {
  await tx`select pg_notify('treadmill_jobs', ${jobId})`;
}

/** A job's log servers and whether the attempt ran on the host (a LogTokenRequest's check); undefined for no such job. */
export async function logTokenCheck(sql: Db, at: PartOf): Promise<{ log_server_urls: string[]; ran: boolean } | undefined> {
  const [job] = await sql<{ log_server_urls: string[]; ran: boolean }[]>`
    select j.log_server_urls,
      exists (select 1 from job_hosts jh where jh.job_id = j.id and jh.attempt = ${at.attempt} and jh.host_id = ${at.hostId}) as ran
    from jobs j where j.id = ${at.jobId}`;
  return job;
}
