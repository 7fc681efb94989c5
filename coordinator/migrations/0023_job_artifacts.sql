-- 0023_job_artifacts: files job attempts wrote into $TREADMILL_ARTIFACTS_DIR
-- (docs/artifacts.md). The bytes live in an image store, content-addressed,
-- listed by one store manifest per (job, attempt, host) that keeps them from
-- the store's garbage collection; only the listing lives here. The retention
-- keeper deletes a set's manifest at its store (its blobs become
-- collectable) and marks the set removed, by age and by each owner's total.
-- Sets carry no foreign key to jobs: a job deleted by its own retention
-- leaves its set for the keeper, which still removes the manifest.
-- Runs inside the migration transaction: no BEGIN/COMMIT here.

create table artifact_sets (
  id uuid primary key,
  job_id uuid not null,
  attempt int not null check (attempt >= 1),
  host_id uuid not null,
  -- The job's owner: who holds the blobs at the store, and whose total
  -- the per-user cap counts.
  owner_id uuid not null,
  -- The supervisor's JobArtifactsReport.report_id: a repeated report is
  -- recorded once.
  report_id text not null,
  -- '' when nothing was uploaded (only skipped files or an error to record).
  manifest_digest text not null check (manifest_digest = '' or manifest_digest ~ '^sha256:[0-9a-f]{64}$'),
  store_url text not null,
  total_bytes bigint not null check (total_bytes >= 0),
  created_at timestamptz not null default now(),
  -- Set once the keeper deleted the manifest at the store.
  removed_at timestamptz,
  unique (job_id, attempt, host_id)
);

create index artifact_sets_live_age on artifact_sets (created_at) where removed_at is null;
create index artifact_sets_live_owner on artifact_sets (owner_id, created_at) where removed_at is null;

create table job_artifacts (
  set_id uuid not null references artifact_sets (id) on delete cascade,
  job_id uuid not null,
  attempt int not null check (attempt >= 1),
  -- Path relative to the artifacts directory, '/'-separated.
  name text not null check (length(name) between 1 and 1024),
  size_bytes bigint not null check (size_bytes >= 0),
  digest text not null check (digest ~ '^sha256:[0-9a-f]{64}$'),
  media_type text not null,
  created_at timestamptz not null default now(),
  primary key (job_id, attempt, name)
);
