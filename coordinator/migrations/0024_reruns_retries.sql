-- 0024_reruns_retries: re-runs and retries (issue #23, items 4 and 5).
-- A re-run (JobService.RerunJob) is a new job that names the job it re-runs;
-- the old job's re-runs are found through the index. The retry policy
-- (JobSpec.retry) is kept in columns the end of an attempt reads under the
-- job's row lock: its conditions, its budget per condition, the retries used
-- so far per condition, and, for other_host, the hosts earlier attempts ran
-- on (the scheduler does not place a retry there). Secret values
-- (job_secrets) now stay with a finalized job for its owner's re-runs, until
-- the sweep deletes them (the coordinator's rerunSecretsMs after the job's
-- end). Runs inside the migration transaction.

alter table jobs
  add column rerun_of_job_id uuid references jobs (id) on delete set null,
  add column retry_on text[] not null default '{}',
  add column retry_max int not null default 0,
  add column retry_other_host boolean not null default false,
  add column retries jsonb not null default '{}',
  add column avoid_host_ids uuid[] not null default '{}';

create index jobs_rerun_of_idx on jobs (rerun_of_job_id) where rerun_of_job_id is not null;
