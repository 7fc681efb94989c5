/**
 * The lease rules that need no database (docs/leases.md): the limits of
 * the lease policy (config.ts) on a new or extended lease, what the keeper
 * does with a lease that came due, and how often a keepalive stream renews.
 * Pure: the service and the keeper read the rows and carry the decisions
 * out.
 */
import { parseDuration } from "../../lib/config.js";
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
export type KeeperAction = "unserved" | "expired" | "lost" | "held-job-ended" | "book" | "activate" | "none";

/** The facts the keeper reads of a due lease (db/queries/leases.ts LeaseDue). */
export interface DueFacts {
  state: LeaseStateName;
  started: boolean;
  over: boolean;
  pastDeadline: boolean;
  silent: boolean;
  /** A hold lease whose held job is finalized (its end could not take the lease's lock). */
  heldJobEnded?: boolean;
}

/**
 * The keeper's decision: a lease not yet ACTIVE by its deadline (its end
 * when none) is UNSERVED; an ACTIVE one past its end EXPIRED; one without a
 * keepalive for its grace period (counted from its start) LOST; a hold
 * whose job has ended (the job's end left a lease it found locked) RELEASED;
 * a REQUESTED
 * one is booked again; a WAITING one whose start has come is activated when
 * its hosts are free.
 */
export function decide(f: DueFacts): KeeperAction {
  if (f.state === "ended") return "none";
  if (f.state !== "active" && f.pastDeadline) return "unserved";
  if (f.state === "active" && f.over) return "expired";
  if (f.heldJobEnded) return "held-job-ended";
  if (f.silent) return "lost";
  if (f.state === "requested") return "book";
  if (f.state === "waiting" && f.started) return "activate";
  return "none";
}

/** How often an open keepalive stream renews a lease of grace `graceMs`: the configured interval, at most a third of the grace. */
export function renewEveryMs(graceMs: number, config: Pick<LeaseConfig, "leaseKeepaliveIntervalMs">): number {
  return Math.max(10, Math.min(config.leaseKeepaliveIntervalMs, Math.floor(graceMs / 3)));
}

/** Limits for the leases asking for hosts with `tags` (config leasePolicyOverrides). */
export interface PolicyOverride {
  tags: Record<string, string>;
  maxDurationMs?: number;
  maxConcurrent?: number;
  maxHostHoursPerDay?: number;
}

const OVERRIDE_KEYS = { "max-duration": "maxDurationMs", "max-concurrent": "maxConcurrent", "max-host-hours-per-day": "maxHostHoursPerDay" } as const;

/**
 * Parses `board=big&site=lab-a;max-duration=2h;max-concurrent=1` items;
 * every problem is reported, naming the item.
 */
export function parseOverrides(items: readonly string[]): { overrides: PolicyOverride[]; problems: string[] } {
  const overrides: PolicyOverride[] = [];
  const problems: string[] = [];
  for (const item of items) {
    const [selector, ...limits] = item.split(";").map((p) => p.trim());
    const o: PolicyOverride = { tags: {} };
    const wrong = (what: string) => problems.push(`lease-policy-overrides: "${item}": ${what}`);
    for (const pair of selector.split("&").filter((p) => p !== "")) {
      const [k, v, ...rest] = pair.split("=");
      if (!k || v === undefined || rest.length > 0) wrong(`tag "${pair}" is not key=value`);
      else o.tags[k] = v;
    }
    if (Object.keys(o.tags).length === 0) wrong("names no tag");
    for (const limit of limits) {
      const [k, v] = limit.split("=");
      const key = OVERRIDE_KEYS[k as keyof typeof OVERRIDE_KEYS];
      if (key === undefined) {
        wrong(`"${k}" is not one of ${Object.keys(OVERRIDE_KEYS).join(", ")}`);
        continue;
      }
      const n = key === "maxDurationMs" ? parseDuration(v ?? "") : /^\d+$/.test(v ?? "") ? Number(v) : undefined;
      if (n === undefined || n < 1) wrong(`${k} must be ${key === "maxDurationMs" ? "a duration like 2h" : "a positive integer"}`);
      else o[key] = n;
    }
    if (limits.length === 0) wrong("sets no limit");
    overrides.push(o);
  }
  return { overrides, problems };
}

/** The per-user limits of a lease asking for hosts with `tags`, and the tags of the leases they count among (null: all). */
export interface Limits {
  maxDurationMs: number;
  maxConcurrent: number;
  maxHostHoursPerDay: number;
  scope: Record<string, string> | null;
  /** Says where the limits come from, for refusals. */
  source: string;
}

/** The first override whose tags `tags` include supplies its limits over the global ones. */
export function limitsFor(tags: Record<string, string>, overrides: readonly PolicyOverride[], config: LeaseConfig): Limits {
  const o = overrides.find((x) => Object.entries(x.tags).every(([k, v]) => tags[k] === v));
  const base = { maxDurationMs: config.leaseMaxDurationMs, maxConcurrent: config.leaseMaxConcurrentPerUser, maxHostHoursPerDay: config.leaseMaxHostHoursPerDay };
  if (!o) return { ...base, scope: null, source: "lease policy" };
  return {
    maxDurationMs: o.maxDurationMs ?? base.maxDurationMs,
    maxConcurrent: o.maxConcurrent ?? base.maxConcurrent,
    maxHostHoursPerDay: o.maxHostHoursPerDay ?? base.maxHostHoursPerDay,
    scope: o.tags,
    source: `lease policy for ${Object.entries(o.tags)
      .map(([k, v]) => `${k}=${v}`)
      .join(",")}`,
  };
}
