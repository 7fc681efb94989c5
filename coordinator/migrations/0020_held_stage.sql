-- 0020_held_stage: the stage HELD (issue #22, JobSpec.hold_on_failure): a
-- job whose workload failed stays RUNNING in stage 'held' while a lease of
-- kind 'hold' keeps its hosts as they are. Runs inside the migration
-- transaction.
alter table jobs drop constraint jobs_stage_check;
alter table jobs add constraint jobs_stage_check
  check (stage in ('fetching_image', 'allocating', 'provisioning', 'booting', 'held'));
alter table job_hosts drop constraint job_hosts_stage_check;
alter table job_hosts add constraint job_hosts_stage_check
  check (stage in ('fetching_image', 'allocating', 'provisioning', 'booting', 'held'));
-- The hold of a job, found when the job ends (its lease ends with it).
create index leases_held_job_idx on leases (held_job_id) where held_job_id is not null and state <> 'ended';
