-- 0025_event_feed: the event feed (issue #24 item 1, docs/events.md): every
-- change a user may see, in one ordered, resumable feed read by cursor.
--
-- Order without gaps. A bigserial alone is no cursor: ids are taken when a
-- row is written, not when its transaction commits, so a reader that has
-- seen id 61 may later find id 60 committed by a transaction that was still
-- running (the classic commit-order gap). Here a row carries the id of the
-- transaction that wrote it (xid, pg_current_xact_id()) and the feed is
-- ordered by (xid, id); a reader returns only rows whose xid is below the
-- xmin of its statement's snapshot (pg_snapshot_xmin(pg_current_snapshot())):
-- every transaction below that xmin has ended, so every row such a
-- transaction wrote is already visible, and any row committed later belongs
-- to a transaction whose xid is at least that xmin, so sorts after
-- everything returned. The cursor is the pair, written "xid-id". This is
-- PgQ's snapshot rule (Skytools), chosen over a sequencer that stamps
-- cursors after commit: no second write per event, no elected process, and
-- every replica's readers compute the same view from the database alone.
-- Its cost: a long transaction anywhere on the server holds delivery back
-- for its length (nothing is lost, delivery waits), so no coordinator
-- transaction stays open long.
--
-- Who writes. Job state and stage, host health and lease state are written
-- by triggers (below), because the coordinator changes them in many places
-- and in sets (the scheduler's assignment, writeJobStates): a trigger sees
-- every path, and its WHEN clause keeps it off every other update. Other
-- kinds (job.results, job.artifacts) are written by recordFeedEvent
-- (db/queries/feed.ts) in the changing transaction. Each writing transaction
-- notifies 'treadmill_feed' (PostgreSQL sends one per transaction, at
-- commit): the readers of every replica wake and read by cursor.
--
-- Retention: the feed sweep deletes a prefix of the feed (every event up to
-- the newest one older than the retention) and records that position in
-- feed_horizon; a cursor before it is expired (OUT_OF_RANGE). Runs inside
-- the migration transaction.

create table feed_events (
  xid xid8 not null default pg_current_xact_id(),
  id bigint generated always as identity,
  -- When it was written (clock time, not the transaction's start).
  at timestamptz not null default clock_timestamp(),
  kind text not null check (kind ~ '^[a-z]+\.[a-z_]+$'),
  job_id uuid,
  host_id uuid,
  lease_id uuid,
  -- Who may see it: its owner (owner_id) and admins; every user; admins only.
  audience text not null check (audience in ('owner', 'users', 'admins')),
  owner_id uuid,
  -- The job's labels (JobSpec.tags) when it was written, for filters.
  labels jsonb not null default '{}' check (jsonb_typeof(labels) = 'object'),
  -- The versioned body ("schema": "treadmill.event.v1"), docs/events.md.
  payload jsonb not null check (jsonb_typeof(payload) = 'object'),
  primary key (xid, id),
  check (audience <> 'owner' or owner_id is not null)
);
create index feed_events_at_idx on feed_events (at);

-- The newest position the sweep deleted: events up to it are gone.
create table feed_horizon (
  only_row boolean primary key default true check (only_row),
  xid xid8 not null,
  id bigint not null
);
insert into feed_horizon (xid, id) values ('0', 0);

create function treadmill_feed_job() returns trigger language plpgsql as $$
declare
  kind text := 'job.state';
begin
  if tg_op = 'UPDATE' and new.state is not distinct from old.state then
    kind := 'job.stage';
  end if;
  insert into feed_events (kind, job_id, lease_id, audience, owner_id, labels, payload)
  values (kind, new.id, new.lease_id, 'owner', new.owner_id, coalesce(new.spec->'tags', '{}'), jsonb_build_object(
    'schema', 'treadmill.event.v1', 'kind', kind, 'job_id', new.id, 'lease_id', new.lease_id, 'attempt', new.attempt,
    'state', new.state, 'previous_state', case when tg_op = 'UPDATE' then old.state end,
    'stage', new.stage, 'reason', new.reason, 'exit_status', new.exit_status, 'exit_code', new.exit_code,
    'message', new.status_message, 'labels', coalesce(new.spec->'tags', '{}')));
  perform pg_notify('treadmill_feed', '');
  return null;
end $$;

create trigger jobs_feed_insert after insert on jobs
  for each row execute function treadmill_feed_job();
create trigger jobs_feed_update after update of state, stage on jobs
  for each row when (new.state is distinct from old.state or new.stage is distinct from old.stage)
  execute function treadmill_feed_job();

create function treadmill_feed_host() returns trigger language plpgsql as $$
begin
  -- Hosts are visible to every user (ListHosts), so is their health.
  insert into feed_events (kind, host_id, audience, payload)
  values ('host.health', new.id, 'users', jsonb_build_object(
    'schema', 'treadmill.event.v1', 'kind', 'host.health', 'host_id', new.id, 'host_name', new.name,
    'health', new.health, 'previous_health', old.health, 'reason', new.health_reason));
  perform pg_notify('treadmill_feed', '');
  return null;
end $$;

create trigger hosts_feed_health after update of health on hosts
  for each row when (new.health is distinct from old.health)
  execute function treadmill_feed_host();

create function treadmill_feed_lease() returns trigger language plpgsql as $$
begin
  insert into feed_events (kind, lease_id, audience, owner_id, payload)
  values ('lease.state', new.id, 'owner', new.owner_id, jsonb_build_object(
    'schema', 'treadmill.event.v1', 'kind', 'lease.state', 'lease_id', new.id, 'lease_kind', new.kind,
    'state', new.state, 'previous_state', case when tg_op = 'UPDATE' then old.state end,
    'end_reason', new.end_reason, 'message', new.status_message));
  perform pg_notify('treadmill_feed', '');
  return null;
end $$;

create trigger leases_feed_insert after insert on leases
  for each row execute function treadmill_feed_lease();
create trigger leases_feed_update after update of state on leases
  for each row when (new.state is distinct from old.state)
  execute function treadmill_feed_lease();
