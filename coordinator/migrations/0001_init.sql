-- 0001_init: the coordinator's foundational schema (DESIGN.md §3-§5, §10).
-- Later migrations extend it; never edit this file once applied (its checksum
-- is recorded). Runs inside the migration transaction: no BEGIN/COMMIT here.
-- Must work on PostgreSQL 14 and newer.
--
-- Ids are UUIDv7 made by the coordinator (time-ordered, so keyset pagination
-- and index locality work), hence no column defaults for them. Enumerations are
-- lower-case text with CHECK constraints: adding a value is one ALTER of a
-- constraint, not an enum type change.

create table users (
  id uuid primary key,
  name text not null unique check (length(name) between 1 and 128),
  -- scrypt, self-describing (parameters, salt, hash); null: no password login.
  password_hash text,
  role text not null default 'user' check (role in ('admin', 'user')),
  disabled boolean not null default false,
  created_at timestamptz not null default now()
);

-- Bearer API tokens: only the sha256 of the random 32 bytes is stored.
create table api_tokens (
  id uuid primary key,
  user_id uuid not null references users (id) on delete cascade,
  hash bytea not null unique check (octet_length(hash) = 32),
  name text not null default '',
  created_at timestamptz not null default now(),
  expires_at timestamptz,
  last_used_at timestamptz,
  revoked_at timestamptz
);
create index api_tokens_user_id_idx on api_tokens (user_id);

create table groups (
  id uuid primary key,
  name text not null unique check (length(name) between 1 and 128),
  created_at timestamptz not null default now()
);

create table group_members (
  group_id uuid not null references groups (id) on delete cascade,
  user_id uuid not null references users (id) on delete cascade,
  added_at timestamptz not null default now(),
  primary key (group_id, user_id)
);
create index group_members_user_id_idx on group_members (user_id);

-- Capability-token signing keys (Ed25519 JWKs). The newest unretired key signs;
-- every key not retired long enough ago is published by GetSigningKeys.
create table signing_keys (
  kid text primary key,
  private_jwk jsonb not null,
  public_jwk jsonb not null,
  created_at timestamptz not null default now(),
  retired_at timestamptz
);

create table hosts (
  id uuid primary key,
  name text not null unique check (length(name) between 1 and 128),
  -- key=value tags as a JSON object ({"board": "nrf52840dk", "arch": "x86_64"}),
  -- matched as a subset with @> (the GIN index below).
  tags jsonb not null default '{}' check (jsonb_typeof(tags) = 'object'),
  driver_kind text not null,
  media_types text[] not null default '{}',
  site text not null default '',
  capacity int not null default 1 check (capacity >= 0),
  admin_state text not null default 'enabled' check (admin_state in ('enabled', 'draining', 'disabled')),
  -- sha256 of the supervisor credential issued once by CreateHost.
  credential_hash bytea check (credential_hash is null or octet_length(credential_hash) = 32),
  last_seen_at timestamptz,
  created_at timestamptz not null default now()
);
create index hosts_tags_idx on hosts using gin (tags jsonb_path_ops);
create index hosts_site_idx on hosts (site);

-- The catalog: name:tag -> manifest digest, and the stores holding it.
create table images (
  name text not null check (length(name) between 1 and 255),
  tag text not null check (length(tag) between 1 and 128),
  digest text not null check (digest ~ '^sha256:[0-9a-f]{64}$'),
  media_types text[] not null default '{}',
  size bigint not null default 0 check (size >= 0),
  owner_id uuid references users (id) on delete set null,
  visibility text not null default 'private' check (visibility in ('private', 'public')),
  -- ordered store locations: [{"service": "<id>", "url": "..."}]
  locations jsonb not null default '[]' check (jsonb_typeof(locations) = 'array'),
  created_at timestamptz not null default now(),
  primary key (name, tag)
);
create index images_digest_idx on images (digest);
create index images_owner_id_idx on images (owner_id);

create table jobs (
  id uuid primary key,
  owner_id uuid not null references users (id),
  -- the submitted request (image, host requirements, parameters, timeouts);
  -- secret parameter values never go here.
  spec jsonb not null,
  state text not null default 'queued'
    check (state in ('queued', 'assigned', 'initializing', 'running', 'terminating', 'finalized')),
  stage text check (stage in ('fetching_image', 'allocating', 'provisioning', 'booting')),
  reason text check (reason in (
    'workload_exited', 'canceled', 'job_timeout', 'queue_timeout', 'host_dropped',
    'image_error', 'host_start_failure', 'internal_error')),
  exit_status text check (exit_status in ('success', 'failure')),
  exit_code int,
  attempt int not null default 1 check (attempt >= 1),
  priority int not null default 0,
  queued_at timestamptz not null default now(),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  finalized_at timestamptz,
  check (state <> 'finalized' or (reason is not null and finalized_at is not null))
);
-- The scheduler's queue: priority, then age, then submit time.
create index jobs_queue_idx on jobs (priority desc, queued_at, created_at) where state = 'queued';
create index jobs_active_idx on jobs (state) where state <> 'finalized';
create index jobs_owner_id_idx on jobs (owner_id, id);

-- Which hosts run (ran) each attempt of a job; N hosts are co-allocated.
create table job_hosts (
  job_id uuid not null references jobs (id) on delete cascade,
  host_id uuid not null references hosts (id) on delete cascade,
  attempt int not null check (attempt >= 1),
  primary key (job_id, attempt, host_id)
);
create index job_hosts_host_id_idx on job_hosts (host_id);

-- A job's history: state changes, stages, scheduler decisions.
create table job_events (
  id bigserial primary key,
  job_id uuid not null references jobs (id) on delete cascade,
  at timestamptz not null default now(),
  kind text not null,
  state text,
  stage text,
  message text not null default '',
  attempt int
);
create index job_events_job_id_idx on job_events (job_id, id);

-- Registered stores, caches, log servers and proxies (RegistryService).
create table services (
  id uuid primary key,
  kind text not null check (kind in ('image_store', 'image_cache', 'log_server', 'proxy')),
  url text not null,
  site text not null default '',
  capacity bigint not null default 0 check (capacity >= 0),
  created_at timestamptz not null default now(),
  last_heartbeat_at timestamptz not null default now(),
  unique (kind, url)
);
create index services_kind_idx on services (kind, last_heartbeat_at);
