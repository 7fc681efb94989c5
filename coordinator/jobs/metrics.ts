/**
 * The job system's own metrics, served on the coordinator's /metrics beside
 * the RPC metrics: how long scheduling passes and group commits take and how
 * much each does. Created before the server (the parts record into them from
 * the start) and registered with its registry once it exists.
 */
import { Counter, Histogram, type Registry } from "prom-client";
import type { Watchdog } from "./watchdog.js";

const BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5];

export class JobMetrics {
  readonly passSeconds = new Histogram({
    name: "treadmill_scheduler_pass_seconds",
    help: "Duration of scheduling passes, from taking a connection to the commit.",
    buckets: BUCKETS,
    registers: [],
  });
  readonly assigned = new Counter({
    name: "treadmill_scheduler_assigned_jobs_total",
    help: "Jobs assigned to hosts by this replica's scheduler.",
    registers: [],
  });
  readonly commitSeconds = new Histogram({
    name: "treadmill_group_commit_seconds",
    help: "Duration of group-commit transactions of the supervisors' reports and acknowledgements.",
    buckets: BUCKETS,
    registers: [],
  });
  readonly changes = new Counter({
    name: "treadmill_group_commit_changes_total",
    help: "Reports and acknowledgements applied by group commits.",
    registers: [],
  });
  readonly passFailures = new Counter({
    name: "treadmill_scheduler_pass_failures_total",
    help: "Scheduling passes that failed (each is retried with backoff).",
    registers: [],
  });

  constructor(private readonly watchdog?: Watchdog) {}

  /** Hands a unit of work of a background loop to the watchdog (stalls are logged and counted). */
  watch<T>(loop: string, work: Promise<T>): Promise<T> {
    return this.watchdog ? this.watchdog.track(loop, work) : work;
  }

  register(registry: Registry): void {
    for (const m of [this.passSeconds, this.assigned, this.commitSeconds, this.changes, this.passFailures]) registry.registerMetric(m);
    if (this.watchdog) registry.registerMetric(this.watchdog.stalled);
  }
}
