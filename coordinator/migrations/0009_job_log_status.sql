-- 0009_job_log_status: the state of each job's log as its hosts ship it
-- (job.proto LogStatus; DESIGN.md §7). A host's supervisor reports, per
-- attempt, whether its part of the log is still SHIPPING from its spill,
-- COMPLETE on every log server, or INCOMPLETE (bytes lost); the jobs row
-- carries the summary over every host and attempt. The log status is
-- metadata of the log, not the job's state: it may change after the job is
-- finalized. Runs inside the migration transaction: no BEGIN/COMMIT here.

create table job_log_parts (
  job_id uuid not null references jobs (id) on delete cascade,
  attempt int not null check (attempt >= 1),
  host_id uuid not null,
  status text not null check (status in ('shipping', 'complete', 'incomplete')),
  bytes_lost bigint not null default 0 check (bytes_lost >= 0),
  -- Why, naming the host ("spill cap reached on host sup-1"); '' when complete.
  message text not null default '' check (length(message) <= 1400),
  -- The supervisor's revision of the report (JobLogReport.revision): older
  -- ones are ignored, so a report repeated after a reconnect changes nothing.
  revision bigint not null,
  updated_at timestamptz not null default now(),
  primary key (job_id, attempt, host_id)
);

-- The summary (Job.log_status, log_bytes_lost, log_status_message): null
-- until a host reports.
alter table jobs
  add column log_status text check (log_status in ('shipping', 'complete', 'incomplete')),
  add column log_bytes_lost bigint not null default 0,
  add column log_status_message text not null default '';
