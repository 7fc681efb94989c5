/**
 * SubmitJob's validation of a JobSpec (job.proto): every rule, each refusal an
 * InvalidArgument whose message names the field. Returns the normalised values
 * the job system stores.
 */
import { clone, create } from "@bufbuild/protobuf";
import type { Duration } from "@bufbuild/protobuf/wkt";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostRequirementsSchema, type JobSpec, JobSpecSchema, type Parameter, RetryCondition, type RetryPolicy } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { checkId, checkTags, checkText, clip, invalid } from "../shared/common.js";
import type { JobConfig } from "./config.js";

const PARAMETER_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,63}$/;
const PORT_NAME = /^[a-z][a-z0-9-]{0,31}$/;
const SITE = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const DIGEST = /^sha256:[0-9a-f]{64}$/;
/** An image name as the catalog accepts it, loosely: the catalog decides whether it exists. */
const IMAGE_NAME = /^[a-z0-9][a-z0-9._/-]{0,254}$/;
const IMAGE_TAG = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
const MAX_PARAMETERS = 128;
const MAX_PARAMETER_VALUE = 64 * 1024;
const MAX_PORTS = 16;
const MAX_HOSTS = 64;

/** What a valid spec becomes. */
export interface ValidSpec {
  /** The spec to store and return: secret values blanked. */
  publicSpec: JobSpec;
  /** name -> value of the secret parameters. */
  secrets: Map<string, string>;
  image: { digest: string } | { name: string; tag: string };
  hostCount: number;
  requiredTags: Record<string, string>;
  requiredSite: string | null;
  requiredDriver: string | null;
  priority: number;
  queueTimeoutMs: number;
  jobTimeoutMs: number;
  maxRestarts: number;
  /** How long a failed job's hosts are held (JobSpec.hold_on_failure); null: not held. */
  holdOnFailureMs: number | null;
  /** The lease to run inside (spec.lease_id), or null. */
  leaseId: string | null;
  /** The retry policy (spec.retry): conditions as stored (`workload_failure`), retries per condition, other_host; null: none. */
  retry: { on: string[]; max: number; otherHost: boolean } | null;
}

/** spec.retry, checked: null when unset. */
function checkRetry(retry: RetryPolicy | undefined, holdOnFailure: boolean): ValidSpec["retry"] {
  if (retry === undefined) return null;
  if (retry.on.length === 0) throw invalid("spec.retry.on must name at least one condition");
  const on = retry.on.map((c, i) => {
    if (c === RetryCondition.UNSPECIFIED || RetryCondition[c] === undefined) throw invalid(`spec.retry.on[${i}] is not a retry condition`);
    return RetryCondition[c].toLowerCase();
  });
  if (new Set(on).size !== on.length) throw invalid("spec.retry.on names a condition twice");
  if (!Number.isInteger(retry.max) || retry.max < 1 || retry.max > 10) throw invalid("spec.retry.max must be between 1 and 10");
  // A held job's end is its hold's release: a retry would start over the post-mortem.
  if (holdOnFailure && on.includes("workload_failure")) throw invalid("spec.retry on workload failure and spec.hold_on_failure exclude each other");
  return { on, max: retry.max, otherHost: retry.otherHost };
}

/** Parses `name:tag` (tag defaults to `latest`) or a manifest digest. */
export function parseImageReference(field: string, ref: string): { digest: string } | { name: string; tag: string } {
  if (ref === "") throw invalid(`${field} is required`);
  if (ref.length > 400) throw invalid(`${field} must be at most 400 characters`);
  if (ref.startsWith("sha256:")) {
    if (!DIGEST.test(ref)) throw invalid(`${field} must be sha256:<64 lower-case hex digits>`);
    return { digest: ref };
  }
  const slash = ref.lastIndexOf("/");
  const colon = ref.lastIndexOf(":");
  const [name, tag] = colon > slash ? [ref.slice(0, colon), ref.slice(colon + 1)] : [ref, "latest"];
  if (!IMAGE_NAME.test(name)) throw invalid(`${field} name "${clip(name)}" is not a valid image name`);
  if (!IMAGE_TAG.test(tag)) throw invalid(`${field} tag "${clip(tag)}" is not a valid image tag`);
  return { name, tag };
}

/** Checks a job's parameters (names, values, at most 128); returns name -> value of the secret ones. */
export function checkParameters(field: string, parameters: readonly Parameter[]): Map<string, string> {
  if (parameters.length > MAX_PARAMETERS) throw invalid(`${field} must have at most ${MAX_PARAMETERS} entries`);
  const secrets = new Map<string, string>();
  const names = new Set<string>();
  for (const [i, p] of parameters.entries()) {
    const at = `${field}[${i}]`;
    if (!PARAMETER_NAME.test(p.name)) throw invalid(`${at}.name must match [A-Za-z_][A-Za-z0-9_]{0,63}`);
    if (p.name.toUpperCase().startsWith("TREADMILL_")) throw invalid(`${at}.name must not start with TREADMILL_ (reserved)`);
    if (names.has(p.name)) throw invalid(`${at}.name "${p.name}" is repeated`);
    names.add(p.name);
    if (Buffer.byteLength(p.value, "utf8") > MAX_PARAMETER_VALUE) throw invalid(`${at}.value must be at most 64 KiB`);
    if (p.secret) secrets.set(p.name, p.value);
  }
  return secrets;
}

/** A duration in milliseconds: `fallback` when unset; positive and at most `max`. */
export function durationMs(field: string, d: Duration | undefined, fallback: number, max: number): number {
  if (d === undefined) return fallback;
  if (d.nanos < 0 || d.nanos > 999_999_999) throw invalid(`${field} has invalid nanos`);
  const ms = Number(d.seconds) * 1000 + Math.ceil(d.nanos / 1e6);
  if (!Number.isFinite(ms) || ms <= 0) throw invalid(`${field} must be positive`);
  if (ms > max) throw invalid(`${field} must be at most ${max} ms`);
  return ms;
}

export function validateSpec(spec: JobSpec | undefined, config: JobConfig): ValidSpec {
  if (spec === undefined) throw invalid("spec is required");
  const image = parseImageReference("spec.image", spec.image);

  const hosts = spec.hosts;
  const hostCount = hosts?.hostCount === undefined || hosts.hostCount === 0 ? 1 : hosts.hostCount;
  if (hostCount < 1 || hostCount > MAX_HOSTS) throw invalid(`spec.hosts.host_count must be between 1 and ${MAX_HOSTS}`);
  const requiredTags = checkTags("spec.hosts.tags", hosts?.tags ?? {}, { allowSite: true });
  let requiredSite: string | null = null;
  if (hosts?.site !== undefined) {
    if (!SITE.test(hosts.site)) throw invalid("spec.hosts.site must match [a-z0-9][a-z0-9._-]{0,62}");
    requiredSite = hosts.site;
  }
  const driver = hosts?.driverKind ?? DriverKind.UNSPECIFIED;
  if (DriverKind[driver] === undefined) throw invalid("spec.hosts.driver_kind is not a known driver kind");
  const requiredDriver = driver === DriverKind.UNSPECIFIED ? null : DriverKind[driver].toLowerCase();

  if (!Number.isInteger(spec.priority) || spec.priority < -100 || spec.priority > 100) {
    throw invalid("spec.priority must be between -100 and 100");
  }
  const queueTimeoutMs = durationMs("spec.queue_timeout", spec.queueTimeout, config.defaultQueueTimeoutMs, config.maxQueueTimeoutMs);
  const jobTimeoutMs = durationMs("spec.job_timeout", spec.jobTimeout, config.defaultJobTimeoutMs, config.maxJobTimeoutMs);
  const maxRestarts = spec.restartPolicy?.maxRestarts ?? 0;
  if (maxRestarts < 0 || maxRestarts > 10) throw invalid("spec.restart_policy.max_restarts must be between 0 and 10");

  const secrets = checkParameters("spec.parameters", spec.parameters);
  const holdOnFailureMs =
    spec.holdOnFailure === undefined ? null : durationMs("spec.hold_on_failure", spec.holdOnFailure, 0, config.leaseMaxDurationMs);
  // A multi-host attempt ends at the first end on any host: another host's
  // exit would decide the outcome of a job held on one.
  if (holdOnFailureMs !== null && hostCount > 1) throw invalid("spec.hold_on_failure is only for jobs of one host (spec.hosts.host_count 1)");

  if (spec.exposedPorts.length > MAX_PORTS) throw invalid(`spec.exposed_ports must have at most ${MAX_PORTS} entries`);
  const ports = new Set<string>();
  for (const [i, p] of spec.exposedPorts.entries()) {
    const field = `spec.exposed_ports[${i}]`;
    if (!PORT_NAME.test(p.name)) throw invalid(`${field}.name must match [a-z][a-z0-9-]{0,31}`);
    if (ports.has(p.name)) throw invalid(`${field}.name "${p.name}" is repeated`);
    ports.add(p.name);
    const consoleDefault = p.name === "console" && p.port === 0;
    if (!consoleDefault && (p.port < 1 || p.port > 65535)) throw invalid(`${field}.port must be between 1 and 65535`);
    checkText(`${field}.description`, p.description, 256);
  }
  checkTags("spec.tags", spec.tags, { allowSite: true });
  checkText("spec.description", spec.description, 256);
  const leaseId = spec.leaseId === "" ? null : checkId("spec.lease_id", spec.leaseId);
  const retry = checkRetry(spec.retry, holdOnFailureMs !== null);

  const publicSpec = clone(JobSpecSchema, spec);
  const publicHosts = hosts ? clone(HostRequirementsSchema, hosts) : create(HostRequirementsSchema);
  publicHosts.hostCount = hostCount;
  publicHosts.tags = requiredTags;
  publicSpec.hosts = publicHosts;
  for (const p of publicSpec.parameters) if (p.secret) p.value = "";
  return {
    publicSpec,
    secrets,
    image,
    hostCount,
    requiredTags,
    requiredSite,
    requiredDriver,
    priority: spec.priority,
    queueTimeoutMs,
    jobTimeoutMs,
    maxRestarts,
    holdOnFailureMs,
    leaseId,
    retry,
  };
}
