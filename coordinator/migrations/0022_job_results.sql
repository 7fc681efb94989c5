-- Test results of job attempts (docs/results.md, issue #23): job metadata
-- that users query by job, suite and outcome, so it lives here, in tables of
-- its own that the scheduler never reads. Bulk bytes (logs, artifacts) never
-- come here: a case points into the log by byte range instead.

-- Per attempt: the counts (Job.results shows the latest attempt's), whether
-- the host sent its last batch, and whether a case failed on an earlier
-- attempt and passed on this one (Job.flaky).
create table job_results (
  job_id uuid not null references jobs (id) on delete cascade,
  attempt int not null,
  total bigint not null default 0,
  passed bigint not null default 0,
  failed bigint not null default 0,
  skipped bigint not null default 0,
  errored bigint not null default 0,
  -- cases over resultsCasesPerAttempt, not stored
  dropped bigint not null default 0,
  complete boolean not null default false,
  flaky boolean not null default false,
  primary key (job_id, attempt)
);

-- One row per case, in report order (idx from 0 per attempt). outcome is
-- job.proto TestOutcome: 1 pass, 2 fail, 3 skip, 4 error. No foreign key:
-- its per-row check was 40% of a batch insert; a case's attempt always has
-- its job_results row (written first, in the same transaction), whose
-- deletion (with its job) deletes the attempt's cases (the trigger below).
create table job_result_cases (
  job_id uuid not null,
  attempt int not null,
  idx int not null,
  suite text not null,
  name text not null,
  outcome smallint not null check (outcome between 1 and 4),
  duration_us bigint,
  message text not null default '',
  log_channel text,
  log_start bigint,
  log_end bigint,
  flaky boolean not null default false,
  primary key (job_id, attempt, idx)
);
-- ListJobResults by outcome (a page of failures) and by suite, in report order.
create index job_result_cases_outcome on job_result_cases (job_id, attempt, outcome, idx);
create index job_result_cases_suite on job_result_cases (job_id, attempt, suite, idx);

create function treadmill_delete_result_cases() returns trigger language plpgsql as $$
begin
  delete from job_result_cases where job_id = old.job_id and attempt = old.attempt;
  return old;
end $$;
create trigger job_results_delete_cases after delete on job_results
  for each row execute function treadmill_delete_result_cases();

-- The JobResultsReports recorded, so that one re-sent after a reconnect
-- changes nothing.
create table job_result_reports (
  report_id text primary key,
  job_id uuid not null references jobs (id) on delete cascade
);
create index job_result_reports_job on job_result_reports (job_id);
