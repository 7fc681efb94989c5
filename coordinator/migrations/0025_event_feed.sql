-- 0025_event_feed: the event feed (issue #24 item 1, docs/events.md): every
-- change a user may see, in one ordered, resumable feed read by cursor.
--
-- Order without gaps. A bigserial written with the row is no cursor: ids
-- are taken when a row is written, not when its transaction commits, so a
-- reader that has seen id 61 may later find id 60 committed by a
-- transaction that was still running (the classic commit-order gap). Here
-- an event is written to feed_pending, without a cursor, and a sequencer
-- moves committed ones to feed_events, in batches: each batch runs in a
-- transaction that first takes one advisory lock (so batches follow one
-- another, on any replica) and numbers the events it moves from
-- feed_state.last_cursor up, in write order. A batch commits before the
-- next one starts, so a reader that sees a cursor sees every smaller one,
-- and no event can later get a smaller one. Readers read `cursor > N` only.
--
-- Rejected: reading a sequence id only below the oldest running
-- transaction's xid (pg_snapshot_xmin, PgQ's rule; this migration's first
-- draft). It writes once, but ties delivery to every writing transaction
-- on the server, other databases' included: each event waits for every
-- transaction that was running when it committed, and under the
-- coordinator benchmark's load one always is (the scheduler's, the group
-- commits'). Its cursor is also a pair (xid, id). The sequencer costs a
-- second write per event (the move, in batches; two small tables with one
-- index each, rather than one row updated in place, which would need an
-- index on the cursor and one on the pending rows, and whose update could
-- never be HOT) and a hop through a replica.

-- Who writes. Job state and stage, host health and lease state are written
-- by triggers (below), because the coordinator changes them in many places
-- and in sets (the scheduler's assignment, writeJobStates): a trigger sees
-- every path, and its WHEN clause keeps it off every other update. Other
-- kinds (job.results, job.artifacts) are written by recordFeedEvent
-- (db/queries/feed.ts) in the changing transaction. A writing transaction
-- notifies 'treadmill_feed_pending' (PostgreSQL sends one per transaction,
-- at its commit): the sequencers wake; a batch that numbered rows notifies
-- 'treadmill_feed' with its newest cursor: the readers of every replica
-- wake and read by cursor.
--
-- Retention: the feed sweep deletes the oldest events, in cursor order, up
-- to the first one written within the retention, and records the last
-- cursor deleted in feed_state.swept_cursor; a cursor before it is expired
-- (OUT_OF_RANGE).
-- Runs inside the migration transaction.

-- Events written, not yet numbered. The sequencer copies every column, in
-- this order, after the cursor: feed_events has the same ones.
create table feed_pending (
  -- Write order (not commit order): the sequencer numbers events in it.
  id bigint generated always as identity primary key,
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
  check (audience <> 'owner' or owner_id is not null)
);

-- The feed: numbered events, as feed_pending had them.
create table feed_events (
  cursor bigint primary key,
  id bigint not null,
  at timestamptz not null,
  kind text not null,
  job_id uuid,
  host_id uuid,
  lease_id uuid,
  audience text not null,
  owner_id uuid,
  labels jsonb not null,
  payload jsonb not null
);

-- The newest cursor given (the sequencer's, under its lock) and the newest
-- deleted by retention (events up to it are gone).
create table feed_state (
  only_row boolean primary key default true check (only_row),
  last_cursor bigint not null,
  swept_cursor bigint not null
);
insert into feed_state (last_cursor, swept_cursor) values (0, 0);

-- One batch of the sequencer (db/queries/feed.ts stampFeed): moves up to
-- `batch` committed events from feed_pending to feed_events, numbered in
-- write order, and returns them. A function so that a batch is one round
-- trip: called outside a transaction block it is its own transaction, and
-- its lock is released at that commit. Its move is a statement after the
-- lock, so its snapshot holds every batch before (a volatile function's
-- statements each take a new snapshot). The key is "trmfeed!" in ASCII.
create function treadmill_feed_stamp(batch int) returns setof feed_events language plpgsql volatile as $$
begin
  perform pg_advisory_xact_lock(8390889342299890721);
  return query
  with p as materialized (
    delete from feed_pending where id in (select id from feed_pending order by id limit batch) returning *),
  n as (select s.last_cursor + row_number() over (order by p.id) as cursor, p.* from p, feed_state s),
  i as (insert into feed_events select * from n returning *),
  c as (update feed_state set last_cursor = last_cursor + (select count(*) from p) where exists (select 1 from p))
  select * from i order by i.cursor;
  if found then
    -- The payload: the newest cursor now given.
    perform pg_notify('treadmill_feed', (select last_cursor::text from feed_state));
  end if;
end $$;

create function treadmill_feed_job() returns trigger language plpgsql as $$
declare
  kind text := 'job.state';
begin
  if tg_op = 'UPDATE' and new.state is not distinct from old.state then
    kind := 'job.stage';
  end if;
  insert into feed_pending (kind, job_id, lease_id, audience, owner_id, labels, payload)
  values (kind, new.id, new.lease_id, 'owner', new.owner_id, coalesce(new.spec->'tags', '{}'), jsonb_build_object(
    'schema', 'treadmill.event.v1', 'kind', kind, 'job_id', new.id, 'lease_id', new.lease_id, 'attempt', new.attempt,
    'state', new.state, 'previous_state', case when tg_op = 'UPDATE' then old.state end,
    'stage', new.stage, 'reason', new.reason, 'exit_status', new.exit_status, 'exit_code', new.exit_code,
    'message', new.status_message, 'labels', coalesce(new.spec->'tags', '{}')));
  perform pg_notify('treadmill_feed_pending', '');
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
  insert into feed_pending (kind, host_id, audience, payload)
  values ('host.health', new.id, 'users', jsonb_build_object(
    'schema', 'treadmill.event.v1', 'kind', 'host.health', 'host_id', new.id, 'host_name', new.name,
    'health', new.health, 'previous_health', old.health, 'reason', new.health_reason));
  perform pg_notify('treadmill_feed_pending', '');
  return null;
end $$;

create trigger hosts_feed_health after update of health on hosts
  for each row when (new.health is distinct from old.health)
  execute function treadmill_feed_host();

create function treadmill_feed_lease() returns trigger language plpgsql as $$
begin
  insert into feed_pending (kind, lease_id, audience, owner_id, payload)
  values ('lease.state', new.id, 'owner', new.owner_id, jsonb_build_object(
    'schema', 'treadmill.event.v1', 'kind', 'lease.state', 'lease_id', new.id, 'lease_kind', new.kind,
    'state', new.state, 'previous_state', case when tg_op = 'UPDATE' then old.state end,
    'end_reason', new.end_reason, 'message', new.status_message));
  perform pg_notify('treadmill_feed_pending', '');
  return null;
end $$;

create trigger leases_feed_insert after insert on leases
  for each row execute function treadmill_feed_lease();
create trigger leases_feed_update after update of state on leases
  for each row when (new.state is distinct from old.state)
  execute function treadmill_feed_lease();
