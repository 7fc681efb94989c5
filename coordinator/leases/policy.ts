/**
 * The lease rules that need no database (docs/leases.md): the limits of
 * the lease policy (config.ts) on a new or extended lease, what the keeper
 * does with a lease that came due, and how often a keepalive stream renews.
 * Pure: the service and the keeper read the rows and carry the decisions
 * out.
 */
import type { LeaseStateName } from "../db/queries/leases.js";
import type { LeaseConfig } from "./config.js";

const HOUR = 3600_000;
const DAY = 24 * HOUR;

/** A booking's span and size: what counts toward host-hours. */
export interface Span {
  starts_at: Date;
  ends_at: Date;
  host_count: number;
}

/** The UTC days [start, start + 1 day) that [from, to) touches, by their start. */
export function daysOf(from: Date, to: Date): Date[] {
  const days: Date[] = [];
  for (let d = Math.floor(from.getTime() / DAY) * DAY; d < to.getTime(); d += DAY) days.push(new Date(d));
  return days;
}

/** Host-hours of `spans` within the UTC day starting at `day`. */
export function hostHoursOn(day: Date, spans: readonly Span[]): number {
  const d0 = day.getTime();
  const d1 = d0 + DAY;
  let ms = 0;
  for (const s of spans) ms += Math.max(0, Math.min(d1, s.ends_at.getTime()) - Math.max(d0, s.starts_at.getTime())) * s.host_count;
  return ms / HOUR;
}

/**
 * The first UTC day on which `proposed` and a user's other leases `others`
 * together book more than `limit` host-hours, with that day's total; or
 * undefined when none does.
 */
export function hostHoursOver(proposed: Span, others: readonly Span[], limit: number): { day: Date; hours: number } | undefined {
  for (const day of daysOf(proposed.starts_at, proposed.ends_at)) {
    const hours = hostHoursOn(day, [...others, proposed]);
    if (hours > limit + 1e-9) return { day, hours };
  }
  return undefined;
}

/** "2h30m", "45m", "50s", "300ms": a duration as people read it. */
export function humanDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${Math.round(ms / 1000)}s`;
  const h = Math.floor(ms / HOUR);
  const m = Math.round((ms % HOUR) / 60_000);
  return h === 0 ? `${m}m` : m === 0 ? `${h}h` : `${h}h${m}m`;
}

/** Why a grace period is refused, or undefined. */
export function graceProblem(ms: number, config: LeaseConfig): string | undefined {
  if (ms < config.leaseGraceMinMs || ms > config.leaseGraceMaxMs) {
    return `grace_period must be between ${humanDuration(config.leaseGraceMinMs)} and ${humanDuration(config.leaseGraceMaxMs)}`;
  }
  return undefined;
}

/** What the keeper does with a lease that came due. */
export type KeeperAction = "unserved" | "expired" | "lost" | "book" | "activate" | "none";

/** The facts the keeper reads of a due lease (db/queries/leases.ts LeaseDue). */
export interface DueFacts {
  state: LeaseStateName;
  started: boolean;
  over: boolean;
  pastDeadline: boolean;
  silent: boolean;
}

/**
 * The keeper's decision: a lease not yet ACTIVE by its deadline (its end
 * when none) is UNSERVED; an ACTIVE one past its end EXPIRED; one without a
 * keepalive for its grace period (counted from its start) LOST; a REQUESTED
 * one is booked again; a WAITING one whose start has come is activated when
 * its hosts are free.
 */
export function decide(f: DueFacts): KeeperAction {
  if (f.state === "ended") return "none";
  if (f.state !== "active" && f.pastDeadline) return "unserved";
  if (f.state === "active" && f.over) return "expired";
  if (f.silent) return "lost";
  if (f.state === "requested") return "book";
  if (f.state === "waiting" && f.started) return "activate";
  return "none";
}

/** How often an open keepalive stream renews a lease of grace `graceMs`: the configured interval, at most a third of the grace. */
export function renewEveryMs(graceMs: number, config: Pick<LeaseConfig, "leaseKeepaliveIntervalMs">): number {
  return Math.max(10, Math.min(config.leaseKeepaliveIntervalMs, Math.floor(graceMs / 3)));
}
