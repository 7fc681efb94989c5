/** How values are shown: enum names, times, sizes, durations. */
import type { DescEnum } from "@bufbuild/protobuf";
import { timestampMs, type Timestamp } from "@bufbuild/protobuf/wkt";
import { HostHealth } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import {
  ExitStatus,
  JobState,
  type Job,
  ExitStatusSchema,
  FinalizeReasonSchema,
  JobStageSchema,
  JobStateSchema,
} from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { type Lease, LeaseEndReason, LeaseEndReasonSchema, LeaseState, LeaseStateSchema } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";

/** `JOB_STATE_RUNNING` -> `running`, from the enum's descriptor. */
export function enumWord(schema: DescEnum, value: number): string {
  const v = schema.values.find((x) => x.number === value);
  if (!v || v.number === 0) return "";
  return v.localName.toLowerCase().replace(/_/g, " ");
}

export const stateWord = (s: JobState) => enumWord(JobStateSchema, s);

/** A job's state for listings: `running`, `initializing (fetching image)`, `finalized: canceled`. */
export function jobStatus(job: Job): string {
  if (job.state === JobState.INITIALIZING && job.stage) return `initializing (${enumWord(JobStageSchema, job.stage)})`;
  if (job.state === JobState.FINALIZED) {
    const reason = enumWord(FinalizeReasonSchema, job.finalizeReason);
    const exit = enumWord(ExitStatusSchema, job.exitStatus);
    return exit ? `${exit}${job.exitCode !== undefined ? ` (exit ${job.exitCode})` : ""}` : reason || "finalized";
  }
  return stateWord(job.state);
}

/** A CSS class for a job's state badge. */
export function jobTone(job: Job): string {
  if (job.state !== JobState.FINALIZED) return job.state === JobState.RUNNING ? "tone-run" : "tone-wait";
  return job.exitStatus === ExitStatus.SUCCESS ? "tone-ok" : "tone-bad";
}

/** A CSS class for a host's health badge. */
export function healthTone(health: HostHealth): string {
  if (health === HostHealth.HEALTHY) return "tone-ok";
  if (health === HostHealth.QUARANTINED) return "tone-bad";
  if (health === HostHealth.CHECKING) return "tone-run";
  return health === HostHealth.RETIRED ? "muted" : "tone-wait";
}

export function ms(t: Timestamp | undefined): number | undefined {
  return t === undefined ? undefined : timestampMs(t);
}

/** A local date and time, to the second. */
export function when(t: Timestamp | undefined): string {
  const v = ms(t);
  if (v === undefined) return "";
  const d = new Date(v);
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A machine-readable time attribute for <time>. */
export function iso(t: Timestamp | undefined): string {
  const v = ms(t);
  return v === undefined ? "" : new Date(v).toISOString();
}

export function bytes(n: bigint | number): string {
  let v = Number(n);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

/** `abc...` : the first 8 characters of an id, the whole in a title. */
export function shortId(id: string): string {
  return id.length > 8 ? id.slice(-8) : id;
}

export function shortDigest(d: string): string {
  return d.startsWith("sha256:") ? `sha256:${d.slice(7, 19)}` : d;
}

/** `a=b, c=d` from a tag map. */
export function tagsText(tags: Record<string, string>): string {
  return Object.entries(tags)
    .map(([k, v]) => `${k}=${v}`)
    .join(", ");
}

/**
 * Parses `key=value` pairs separated by commas or spaces; throws with a
 * message naming the bad pair.
 */
export function parseTags(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const pair of text.split(/[\s,]+/).filter((p) => p !== "")) {
    const eq = pair.indexOf("=");
    if (eq <= 0) throw new Error(`"${pair}" is not key=value`);
    out[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  return out;
}

/** `90s`, `10m`, `1h30m`, or plain seconds -> seconds; throws on anything else. */
export function parseDuration(text: string): number {
  const t = text.trim();
  if (/^\d+$/.test(t)) return Number(t);
  const re = /(\d+)(h|m|s)/gy;
  let total = 0;
  let matched = 0;
  for (let m = re.exec(t); m !== null; m = re.exec(t)) {
    total += Number(m[1]) * { h: 3600, m: 60, s: 1 }[m[2] as "h" | "m" | "s"];
    matched = re.lastIndex;
  }
  if (t === "" || matched !== t.length) throw new Error(`"${text}" is not a duration like 90s, 10m or 1h30m`);
  return total;
}

/** A lease's state for listings: `active`, `waiting`, `ended (revoked)`. */
export function leaseStatus(lease: Lease): string {
  if (lease.state === LeaseState.ENDED) return `ended (${enumWord(LeaseEndReasonSchema, lease.endReason) || "ended"})`;
  return enumWord(LeaseStateSchema, lease.state);
}

/** A CSS class for a lease's state badge. */
export function leaseTone(lease: Lease): string {
  if (lease.state === LeaseState.ACTIVE) return "tone-run";
  if (lease.state !== LeaseState.ENDED) return "tone-wait";
  return lease.endReason === LeaseEndReason.RELEASED || lease.endReason === LeaseEndReason.EXPIRED ? "tone-ok" : "tone-bad";
}

/** A lease's booked hosts by name, or what it asked for while none is booked ("2 × board=x"). */
export function leaseHosts(lease: Lease): string {
  if (lease.leaseHosts.length > 0) return lease.leaseHosts.map((x) => x.hostName || x.hostId).join(", ");
  if (lease.hostNames.length > 0) return lease.hostNames.join(", ");
  return `${Math.max(1, lease.hosts?.hostCount ?? 1)} × ${tagsText(lease.hosts?.tags ?? {}) || "any host"}`;
}
