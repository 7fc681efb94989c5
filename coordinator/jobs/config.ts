/**
 * The job system's settings, spread into the coordinator's schema
 * (coordinator/config.ts). Keys become `--<key>` flags and
 * `TREADMILL_COORDINATOR_<KEY>` environment variables.
 */
import type { LeaseConfig } from "../leases/config.js";

/** What a hold lease (JobSpec.hold_on_failure) takes of the lease policy. */
export type HoldPolicy = Pick<LeaseConfig, "leaseMaxDurationMs" | "leaseGraceDefaultMs" | "leaseMaxConcurrentPerUser" | "leaseMaxHostHoursPerDay">;

const HOUR = 3600_000;
const DAY = 24 * HOUR;

export const jobConfigFields = {
  supervisorHeartbeatMs: {
    type: "duration",
    default: 10_000,
    min: 50,
    description: "heartbeat interval of supervisor streams; a stream silent for three intervals is dead",
  },
  supervisorGraceMs: {
    type: "duration",
    default: 120_000,
    min: 0,
    description: "how long a detached host keeps its jobs before they are finalized HOST_DROPPED",
  },
  jobSweepIntervalMs: {
    type: "duration",
    default: 1000,
    min: 10,
    description: "period of the sweep that enforces queue and job timeouts and the grace period",
  },
  replicaHeartbeatMs: {
    type: "duration",
    default: 5000,
    min: 50,
    description: "heartbeat of this replica in the database; silent for three: its hosts count as detached",
  },
  defaultQueueTimeoutMs: {
    type: "duration",
    default: DAY,
    min: 1000,
    description: "queue timeout of a job that names none",
  },
  maxQueueTimeoutMs: {
    type: "duration",
    default: 7 * DAY,
    min: 1000,
    description: "longest queue timeout a job may ask for",
  },
  defaultJobTimeoutMs: {
    type: "duration",
    default: HOUR,
    min: 1000,
    description: "job timeout of a job that names none",
  },
  maxJobTimeoutMs: {
    type: "duration",
    default: 7 * DAY,
    min: 1000,
    description: "longest job timeout a job may ask for",
  },
  maxJobsPerUser: {
    type: "int",
    default: 0,
    min: 0,
    description: "jobs of one user assigned or running at once (0: no limit); more wait in the queue",
  },
  maxQueuedJobsPerUser: {
    type: "int",
    default: 10_000,
    min: 1,
    description: "jobs of one user not yet finalized; SubmitJob beyond it answers ResourceExhausted",
  },
  schedulerAgingMs: {
    type: "duration",
    default: 10 * 60_000,
    min: 0,
    description: "a queued job gains one priority point per this much waiting (0: no aging)",
  },
  logReplicas: {
    type: "int",
    default: 2,
    min: 1,
    max: 16,
    description: "log servers each job's logs go to (fewer when fewer are registered)",
  },
  stopGraceMs: {
    type: "duration",
    default: 30_000,
    min: 0,
    description: "time StopJob gives a workload between the polite stop and the kill",
  },
  sessionTokenTtlMs: {
    type: "duration",
    default: 60 * 60 * 1000,
    min: 1000,
    description: "lifetime of tunnel:dial tokens (OpenJobSession); a session ends when its token expires",
  },
  logTokenTtlMs: {
    type: "duration",
    default: HOUR,
    min: 1000,
    description: "lifetime of log:read tokens from GetJobLogAccess",
  },
  healthSweepIntervalMs: {
    type: "duration",
    default: 5000,
    min: 10,
    description: "period of the health keeper that queues due health checks (burn-in, schedules, quarantine retries)",
  },
  healthRetryInitialMs: {
    type: "duration",
    default: 5 * 60_000,
    min: 10,
    description: "first delay before a quarantined host retries its health checks; doubles with each failed retry",
  },
  healthRetryMaxMs: {
    type: "duration",
    default: 6 * HOUR,
    min: 10,
    description: "longest delay between a quarantined host's retries of its health checks",
  },
  rerunSecretsMs: {
    type: "duration",
    default: 7 * DAY,
    min: 0,
    description: "how long a finished job keeps its secret parameters' values for its owner's re-runs (0: deleted at its end)",
  },
  loopStallMs: {
    type: "duration",
    default: 60_000,
    min: 100,
    description: "a scheduling pass, group commit or sweep running this long is logged as stalled (metric treadmill_coordinator_loop_stalled)",
  },
  resultsCasesPerAttempt: {
    type: "int",
    default: 250_000,
    min: 1,
    description: "test cases stored per job attempt (docs/results.md); more are dropped, with a RESULTS event on the job's timeline",
  },
  resultsSeriesIgnoredLabels: {
    type: "list",
    default: ["commit", "sha", "revision", "build"],
    description: "labels that change within a series of jobs (commit-like): CompareJobResults compares a job with the last finalized job having the same other labels",
  },
} as const;

/**
 * The job system's settings as loaded, with the lease policy a hold on
 * failure follows (leases/config.ts: its longest duration, the default
 * keepalive grace, the per-user limits).
 */
export interface JobConfig extends HoldPolicy {
  supervisorHeartbeatMs: number;
  supervisorGraceMs: number;
  jobSweepIntervalMs: number;
  replicaHeartbeatMs: number;
  defaultQueueTimeoutMs: number;
  maxQueueTimeoutMs: number;
  defaultJobTimeoutMs: number;
  maxJobTimeoutMs: number;
  maxJobsPerUser: number;
  maxQueuedJobsPerUser: number;
  schedulerAgingMs: number;
  logReplicas: number;
  stopGraceMs: number;
  logTokenTtlMs: number;
  sessionTokenTtlMs: number;
  loopStallMs: number;
  rerunSecretsMs: number;
  healthSweepIntervalMs: number;
  healthRetryInitialMs: number;
  healthRetryMaxMs: number;
  resultsCasesPerAttempt: number;
  resultsSeriesIgnoredLabels: readonly string[];
}
