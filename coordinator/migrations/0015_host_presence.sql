-- 0015_host_presence: when each host's supervisor was attached (issue #21:
-- a host's online time share, HostService.GetHostStats). One row per
-- attachment, open (online_until null) while it lasts.
--
-- Kept by a trigger on hosts.attached_replica rather than read from the
-- audit log's host.attached/host.detached events: those miss every
-- detachment that no stream records (a replica's orphans, a dead replica's
-- hosts, a superseded stream) and the re-attachment of a live stream, while
-- every one of those paths goes through that column. The trigger fires only
-- on statements that set the column and writes only when the host goes
-- online or offline: heartbeats (last_seen_at) and a stream superseding
-- another cost nothing. Runs inside the migration transaction.

create table host_presence (
  host_id uuid not null references hosts (id) on delete cascade,
  online_from timestamptz not null,
  -- null while the host is attached.
  online_until timestamptz,
  check (online_until is null or online_until >= online_from)
);
create index host_presence_host_idx on host_presence (host_id, online_from);
-- At most one open attachment per host.
create unique index host_presence_open_idx on host_presence (host_id) where online_until is null;

create function treadmill_host_presence() returns trigger language plpgsql as $$
begin
  if new.attached_replica is not null then
    insert into host_presence (host_id, online_from) values (new.id, coalesce(new.attached_at, now()))
    on conflict (host_id) where online_until is null do nothing;
  else
    -- A dead replica's hosts went offline at its last heartbeat (detached_at).
    update host_presence set online_until = greatest(online_from, coalesce(new.detached_at, now()))
    where host_id = new.id and online_until is null;
  end if;
  return null;
end $$;

create trigger hosts_presence after update of attached_replica on hosts
  for each row when ((old.attached_replica is null) is distinct from (new.attached_replica is null))
  execute function treadmill_host_presence();

-- Hosts attached now are online from their attachment.
insert into host_presence (host_id, online_from)
select id, coalesce(attached_at, now()) from hosts where attached_replica is not null;
