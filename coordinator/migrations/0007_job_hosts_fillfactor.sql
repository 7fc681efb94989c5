-- 0007_job_hosts_fillfactor: room on each page of job_hosts for updated rows.
-- Runs inside the migration transaction: no BEGIN/COMMIT here.

-- A job_hosts row is updated two or three times in its job's life (the
-- acknowledged StartJob, the reports, the end). An update that changes no
-- indexed column and finds room on the row's page is HOT: it adds no index
-- entries. Pages filled to the brim (the default) leave no such room.
alter table job_hosts set (fillfactor = 70);
