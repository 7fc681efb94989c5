/**
 * A host's statistics, from what db/queries/host-stats.ts reads: as
 * GetHostStats answers them (the windows of 24 hours and 7 days, each
 * clipped to the host's life; shares and times as the proto says) and as
 * the coordinator's /metrics shows every host (its health, its ends by
 * class). Ends are classed by jobs/store.ts reasonClass.
 */
import { create } from "@bufbuild/protobuf";
import { Counter, Gauge, type Registry } from "prom-client";
import type { Logger } from "../../lib/logger.js";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  type GetHostStatsResponse,
  GetHostStatsResponseSchema,
  HealthStateDurationSchema,
  HostCheckOutcomeSchema,
  HostHealthChangeSchema,
  type HostStatsWindow,
  HostStatsWindowSchema,
} from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ReasonClass } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import type { Db } from "../db/queries/jobs.js";
import { healthTimeline, hostActivity, type HostActivity, hostTallies, lastHealthCheck, timeInHealth } from "../db/queries/host-stats.js";
import { HEALTH_STATES, hostMessage, type HostRow } from "../db/queries/hosts.js";
import { reasonClass } from "../jobs/store.js";

const HOUR_MS = 3_600_000;
/** The windows GetHostStats answers for, in its order. */
export const STATS_WINDOWS_MS = [24 * HOUR_MS, 7 * 24 * HOUR_MS] as const;

/** How far back, and how many changes at most, the health timeline goes. */
const TIMELINE_MS = 7 * 24 * HOUR_MS;
const TIMELINE_MAX = 200;

/** The statistics of host `row` at `nowMs`. */
export async function hostStats(sql: Db, row: HostRow, nowMs: number): Promise<GetHostStatsResponse> {
  const now = new Date(nowMs);
  const starts = STATS_WINDOWS_MS.map((length) => new Date(Math.min(nowMs, Math.max(nowMs - length, row.created_at.getTime()))));
  const [activity, check, timeline] = await Promise.all([
    hostActivity(sql, row.id, starts, now),
    lastHealthCheck(sql, row.id, now),
    healthTimeline(sql, row.id, new Date(nowMs - TIMELINE_MS), now, TIMELINE_MAX),
  ]);
  return create(GetHostStatsResponseSchema, {
    host: hostMessage(row),
    windows: STATS_WINDOWS_MS.map((length, i) => windowStats(activity, i, length, starts[i], now)),
    lastHealthCheck: check && create(HostCheckOutcomeSchema, { jobId: check.jobId, passed: check.passed, time: timestampFromDate(check.at), message: check.message }),
    computeTime: timestampFromDate(now),
    healthChanges: timeline.map((e) =>
      create(HostHealthChangeSchema, { health: HEALTH_STATES[e.health], reason: e.reason, actor: e.actor, jobId: e.jobId ?? "", time: timestampFromDate(e.at) }),
    ),
  });
}

type EndClass = "success" | "job" | "user" | "infrastructure";

/** How an end on a host counts: a success, or a failure of a reason class. */
function endClass(reason: string, exitStatus: string | null): EndClass {
  const cls = reasonClass(reason);
  if (cls === ReasonClass.JOB) return exitStatus === "success" ? "success" : "job";
  if (cls === ReasonClass.USER) return "user";
  // A reason this version does not know is not the workload's.
  return "infrastructure";
}

function windowStats(activity: HostActivity, i: number, lengthMs: number, start: Date, now: Date): HostStatsWindow {
  const w = create(HostStatsWindowSchema, { length: durationFromMs(lengthMs), startTime: timestampFromDate(start) });
  for (const e of activity.ends) {
    if (e.window !== i) continue;
    const n = BigInt(e.n);
    w.jobsRun += n;
    const end = endClass(e.reason, e.exitStatus);
    if (end === "success") w.jobsSucceeded += n;
    else if (end === "job") w.jobFailures += n;
    else if (end === "user") w.userFailures += n;
    else w.infrastructureFailures += n;
  }
  w.infrastructureFailureRate = w.jobsRun > 0n ? Number(w.infrastructureFailures) / Number(w.jobsRun) : 0;
  const spanMs = now.getTime() - start.getTime();
  w.onlineShare = spanMs > 0 ? Math.min(1, activity.onlineMs[i] / spanMs) : 0;
  const times = timeInHealth(activity.healthAtStart, activity.healthChanges, start, now);
  w.healthDurations = [...times]
    .map(([name, ms]) => create(HealthStateDurationSchema, { health: HEALTH_STATES[name], duration: durationFromMs(ms) }))
    .sort((a, b) => a.health - b.health);
  return w;
}

/** What registerHostMetrics needs. */
export interface HostMetricsDeps {
  sql: Db;
  logger: Logger;
  /** Whether the database is reachable now (a scrape while it is not reads nothing). */
  connected: () => boolean;
  /** A scrape within this long of the last reads nothing new. */
  cacheMs?: number;
  clock?: () => number;
}

/**
 * The hosts' metrics, read from the database at a scrape (every replica
 * shows every host: aggregate with max, not sum):
 * `treadmill_host_health{host,state}` is 1 for the host's current health and
 * 0 for its other states; `treadmill_host_jobs_total{host}` counts the
 * attempts that ended on the host, `treadmill_host_failures_total{host,class}`
 * those that failed, by reason class (job, user, infrastructure). While the
 * database is away they keep their last values: /metrics still answers.
 */
export function registerHostMetrics(registry: Registry, { sql, logger, connected, cacheMs = 5_000, clock = Date.now }: HostMetricsDeps): void {
  type Tallies = Awaited<ReturnType<typeof hostTallies>>;
  let last: { at: number; read: Promise<Tallies | undefined> } | undefined;
  const tallies = () => {
    if (!connected()) return Promise.resolve(undefined);
    if (!last || clock() - last.at >= cacheMs) {
      const read = hostTallies(sql).catch((err: unknown) => {
        logger.warn({ err }, "cannot read the hosts' metrics");
        return undefined;
      });
      last = { at: clock(), read };
    }
    return last.read;
  };
  /** A collect function that refills the metric from fresh tallies, or leaves it as it was without. */
  const refill =
    <M extends { reset(): void }>(fill: (metric: M, t: Tallies) => void) =>
    async function (this: M) {
      const t = await tallies();
      if (!t) return;
      this.reset();
      fill(this, t);
    };
  new Gauge({
    name: "treadmill_host_health",
    help: "1 for each host's current health state (unknown, checking, healthy, quarantined, retired), 0 for the others.",
    labelNames: ["host", "state"] as const,
    registers: [registry],
    collect: refill((m, t) => {
      for (const h of t.health) for (const state of Object.keys(HEALTH_STATES)) m.set({ host: h.name, state }, state === h.health ? 1 : 0);
    }),
  });
  new Counter({
    name: "treadmill_host_jobs_total",
    help: "Attempts of jobs that ended on each host.",
    labelNames: ["host"] as const,
    registers: [registry],
    collect: refill((m, t) => {
      for (const e of t.ends) m.inc({ host: e.name }, e.n);
    }),
  });
  new Counter({
    name: "treadmill_host_failures_total",
    help: "Attempts of jobs that failed on each host, by reason class (job: the workload's own; user; infrastructure).",
    labelNames: ["host", "class"] as const,
    registers: [registry],
    collect: refill((m, t) => {
      for (const e of t.ends) {
        const end = endClass(e.reason, e.exitStatus);
        if (end !== "success") m.inc({ host: e.name, class: end }, e.n);
      }
    }),
  });
}
