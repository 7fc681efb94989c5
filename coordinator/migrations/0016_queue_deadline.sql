-- 0016_queue_deadline: when a queued job's queue timeout runs out, kept on
-- the row and indexed among the queued jobs. The sweep looked for jobs past
-- their queue timeout by computing queued_at + queue_timeout_ms over every
-- queued job (51 ms a sweep with 20,000 queued in `npm run bench --
-- scale`, several sweeps a second): it now reads the index's head. A trigger keeps
-- the column wherever a job is queued (its insert, a restart).
-- Runs inside the migration transaction: no BEGIN/COMMIT here.

alter table jobs add column queue_deadline_at timestamptz;

create function treadmill_queue_deadline() returns trigger language plpgsql as $$
begin
  new.queue_deadline_at := new.queued_at + new.queue_timeout_ms * interval '1 millisecond';
  return new;
end $$;

create trigger jobs_queue_deadline before insert or update of queued_at, queue_timeout_ms on jobs
  for each row execute function treadmill_queue_deadline();

update jobs set queue_deadline_at = queued_at + queue_timeout_ms * interval '1 millisecond' where state = 'queued';

create index jobs_queue_deadline_idx on jobs (queue_deadline_at) where state = 'queued';
