-- 0005_snapshots: JobService.SnapshotJob operations (job.proto, Snapshot;
-- DESIGN.md §6). A snapshot is requested by a user for one running,
-- single-host job; the replica holding the host's stream sends TakeSnapshot
-- (woken by NOTIFY 'treadmill_snapshots' with the host id); the supervisor's
-- SnapshotResult registers the image in `images` and ends the operation.
-- Runs inside the migration transaction: no BEGIN/COMMIT here.

create table snapshots (
  id uuid primary key,
  job_id uuid not null references jobs (id) on delete cascade,
  -- The attempt and the host it runs on, when requested.
  attempt int not null check (attempt >= 1),
  host_id uuid not null,
  -- Who asked: the new image's owner (private to them).
  owner_id uuid not null references users (id),
  name text not null,
  tag text not null,
  state text not null default 'pending' check (state in ('pending', 'succeeded', 'failed')),
  message text not null default '' check (length(message) <= 4096),
  manifest_digest text not null default '',
  -- Where the supervisor uploads: the site's cache, else the first store of
  -- the job's image (a services row); it becomes the image's location.
  upload_service_id uuid not null,
  upload_url text not null,
  upload_site text not null default '',
  -- Manifest annotations sent with TakeSnapshot (title, source job).
  annotations jsonb not null default '{}' check (jsonb_typeof(annotations) = 'object'),
  -- SnapshotJob's idempotency key, unique per requester.
  request_id text,
  created_at timestamptz not null default now(),
  finished_at timestamptz,
  check ((state = 'pending') = (finished_at is null))
);
create unique index snapshots_owner_request_id_idx on snapshots (owner_id, request_id) where request_id is not null;
-- One pending snapshot per name:tag (the catalog's name is taken at the end).
create unique index snapshots_pending_name_idx on snapshots (name, tag) where state = 'pending';
-- What a stream delivers: the pending snapshots of its host.
create index snapshots_pending_host_idx on snapshots (host_id) where state = 'pending';
create index snapshots_job_id_idx on snapshots (job_id);
