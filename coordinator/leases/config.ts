/**
 * The lease policy (docs/leases.md), spread into the coordinator's schema
 * (coordinator/config.ts): what a user may ask of LeaseService. Admins are
 * exempt from the per-user limits (duration, concurrent leases, host-hours
 * a day), not from the grace bounds or the horizon. Overrides per host
 * selector (policy.ts parseOverrides) replace the per-user limits for the
 * leases they apply to, which then count among themselves. Keys become `--<key>`
 * flags and `TREADMILL_COORDINATOR_<KEY>` environment variables.
 */
import type { ConfigOf } from "../../lib/config.js";

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

export const leaseConfigFields = {
  leaseMaxDurationMs: {
    type: "duration",
    default: DAY,
    min: MINUTE,
    description: "longest a lease may last from its start, extensions included (admins exempt)",
  },
  leaseMaxConcurrentPerUser: {
    type: "int",
    default: 10,
    min: 1,
    description: "leases of one user not ended at once; CreateLease beyond it answers ResourceExhausted (admins exempt)",
  },
  leaseMaxHostHoursPerDay: {
    type: "int",
    default: 48,
    min: 1,
    description: "host-hours one user's leases may book within one UTC day (hosts times hours; admins exempt)",
  },
  leaseGraceDefaultMs: {
    type: "duration",
    default: 5 * MINUTE,
    min: 1,
    description: "how long a lease survives without a keepalive when CreateLease names no grace period",
  },
  leaseGraceMinMs: {
    type: "duration",
    default: 30_000,
    min: 1,
    description: "shortest grace period a lease may ask for",
  },
  leaseGraceMaxMs: {
    type: "duration",
    default: HOUR,
    min: 1,
    description: "longest grace period a lease may ask for",
  },
  leasePolicyOverrides: {
    type: "list",
    default: [],
    description:
      "per host selector, limits instead of the three above for leases asking for hosts with these tags, first match wins: TAGS;max-duration=D;max-concurrent=N;max-host-hours-per-day=N, tags k=v joined by & (e.g. board=big&site=lab-a;max-duration=2h)",
  },
  leaseHorizonMs: {
    type: "duration",
    default: 30 * DAY,
    min: MINUTE,
    description: "how far ahead a lease may start",
  },
  leaseSweepIntervalMs: {
    type: "duration",
    default: 1000,
    min: 10,
    description: "period of the lease keeper: activation, expiry, lost keepalives, deadlines, booking of requested leases",
  },
  leaseKeepaliveIntervalMs: {
    type: "duration",
    default: 10_000,
    min: 10,
    description: "how often an open WatchLease keepalive stream renews its lease (at most a third of the lease's grace period)",
  },
} as const;

/** The lease policy as loaded. */
export type LeaseConfig = ConfigOf<typeof leaseConfigFields>;
