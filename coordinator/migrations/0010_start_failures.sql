-- Streams of a host that broke while a StartJob of the attempt was sent and
-- not yet acknowledged (issue #18 defect 3): a command that kills its
-- supervisor's stream again and again is stopped after a few, and the
-- attempt ends as a start failure instead of being resent forever.
alter table job_hosts add column start_failures int not null default 0;
