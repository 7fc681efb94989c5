/**
 * How a job's log status (Job.log_status, DESIGN.md §7) reads for people,
 * the same in `tml` and the web console. It may settle after the job is
 * finalized (a log server was down while it ended).
 */
import { LogStatus, type Job } from "../gen/treadmill/coordinator/v1/job_pb.js";
import { formatBytes } from "./bytes.js";

/**
 * "complete", "still being shipped (why)", "INCOMPLETE, 12 KiB lost: spill
 * cap reached on host sup-1"; undefined while no host has reported on it.
 */
export function logStatusText(job: Pick<Job, "logStatus" | "logBytesLost" | "logStatusMessage">): string | undefined {
  const why = job.logStatusMessage;
  switch (job.logStatus) {
    case LogStatus.COMPLETE:
      return "complete";
    case LogStatus.SHIPPING:
      return `still being shipped${why === "" ? "" : ` (${why})`}`;
    case LogStatus.INCOMPLETE:
      return `INCOMPLETE, ${formatBytes(job.logBytesLost)} lost${why === "" ? "" : `: ${why}`}`;
    default:
      return undefined;
  }
}
