-- 0026_subscriptions: subscriptions to the event feed and their delivery
-- log (issue #24 item 2, docs/events.md "Subscriptions").
--
-- A subscription is a filter (jsonb, SubscriptionFilter's fields) and one
-- or more destinations; its creator's rights bound what it matches (the
-- feed's visibility rule, db/queries/feed.ts visibleTo, applied by the
-- worker with the creator as viewer). Its webhook secret
-- is kept as is: an HMAC needs the key itself, not a hash of it; no API
-- answer returns it after creation or rotation.
--
-- Deliveries are queued by the delivery worker, one row per (destination,
-- event), in the same transaction that moves the worker's cursor
-- (subscription_cursor) past the events: a restart resumes from the cursor
-- and neither loses nor duplicates a row. Only the replica holding the
-- worker's advisory lock writes the cursor; the update is also conditional
-- on the position it read, so a replica that lost the lock cannot move it.
-- Runs inside the migration transaction.

create table subscriptions (
  id uuid primary key,
  name text not null check (length(name) between 1 and 100),
  -- The creator: the filter runs with their rights.
  owner_id uuid not null references users (id) on delete cascade,
  -- Members of this group may read and manage it too.
  group_id uuid references groups (id) on delete cascade,
  filter jsonb not null check (jsonb_typeof(filter) = 'object'),
  secret text not null,
  enabled boolean not null default true,
  -- Set when the worker disabled it (a destination failed for the window).
  disabled_reason text not null default '',
  disabled_at timestamptz,
  created_at timestamptz not null default now()
);
create index subscriptions_owner_id_idx on subscriptions (owner_id);
create index subscriptions_group_id_idx on subscriptions (group_id) where group_id is not null;

create table subscription_destinations (
  id uuid primary key,
  subscription_id uuid not null references subscriptions (id) on delete cascade,
  position int not null,
  kind text not null check (kind in ('webhook', 'email')),
  url text,
  email_to text[],
  email_mode text check (email_mode in ('each', 'digest')),
  digest_window_ms bigint check (digest_window_ms > 0),
  -- The first failed attempt since the last success; null when not failing.
  failing_since timestamptz,
  check ((kind = 'webhook') = (url is not null)),
  check ((kind = 'email') = (email_to is not null and email_mode is not null))
);
create index subscription_destinations_subscription_id_idx on subscription_destinations (subscription_id);

create table subscription_deliveries (
  id uuid primary key,
  subscription_id uuid not null references subscriptions (id) on delete cascade,
  destination_id uuid not null references subscription_destinations (id) on delete cascade,
  -- The feed cursor (decimal), or "test-<uuid>" for a synthetic event.
  event_id text not null,
  event_kind text not null,
  -- The exact JSON body sent (the event's payload): kept for redelivery
  -- after the feed dropped the event.
  body text not null,
  state text not null default 'pending' check (state in ('pending', 'delivered', 'failed')),
  request_summary text not null default '',
  attempt_count int not null default 0,
  -- [{at, code, error, ms}], oldest first.
  attempts jsonb not null default '[]',
  created_at timestamptz not null,
  next_attempt_at timestamptz,
  last_attempt_at timestamptz,
  response_code int not null default 0,
  error text not null default '',
  redelivery_of uuid
);
create index subscription_deliveries_due_idx on subscription_deliveries (next_attempt_at) where state = 'pending';
create index subscription_deliveries_log_idx on subscription_deliveries (subscription_id, created_at desc, id desc);
create index subscription_deliveries_created_at_idx on subscription_deliveries (created_at);

-- The delivery worker's position in the feed: every event up to this
-- cursor has been matched and its deliveries queued. A new installation
-- starts at the feed's head: subscriptions see what happens after they exist.
create table subscription_cursor (
  only_row boolean primary key default true check (only_row),
  cursor bigint not null,
  updated_at timestamptz not null default now()
);
insert into subscription_cursor (cursor) select last_cursor from feed_state;

-- Bumped by every change of a subscription or of a user's rights: the
-- worker reloads the subscriptions it matches against when it moved, read
-- before each batch, so an event committed after a change is matched with it.
create table subscription_version (
  only_row boolean primary key default true check (only_row),
  version bigint not null
);
insert into subscription_version (version) values (0);

create function treadmill_subscription_version() returns trigger language plpgsql as $$
begin
  update subscription_version set version = version + 1;
  return null;
end $$;

create trigger subscriptions_version after insert or update or delete on subscriptions
  for each statement execute function treadmill_subscription_version();
create trigger users_subscription_version after update of role, disabled on users
  for each statement execute function treadmill_subscription_version();
