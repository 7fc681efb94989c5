-- 0014_host_controls: JobService.ControlHost operations (issue #21): power
-- off, power on, power-cycle or reset one host of a running job. ControlHost
-- inserts a control PENDING and notifies 'treadmill_controls' with the host
-- id; the replica holding that host's stream sends ControlHostCommand; the
-- supervisor's HostControlResult ends it DONE or FAILED (a host that went
-- away ends it FAILED). Runs inside the migration transaction.

create table host_controls (
  id uuid primary key,
  job_id uuid not null references jobs (id) on delete cascade,
  attempt int not null check (attempt >= 1),
  host_id uuid not null references hosts (id) on delete cascade,
  host_index int not null check (host_index between 0 and 63),
  action text not null check (action in ('power-off', 'power-on', 'power-cycle', 'reset')),
  -- Who asked (the job's owner or an admin).
  requested_by uuid not null references users (id),
  -- ControlHost's idempotency key, unique per requester.
  request_id text,
  state text not null default 'pending' check (state in ('pending', 'done', 'failed')),
  -- When failed: the gRPC code number the caller gets.
  error_code int not null default 0,
  -- The supervisor's line when done, why when failed.
  message text not null default '' check (length(message) <= 4096),
  created_at timestamptz not null default now(),
  finished_at timestamptz,
  check ((state = 'pending') = (finished_at is null))
);
create unique index host_controls_request_id_idx on host_controls (requested_by, request_id) where request_id is not null;
-- What a stream delivers: the pending controls of its host.
create index host_controls_pending_host_idx on host_controls (host_id) where state = 'pending';
create index host_controls_job_id_idx on host_controls (job_id);
