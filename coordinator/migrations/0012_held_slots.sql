-- 0012_held_slots: each host's count of held slots (its unreleased
-- job_hosts rows), kept on the host row by triggers on job_hosts, and an
-- index of the hosts with a free slot. A scheduling pass reads its kind's
-- first free hosts through that index instead of counting every schedulable
-- host's slots (docs/scale.md: 63 ms of each dispatch at 10,000 busy hosts).
-- The count changes in the transaction that assigns (the scheduler already
-- holds the host row) or releases (the host row is locked last: the job
-- system's lock order is job rows, job_hosts rows, host rows).
-- Runs inside the migration transaction: no BEGIN/COMMIT here.

alter table hosts add column held_slots int not null default 0 check (held_slots >= 0);

update hosts h set held_slots = u.n
from (select host_id, count(*)::int as n from job_hosts where released_at is null group by host_id) u
where u.host_id = h.id;

-- Inserts and deletes come in sets (an assignment pass, a job's deletion):
-- one update per host per statement, its unreleased rows counted.
create function treadmill_slots_changed() returns trigger language plpgsql as $$
begin
  update hosts h set held_slots = h.held_slots + case when tg_op = 'INSERT' then d.n else -d.n end
  from (select host_id, count(*)::int as n from changed where released_at is null group by host_id order by host_id) d
  where h.id = d.host_id;
  return null;
end $$;

-- A release (released_at set) comes one slot at a time or in a group
-- commit's batch: per row, and only for rows whose release changes.
create function treadmill_slot_released() returns trigger language plpgsql as $$
begin
  update hosts set held_slots = held_slots + case when new.released_at is null then 1 else -1 end
  where id = new.host_id;
  return null;
end $$;

create trigger job_hosts_taken after insert on job_hosts
  referencing new table as changed for each statement execute function treadmill_slots_changed();
create trigger job_hosts_dropped after delete on job_hosts
  referencing old table as changed for each statement execute function treadmill_slots_changed();
create trigger job_hosts_released after update of released_at on job_hosts
  for each row when ((old.released_at is null) <> (new.released_at is null))
  execute function treadmill_slot_released();

-- The hosts a pass may place jobs on that have a free slot, in the order a
-- pass reads them.
create index hosts_free_idx on hosts (name)
  where attached_replica is not null and admin_state = 'enabled' and not supervisor_draining
    and held_slots < least(capacity, coalesce(supervisor_capacity, capacity));

-- Those of several slots, which a pass reads whole (their free slots first):
-- not every free host of an idle lab of boards.
create index hosts_free_shared_idx on hosts (name)
  where attached_replica is not null and admin_state = 'enabled' and not supervisor_draining
    and held_slots < least(capacity, coalesce(supervisor_capacity, capacity))
    and least(capacity, coalesce(supervisor_capacity, capacity)) > 1;
