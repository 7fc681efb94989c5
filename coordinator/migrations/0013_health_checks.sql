-- 0013_health_checks: health checks and the accounting that moves a host's
-- health (issue #21, docs/health.md; the health itself is 0011's). A check
-- runs as an ordinary job pinned to its host (jobs.pinned_host_id) and marked
-- with its check (jobs.health_check_id); neither column is a foreign key, so
-- that a job keeps its mark after its check or host is gone. Runs inside the
-- migration transaction: no BEGIN/COMMIT here.

create table health_checks (
  id uuid primary key,
  name text not null unique check (length(name) between 1 and 63),
  -- As the admin gave it (name:tag or a digest), resolved when a job is queued.
  image text not null check (length(image) between 1 and 400),
  -- Non-secret parameters, as protobuf JSON ([{name, value}]).
  parameters jsonb not null default '[]' check (jsonb_typeof(parameters) = 'array'),
  timeout_ms bigint not null check (timeout_ms > 0),
  -- The selector: a host's tags plus site=<site> include these, and its driver.
  host_tags jsonb not null default '{}' check (jsonb_typeof(host_tags) = 'object'),
  driver_kind text check (driver_kind in ('process', 'board', 'qemu')),
  -- The schedule (null: none) and "after every N user jobs" (0: never).
  interval_ms bigint check (interval_ms is null or interval_ms >= 1000),
  every_jobs int not null default 0 check (every_jobs >= 0),
  -- K: infrastructure failures in a row that quarantine a host.
  quarantine_after int not null default 3 check (quarantine_after between 1 and 100),
  return_needs_admin boolean not null default false,
  description text not null default '' check (length(description) <= 256),
  -- The admin whose jobs its health jobs are.
  owner_id uuid not null references users (id),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

alter table jobs
  add column health_check_id uuid,
  add column pinned_host_id uuid;
-- A pass's read of the health jobs waiting for their hosts.
create index jobs_pinned_queued_idx on jobs (pinned_host_id) where state = 'queued' and pinned_host_id is not null;
-- A host's health jobs (the schedule's "last run", unfinished checks).
create index jobs_pinned_host_idx on jobs (pinned_host_id, health_check_id, created_at) where pinned_host_id is not null;

-- The accounting of each host, written with its health (queries/health-checks.ts).
alter table hosts
  -- User jobs that ended here in a row for an infrastructure reason, and which.
  add column infra_failures int not null default 0,
  add column infra_failed_jobs uuid[] not null default '{}',
  -- User jobs that ended here since its last check was queued ("after every N jobs").
  add column jobs_since_check int not null default 0,
  -- A quarantined host's failed retries of its checks so far, and since when
  -- it waits for the next (null: it waits for none). The next retry is due
  -- check_failed_at + min(max, initial * 2^check_retries) (the keeper's
  -- settings healthRetryInitialMs, healthRetryMaxMs).
  add column check_retries int not null default 0,
  add column check_failed_at timestamptz;

-- The scheduler places user jobs only on healthy hosts and unknown ones (a
-- host a check applies to is never left unknown): 0012's indexes of free
-- hosts again, with the health in their predicate as hosts.ts's
-- `hasFreeSlot` writes it, so a pass never walks quarantined or checking
-- hosts.
drop index hosts_free_idx;
drop index hosts_free_shared_idx;
create index hosts_free_idx on hosts (name)
  where attached_replica is not null and admin_state = 'enabled' and not supervisor_draining and health in ('healthy', 'unknown')
    and held_slots < least(capacity, coalesce(supervisor_capacity, capacity));
create index hosts_free_shared_idx on hosts (name)
  where attached_replica is not null and admin_state = 'enabled' and not supervisor_draining and health in ('healthy', 'unknown')
    and held_slots < least(capacity, coalesce(supervisor_capacity, capacity))
    and least(capacity, coalesce(supervisor_capacity, capacity)) > 1;
