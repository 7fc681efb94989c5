-- 0018_lease_sessions: what LeaseService needs beside 0017 (issue #22).
-- A lease's session job (the job that provisions its hosts from its image
-- when it becomes active), so that ExtendLease moves that job's timeout
-- with the lease's end; and the request id of an ExtendLease on the
-- timeline entry it wrote, so that a retried extension is not applied twice.
-- Runs inside the migration transaction.

alter table leases add column session_job_id uuid references jobs (id) on delete set null;

alter table lease_events add column request_id text;
create unique index lease_events_request_idx on lease_events (lease_id, request_id) where request_id is not null;
