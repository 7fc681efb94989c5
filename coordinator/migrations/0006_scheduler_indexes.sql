-- 0006_scheduler_indexes: the indexes of the scheduler's hot path.
-- Runs inside the migration transaction: no BEGIN/COMMIT here.

-- The hosts a pass may place jobs on, in the order it reads them: a pass
-- reads only these rows, not every host ever registered.
create index hosts_schedulable_idx on hosts (name)
  where attached_replica is not null and admin_state = 'enabled' and not supervisor_draining;

-- jobs_pkey serves `order by id desc` as well (a B-tree is read both ways);
-- this one only cost every non-HOT update of a job one more index entry.
drop index jobs_id_desc_idx;
