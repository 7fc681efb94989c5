-- 0011_host_health: a host's health (issue #21; host.proto HostHealth),
-- beside what an admin decided (admin_state) and whether its supervisor is
-- attached (attached_replica). Health says whether the host can be trusted
-- with a user's job; health checks and the accounting of infrastructure
-- failures move it. Every change is also a row of host_health_events (the
-- host's health timeline, kept with the host) and an audit event: both are
-- written by db/queries/health.ts's setHostHealth, in the changing
-- transaction. Runs inside the migration transaction: no BEGIN/COMMIT here.

alter table hosts
  add column health text not null default 'unknown'
    check (health in ('unknown', 'checking', 'healthy', 'quarantined', 'retired')),
  -- Why (the failing jobs, the failed check, who retired it); '' when healthy.
  add column health_reason text not null default '' check (length(health_reason) <= 1400),
  add column health_changed_at timestamptz not null default now();

create table host_health_events (
  id bigserial primary key,
  host_id uuid not null references hosts (id) on delete cascade,
  health text not null check (health in ('unknown', 'checking', 'healthy', 'quarantined', 'retired')),
  reason text not null default '' check (length(reason) <= 1400),
  -- Who or what decided: "user:alice", "system" (the accounting), a check's job.
  actor text not null,
  -- The job that decided it (a health job, the last of K failures), if any.
  job_id uuid,
  at timestamptz not null default now()
);
create index host_health_events_host_idx on host_health_events (host_id, at);
