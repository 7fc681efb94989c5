-- 0021_lease_job_events: a lease hears of its jobs (issue #22). When a job
-- inside a lease (jobs.lease_id) changes state, the lease's watchers are
-- told ('treadmill_leases', payload the lease id: WatchLease re-reads which
-- job runs on which of its hosts), and a job starting to run is written on
-- the lease's timeline (kind 'job'). A trigger, because the job system
-- writes job states in several places, in sets (writeJobStates, the
-- scheduler's assignment); its WHEN clause keeps it off every job outside a
-- lease. (0019 and 0020 are the scheduler's and the hold's migrations.)
-- Runs inside the migration transaction.

create function treadmill_lease_job_changed() returns trigger language plpgsql as $$
begin
  if new.state = 'running' then
    insert into lease_events (lease_id, kind, state, message)
    select l.id, 'job', l.state,
      'job ' || new.id || ' running on ' || coalesce((
        select string_agg(h.name, ', ' order by jh.host_index) from job_hosts jh join hosts h on h.id = jh.host_id
        where jh.job_id = new.id and jh.attempt = new.attempt), 'its hosts')
    from leases l where l.id = new.lease_id and l.state <> 'ended';
  end if;
  perform pg_notify('treadmill_leases', new.lease_id::text);
  return null;
end $$;

create trigger jobs_lease_job_changed after update of state on jobs
  for each row when (new.lease_id is not null and new.state is distinct from old.state)
  execute function treadmill_lease_job_changed();
