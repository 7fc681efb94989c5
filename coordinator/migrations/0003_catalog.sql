-- 0003_catalog: users, tokens, groups and host grants, hosts' stream columns,
-- the image catalog's extra fields, registrations' status, and the audit log.
-- Runs inside the migration transaction: no BEGIN/COMMIT here.

-- Users: display name, last successful login, and deletion. A deleted user
-- stays as a tombstone (its jobs reference it): renamed to deleted.<id>,
-- disabled, no password, tokens revoked, out of its groups. Lists skip it.
alter table users
  add column display_name text not null default '' check (length(display_name) <= 128),
  add column last_login_at timestamptz,
  add column deleted_at timestamptz;

-- API tokens: the first 8 characters of the secret, to recognise a token
-- (the secret's kind prefix plus 4 random characters: not enough to guess it).
-- api_tokens.name holds the token's description.
alter table api_tokens
  add column prefix text not null default '';
create index api_tokens_user_created_idx on api_tokens (user_id, created_at desc, id desc);

alter table groups
  add column description text not null default '' check (length(description) <= 1024);

-- Grants: the members of a group may use one host, or every host whose tags
-- (plus the pseudo-tag site=<site>) include `tags`. Exactly one of the two.
create table host_grants (
  id uuid primary key,
  group_id uuid not null references groups (id) on delete cascade,
  host_id uuid references hosts (id) on delete cascade,
  tags jsonb check (tags is null or (jsonb_typeof(tags) = 'object' and tags <> '{}'::jsonb)),
  created_at timestamptz not null default now(),
  check ((host_id is null) <> (tags is null))
);
create index host_grants_group_id_idx on host_grants (group_id);
create index host_grants_host_id_idx on host_grants (host_id);
create unique index host_grants_host_unique on host_grants (group_id, host_id) where host_id is not null;
create unique index host_grants_tags_unique on host_grants (group_id, tags) where tags is not null;

-- Hosts. The supervisor stream (the job system) writes attached_replica
-- (the replicaId holding the stream; null when detached: a host is online
-- when it is not null), attached_at, last_seen_at and supervisor_version.
-- The catalog writes the rest. Whoever changes a row runs
-- pg_notify('treadmill_hosts', <host id>) in the same transaction.
alter table hosts
  add column attached_replica text,
  add column attached_at timestamptz,
  add column supervisor_version text not null default '',
  add column admin_state_reason text not null default '' check (length(admin_state_reason) <= 1024),
  add column updated_at timestamptz not null default now();
create index hosts_attached_replica_idx on hosts (attached_replica) where attached_replica is not null;

-- The tags a host is matched by: its tags plus site=<site> when it has a site.
create function treadmill_host_match_tags(tags jsonb, site text) returns jsonb
language sql immutable as $$
  select case when site = '' then tags else tags || jsonb_build_object('site', site) end
$$;

-- Host access rule (user.proto, Group): a host no grant matches is open to
-- every user; a host some grant matches is usable by the members of the groups
-- whose grants match it, and by admins. The scheduler applies this per user:
--   ... where treadmill_user_may_use_host(<user id>, h.id)
create function treadmill_user_may_use_host(p_user uuid, p_host uuid) returns boolean
language sql stable as $$
  select exists (select 1 from users u where u.id = p_user and u.role = 'admin')
    or not exists (
      select 1 from host_grants g, hosts h
      where h.id = p_host
        and (g.host_id = h.id or (g.tags is not null and treadmill_host_match_tags(h.tags, h.site) @> g.tags)))
    or exists (
      select 1 from host_grants g
        join group_members m on m.group_id = g.group_id and m.user_id = p_user,
        hosts h
      where h.id = p_host
        and (g.host_id = h.id or (g.tags is not null and treadmill_host_match_tags(h.tags, h.site) @> g.tags)))
$$;

-- The image catalog. `images.locations` keeps 0001's format, extended with the
-- store's site: an ordered (by registration) JSON array
--   [{"service": "<services.id>", "url": "<store base url>", "site": "<site or ''>"}]
-- Visibility 'group' lets the members of image_groups' groups use the image.
-- Who may use an image: admins; its owner; everyone for 'public'; the members
-- of its groups for 'group' -- treadmill_user_may_use_image(user, name, tag).
alter table images drop constraint images_visibility_check;
alter table images
  add constraint images_visibility_check check (visibility in ('private', 'group', 'public')),
  add column annotations jsonb not null default '{}' check (jsonb_typeof(annotations) = 'object'),
  add column source_job_id uuid,
  add column updated_at timestamptz not null default now();

create table image_groups (
  name text not null,
  tag text not null,
  group_id uuid not null references groups (id) on delete cascade,
  primary key (name, tag, group_id),
  foreign key (name, tag) references images (name, tag) on delete cascade
);
create index image_groups_group_id_idx on image_groups (group_id);

create function treadmill_user_may_use_image(p_user uuid, p_name text, p_tag text) returns boolean
language sql stable as $$
  select exists (
    select 1 from images i
    where i.name = p_name and i.tag = p_tag
      and (i.visibility = 'public'
        or i.owner_id = p_user
        or exists (select 1 from users u where u.id = p_user and u.role = 'admin')
        or (i.visibility = 'group' and exists (
          select 1 from image_groups ig join group_members m on m.group_id = ig.group_id
          where ig.name = i.name and ig.tag = i.tag and m.user_id = p_user))))
$$;

-- Registrations (RegistryService). `capacity` (0001) is capacity_bytes. A
-- registration is live while last_heartbeat_at is within three
-- heartbeat_interval_ms of now and it is not draining.
alter table services
  add column version text not null default '',
  add column tcp_address text not null default '',
  add column free_bytes bigint not null default 0 check (free_bytes >= 0),
  add column active_streams int not null default 0 check (active_streams >= 0),
  add column draining boolean not null default false,
  add column heartbeat_interval_ms int not null default 10000 check (heartbeat_interval_ms > 0),
  -- the service credential (api_tokens row of scope 'service') that registered it
  add column token_id uuid references api_tokens (id) on delete set null;

-- The audit log: logins, token creation and revocation, user, group, host and
-- image changes, job state changes and commands. Written in the same
-- transaction as the change (coordinator/audit.ts). Never holds a secret.
create table audit_events (
  id bigserial primary key,
  at timestamptz not null default now(),
  kind text not null,
  actor text not null default '',
  job_id uuid,
  host_id uuid,
  user_id uuid,
  message text not null default '',
  details jsonb not null default '{}'
);
create index audit_events_job_id_idx on audit_events (job_id, id) where job_id is not null;
create index audit_events_host_id_idx on audit_events (host_id, id) where host_id is not null;
create index audit_events_user_id_idx on audit_events (user_id, id) where user_id is not null;
