-- 0027_owner_unfinished_jobs: the count of a user's unfinished jobs that
-- every SubmitJob makes (the per-user limit) reads this index alone.
-- Without it the count walked all of the user's jobs, finished ones too:
-- 7.8 ms a submission with 4,000 jobs in the table (the webhooks benchmark),
-- growing with the table. Runs inside the migration transaction.

create index jobs_owner_unfinished_idx on jobs (owner_id) where state <> 'finalized';
