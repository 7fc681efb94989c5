-- 0019_lease_scheduling: the scheduler's indexes with leases (issue #22;
-- coordinator/jobs/scheduler.ts). A host held by an active lease
-- (hosts.lease_id) takes only that lease's jobs: 0013's indexes of free
-- hosts again, with `lease_id is null` in their predicate as hosts.ts's
-- `hasFreeSlot` writes it, so that a pass placing other jobs never walks
-- leased hosts (500 of 2,000 in `npm run bench -- coordinator`). The free
-- hosts of leases are read apart, by lease.
-- Runs inside the migration transaction.
drop index hosts_free_idx;
drop index hosts_free_shared_idx;
create index hosts_free_idx on hosts (name)
  where attached_replica is not null and admin_state = 'enabled' and not supervisor_draining and health in ('healthy', 'unknown')
    and held_slots < least(capacity, coalesce(supervisor_capacity, capacity)) and lease_id is null;
create index hosts_free_shared_idx on hosts (name)
  where attached_replica is not null and admin_state = 'enabled' and not supervisor_draining and health in ('healthy', 'unknown')
    and held_slots < least(capacity, coalesce(supervisor_capacity, capacity)) and lease_id is null
    and least(capacity, coalesce(supervisor_capacity, capacity)) > 1;

-- The hosts of an active lease (its jobs' placement, its end).
create index hosts_lease_idx on hosts (lease_id) where lease_id is not null;

-- The earliest booking of any host: a pass reads it (one index entry) to
-- tell the jobs that end before every booking, which fit any host, from
-- those that must be matched against each host's booked_from.
create index hosts_booked_from_idx on hosts (booked_from) where booked_from is not null;

-- ListJobs' filter by lease (JobFilter.lease_id), newest first.
create index jobs_lease_idx on jobs (lease_id, id) where lease_id is not null;
