-- 0017_leases: leases (issue #22, LeaseService, docs/leases.md). A lease is a
-- booking of definite hosts over [starts_at, ends_at): requested (no hosts
-- booked yet) -> waiting (booked; before its start or a host still busy) ->
-- active (the hosts are its holder's) -> ended. A lease of kind 'hold' keeps
-- a failed job's hosts for a post-mortem (JobSpec.hold_on_failure).
--
-- Two columns on hosts carry what the scheduler needs without reading
-- leases: lease_id (the active lease holding the host: only that lease's jobs
-- are placed on it) and booked_from (the earliest start of the host's
-- bookings that have not ended: a job outside them is placed on the host only
-- when its timeout ends before it, so bookings are backfilled). Both are
-- written with the lease's rows, under the host row's lock.
-- Runs inside the migration transaction.

create table leases (
  id uuid primary key,
  owner_id uuid not null references users (id) on delete cascade,
  kind text not null default 'reservation' check (kind in ('reservation', 'hold')),
  state text not null default 'requested' check (state in ('requested', 'waiting', 'active', 'ended')),
  end_reason text check (end_reason in ('released', 'expired', 'revoked', 'lost', 'unserved')),
  -- Why it waits; why it ended (a revocation's reason, an unserved lease's).
  status_message text not null default '' check (length(status_message) <= 4096),
  -- The selector (ignored when host_names is not empty).
  host_count int not null check (host_count between 1 and 64),
  required_tags jsonb not null default '{}' check (jsonb_typeof(required_tags) = 'object'),
  required_site text,
  required_driver text,
  host_names text[] not null default '{}',
  -- The session job's image (empty: a bare lease), as asked and resolved.
  image text not null default '',
  manifest_digest text,
  parameters jsonb not null default '[]' check (jsonb_typeof(parameters) = 'array'),
  starts_at timestamptz not null,
  ends_at timestamptz not null,
  deadline_at timestamptz,
  grace_ms int not null check (grace_ms > 0),
  keepalive_at timestamptz not null default now(),
  -- For a hold: the failed job whose hosts it keeps.
  held_job_id uuid references jobs (id) on delete set null,
  description text not null default '' check (length(description) <= 1000),
  request_id text,
  revoked_by uuid references users (id) on delete set null,
  created_at timestamptz not null default now(),
  activated_at timestamptz,
  ended_at timestamptz,
  check (ends_at > starts_at),
  check ((state = 'ended') = (end_reason is not null)),
  check ((state = 'ended') = (ended_at is not null))
);
create unique index leases_request_id_idx on leases (owner_id, request_id) where request_id is not null;
create index leases_owner_idx on leases (owner_id, created_at desc);
-- What the lease keeper sweeps: every lease not ended.
create index leases_open_idx on leases (state) where state <> 'ended';

-- The booked hosts of a lease; ends_at follows the lease's (ExtendLease).
-- Overlap between bookings of one host is refused under the host row's lock.
create table lease_hosts (
  lease_id uuid not null references leases (id) on delete cascade,
  host_id uuid not null references hosts (id) on delete cascade,
  host_index int not null check (host_index between 0 and 63),
  starts_at timestamptz not null,
  ends_at timestamptz not null,
  -- False once the lease has ended: the calendar keeps the row.
  open boolean not null default true,
  primary key (lease_id, host_id)
);
create index lease_hosts_host_idx on lease_hosts (host_id, starts_at) where open;

-- A lease's timeline, as job_events is a job's.
create table lease_events (
  lease_id uuid not null references leases (id) on delete cascade,
  seq bigserial,
  time timestamptz not null default now(),
  kind text not null,
  state text not null,
  message text not null default '' check (length(message) <= 4096),
  host_id uuid,
  primary key (lease_id, seq)
);

alter table hosts add column lease_id uuid references leases (id) on delete set null;
alter table hosts add column booked_from timestamptz;

-- Jobs inside a lease (JobSpec.lease_id) and the hold a failed job asks for.
alter table jobs add column lease_id uuid references leases (id) on delete set null;
alter table jobs add column hold_on_failure_ms int check (hold_on_failure_ms is null or hold_on_failure_ms > 0);
create index jobs_lease_queued_idx on jobs (lease_id, queued_at) where lease_id is not null and state = 'queued';
