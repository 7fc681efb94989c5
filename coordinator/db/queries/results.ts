/**
 * Test results (migration 0022, docs/results.md): every statement that
 * writes or reads job_results, job_result_cases and job_result_reports.
 * A batch of cases is one multi-row insert over arrays (unnest), so a
 * report of thousands of cases is a handful of statements.
 */
import type { Sql, TransactionSql } from "postgres";

type Db = Sql | TransactionSql;

/** A case to store; outcome is job.proto TestOutcome (1 pass, 2 fail, 3 skip, 4 error). */
export interface CaseInput {
  suite: string;
  name: string;
  outcome: number;
  durationUs: number | null;
  message: string;
  logChannel: string | null;
  logStart: number | null;
  logEnd: number | null;
}

/** A case as stored. */
export interface CaseRow {
  attempt: number;
  idx: number;
  suite: string;
  name: string;
  outcome: number;
  duration_us: string | null;
  message: string;
  log_channel: string | null;
  log_start: string | null;
  log_end: string | null;
  flaky: boolean;
}

export interface CountsRow {
  attempt: number;
  total: string;
  passed: string;
  failed: string;
  skipped: string;
  errored: string;
  dropped: string;
  complete: boolean;
  flaky: boolean;
}

/**
 * One statement at a batch's start: whether the attempt ran on the host
 * (undefined: it did not, or the job is gone), whether the report id is new
 * (recorded now; false: a repeat), and for a new one the attempt's counts
 * row, created empty when missing and locked for the batch (an upsert's
 * no-op update locks and returns it).
 */
export async function claimBatch(
  tx: Db,
  b: { reportId: string; jobId: string; attempt: number; hostId: string },
): Promise<{ owner_id: string; state: string; counts: CountsRow | undefined } | undefined> {
  const [row] = await tx<(Partial<CountsRow> & { owner_id: string; state: string; claimed: boolean })[]>`
    with ran as (
      select j.owner_id, j.state from jobs j join job_hosts jh on jh.job_id = j.id
      where j.id = ${b.jobId} and jh.attempt = ${b.attempt} and jh.host_id = ${b.hostId} limit 1),
    claimed as (
      insert into job_result_reports (report_id, job_id) select ${b.reportId}, ${b.jobId} from ran
      on conflict do nothing returning 1),
    counts as (
      insert into job_results (job_id, attempt) select ${b.jobId}, ${b.attempt} from claimed
      on conflict (job_id, attempt) do update set job_id = excluded.job_id
      returning attempt, total, passed, failed, skipped, errored, dropped, complete, flaky)
    select ran.owner_id, ran.state, counts.* , exists (select 1 from claimed) as claimed from ran left join counts on true`;
  if (!row) return undefined;
  const { owner_id, state, claimed, ...counts } = row;
  return { owner_id, state, counts: claimed ? (counts as CountsRow) : undefined };
}

/** What a batch adds to its attempt's counts. */
export interface BatchCounts {
  total: number;
  passed: number;
  failed: number;
  skipped: number;
  errored: number;
  dropped: number;
  complete: boolean;
}

/**
 * Stores a batch: its cases from index `first` on, the attempt's counts,
 * and a 'treadmill_jobs' notification, in one statement; on an attempt
 * after the first, the passing cases that failed on an earlier attempt
 * are marked flaky (and the attempt with them). Returns how many were.
 */
export async function storeBatch(tx: Db, jobId: string, attempt: number, first: number, cases: CaseInput[], add: BatchCounts): Promise<number> {
  const col = <T>(f: (c: CaseInput) => T) => cases.map(f);
  const insert = tx`
    insert into job_result_cases (job_id, attempt, idx, suite, name, outcome, duration_us, message, log_channel, log_start, log_end)
    select ${jobId}, ${attempt}, ${first} + n - 1, suite, name, outcome, duration_us, message, log_channel, log_start, log_end
    from unnest(${col((c) => c.suite)}::text[], ${col((c) => c.name)}::text[], ${col((c) => c.outcome)}::smallint[],
                ${col((c) => c.durationUs)}::bigint[], ${col((c) => c.message)}::text[], ${col((c) => c.logChannel)}::text[],
                ${col((c) => c.logStart)}::bigint[], ${col((c) => c.logEnd)}::bigint[])
      with ordinality as u(suite, name, outcome, duration_us, message, log_channel, log_start, log_end, n)`;
  const counts = (flaky: boolean) => tx`
    update job_results set total = total + ${add.total}, passed = passed + ${add.passed}, failed = failed + ${add.failed},
      skipped = skipped + ${add.skipped}, errored = errored + ${add.errored}, dropped = dropped + ${add.dropped},
      complete = complete or ${add.complete}, flaky = flaky or ${flaky}
    where job_id = ${jobId} and attempt = ${attempt}`;
  const mayBeFlaky = attempt > 1 && cases.some((c) => c.outcome === 1);
  if (!mayBeFlaky) {
    await tx`with ins as (${cases.length > 0 ? insert : tx`select 1`}), upd as (${counts(false)}) select pg_notify('treadmill_jobs', ${jobId})`;
    return 0;
  }
  await insert;
  const flaky = await tx`
    update job_result_cases c set flaky = true
    where c.job_id = ${jobId} and c.attempt = ${attempt} and c.idx >= ${first} and c.idx < ${first + cases.length} and c.outcome = 1
      and exists (select 1 from job_result_cases p
                  where p.job_id = c.job_id and p.attempt < c.attempt and p.outcome in (2, 4) and p.suite = c.suite and p.name = c.name)`;
  await tx`with upd as (${counts(flaky.count > 0)}) select pg_notify('treadmill_jobs', ${jobId})`;
  return flaky.count;
}

/** The counts of one attempt, or of the latest attempt with results (attempt 0). */
export async function countsOf(sql: Db, jobId: string, attempt: number): Promise<CountsRow | undefined> {
  const [row] = await sql<CountsRow[]>`
    select attempt, total, passed, failed, skipped, errored, dropped, complete, flaky from job_results
    where job_id = ${jobId} ${attempt > 0 ? sql`and attempt = ${attempt}` : sql``}
    order by attempt desc limit 1`;
  return row;
}

export interface CaseFilter {
  suite: string;
  outcomes: number[];
  nameContains: string;
}

/**
 * A page of an attempt's cases in report order, after index `after`. With
 * outcomes, one index range per outcome (job_result_cases_outcome, in idx
 * order), each cut to the page, merged: `outcome = any(...)` would read
 * every case of those outcomes to sort them, thousands of failures with
 * their messages for one page.
 */
export function listCases(sql: Db, jobId: string, attempt: number, f: CaseFilter, after: number, limit: number): Promise<CaseRow[]> {
  const like = `%${f.nameContains.replace(/[\\%_]/g, (c) => `\\${c}`)}%`;
  const where = (outcome: number | undefined) => sql`
    job_id = ${jobId} and attempt = ${attempt} and idx > ${after}
    ${outcome !== undefined ? sql`and outcome = ${outcome}` : sql``}
    ${f.suite !== "" ? sql`and suite = ${f.suite}` : sql``}
    ${f.nameContains !== "" ? sql`and name ilike ${like}` : sql``}`;
  const columns = sql`attempt, idx, suite, name, outcome, duration_us, message, log_channel, log_start, log_end, flaky`;
  if (f.outcomes.length === 0) return sql<CaseRow[]>`select ${columns} from job_result_cases where ${where(undefined)} order by idx limit ${limit}`;
  const parts = [...new Set(f.outcomes)].map((o) => sql`(select ${columns} from job_result_cases where ${where(o)} order by idx limit ${limit})`);
  const union = parts.reduce((all, part) => sql`${all} union all ${part}`);
  return sql<CaseRow[]>`select * from (${union}) page order by idx limit ${limit}`;
}

/**
 * The last finalized job before `jobId` of the same owner whose labels,
 * without the `ignored` ones, are exactly `series`, and that has results.
 */
export async function seriesBase(sql: Db, job: { id: string; owner_id: string }, series: Record<string, string>, ignored: readonly string[]): Promise<string | undefined> {
  const [row] = await sql<{ id: string }[]>`
    select j.id from jobs j
    where j.owner_id = ${job.owner_id} and j.id < ${job.id} and j.state = 'finalized'
      and (coalesce(j.spec -> 'tags', '{}'::jsonb) - ${[...ignored]}::text[]) = ${sql.json(series)}::jsonb
      and exists (select 1 from job_results r where r.job_id = j.id and r.total > 0)
    order by j.id desc limit 1`;
  return row?.id;
}

export type ChangeKind = "newly_failing" | "newly_passing" | "still_failing";

export interface ChangeRow extends CaseRow {
  kind: ChangeKind;
  base_outcome: number | null;
  count: string;
}

/**
 * The cases of (jobId, attempt) against (baseId, baseAttempt), matched by
 * suite and name: each kind's first `limit` cases in report order, each row
 * with its kind's full count. A case the job no longer has but the base
 * failed is not listed (it neither fails nor passes now).
 */
export function compareCases(sql: Db, jobId: string, attempt: number, baseId: string, baseAttempt: number, limit: number): Promise<ChangeRow[]> {
  return sql<ChangeRow[]>`
    with base as (
      select suite, name, bool_or(outcome in (2, 4)) as failed,
             (array_agg(outcome order by (outcome in (2, 4)) desc, idx))[1] as outcome
      from job_result_cases where job_id = ${baseId} and attempt = ${baseAttempt}
      group by suite, name),
    classified as (
      select c.*, b.outcome as base_outcome,
        case when c.outcome in (2, 4) and coalesce(b.failed, false) then 'still_failing'
             when c.outcome in (2, 4) then 'newly_failing'
             when c.outcome = 1 and b.failed then 'newly_passing' end as kind
      from job_result_cases c left join base b on b.suite = c.suite and b.name = c.name
      where c.job_id = ${jobId} and c.attempt = ${attempt}),
    ranked as (
      select *, count(*) over (partition by kind) as count, row_number() over (partition by kind order by idx) as rn
      from classified where kind is not null)
    select kind, base_outcome, count, attempt, idx, suite, name, outcome, duration_us, message, log_channel, log_start, log_end, flaky
    from ranked where rn <= ${limit} order by kind, idx`;
}
