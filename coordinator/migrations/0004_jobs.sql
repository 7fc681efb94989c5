-- 0004_jobs: the job system's columns and tables (DESIGN.md §4, §5, §10):
-- what the scheduler matches on, per-host progress of each attempt, secret
-- parameters, the supervisor stream's bookkeeping on hosts, and replica
-- liveness. Runs inside the migration transaction: no BEGIN/COMMIT here.

-- Jobs. `spec` (0001) keeps the submitted JobSpec as protobuf JSON with every
-- secret value blanked; the secret values live in job_secrets.
alter table jobs
  -- Resolved at submit time from spec.image.
  add column manifest_digest text not null default '',
  -- Layer media types of the image: a host must support all of them.
  add column media_types text[] not null default '{}',
  -- Host requirements, copied out of the spec for the scheduler.
  add column host_count int not null default 1 check (host_count between 1 and 64),
  add column required_tags jsonb not null default '{}' check (jsonb_typeof(required_tags) = 'object'),
  add column required_site text,
  add column required_driver text,
  add column max_restarts int not null default 0 check (max_restarts between 0 and 10),
  add column queue_timeout_ms bigint not null default 86400000 check (queue_timeout_ms > 0),
  add column job_timeout_ms bigint not null default 3600000 check (job_timeout_ms > 0),
  -- SubmitJob's idempotency key, unique per owner (remembered 24 hours).
  add column request_id text,
  -- Last human-readable status (Job.status_message).
  add column status_message text not null default '',
  -- A stop the coordinator asked for and the supervisors have not finished:
  -- 'canceled' (CancelJob) or 'job_timeout' (the sweep). It wins over the
  -- workload's own end when the job is finalized.
  add column stop_reason text check (stop_reason in ('canceled', 'job_timeout')),
  add column stop_requested_at timestamptz,
  -- When the current attempt was assigned, first ran, and must be over.
  add column assigned_at timestamptz,
  add column started_at timestamptz,
  add column deadline_at timestamptz,
  -- Log servers of every attempt, and the proxy of the current one.
  add column log_server_urls text[] not null default '{}',
  add column proxy_url text not null default '';

create unique index jobs_owner_request_id_idx on jobs (owner_id, request_id) where request_id is not null;
create index jobs_owner_active_idx on jobs (owner_id) where state in ('assigned', 'initializing', 'running', 'terminating');
-- The sweep's timeouts.
create index jobs_deadline_idx on jobs (deadline_at) where state in ('assigned', 'initializing', 'running', 'terminating');
create index jobs_id_desc_idx on jobs (id desc);

-- One row per host of each attempt. A row holds a slot of its host from
-- assignment until `released_at`, which is set only once the host's
-- supervisor no longer holds the attempt (it reported its end and was
-- acknowledged, it said it does not hold it, or a StopJob of an attempt it
-- never started was acknowledged). Free capacity is capacity minus the rows
-- not released.
alter table job_hosts
  add column host_index int not null default 0 check (host_index between 0 and 63),
  -- The supervisor acknowledged StartJob or reported the attempt: it holds it.
  add column started boolean not null default false,
  -- The supervisor's last reported state and stage on this host.
  add column state text check (state in ('assigned', 'initializing', 'running', 'terminating')),
  add column stage text check (stage in ('fetching_image', 'allocating', 'provisioning', 'booting')),
  -- The attempt ended on this host: {reason, exitStatus, exitCode, message}.
  add column termination jsonb,
  add column terminated_at timestamptz,
  add column released_at timestamptz;
create index job_hosts_active_idx on job_hosts (host_id) where released_at is null;

-- Timeline entries name the host they came from.
alter table job_events
  add column host_id uuid;

-- Secret parameter values, readable only by the job system to build StartJob.
-- Never returned by any API, never logged; deleted when the job is finalized.
create table job_secrets (
  job_id uuid not null references jobs (id) on delete cascade,
  name text not null,
  value text not null,
  primary key (job_id, name)
);

-- The supervisor stream's bookkeeping. `attach_session` names the newest
-- stream: an older stream whose id is no longer here is superseded.
-- `detached_at` starts the grace period of a detached host's jobs.
alter table hosts
  add column attach_session uuid,
  add column detached_at timestamptz,
  -- The supervisor's own capacity and drain flag (hello, heartbeats).
  add column supervisor_capacity int,
  add column supervisor_draining boolean not null default false;

-- Coordinator replicas alive on this database. A replica heartbeats its row;
-- hosts attached to a replica whose heartbeat is stale count as detached.
create table coordinator_replicas (
  id text primary key,
  started_at timestamptz not null default now(),
  heartbeat_at timestamptz not null default now()
);
