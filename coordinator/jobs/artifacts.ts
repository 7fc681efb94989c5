/**
 * Jobs' artifacts on the coordinator (docs/artifacts.md): only their listing
 * lives here (migration 0023); the bytes are in an image store, one store
 * manifest per (job, attempt, host) listing them, which keeps them from the
 * store's garbage collection until retention deletes it (artifact-keeper.ts).
 *
 * - JobArtifactsReport (supervisor stream, after the stream's earlier
 *   reports committed): the set a host uploaded, recorded once per (job,
 *   attempt, host), with a JOB_EVENT_KIND_ARTIFACTS timeline event naming
 *   what was uploaded and what was skipped; acknowledged by AckReport.
 * - ListJobArtifacts / GetJobArtifactAccess: who may is who may GetJob; the
 *   access is an image:read token per manifest, minted for the caller with
 *   the job's owner (the uploader) as holder, so it reads those blobs only.
 * - Inputs: SubmitJob resolves `artifact:<job>/<name>` to a digest the caller
 *   may read; StartJob carries each with a read token of its manifest.
 * - StartJob's ArtifactTarget: the live image store with the most room and
 *   an image:write token minted for the job's owner.
 */
import { recordFeedEvent } from "../db/queries/feed.js";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import { type Artifact, ArtifactSchema, type JobInput, JobInputSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import {
  type ArtifactTarget,
  ArtifactTargetSchema,
  type AttachResponse,
  AttachResponseSchema,
  type JobArtifactsReport,
  type JobInputSource,
  JobInputSourceSchema,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { formatBytes } from "../../lib/bytes.js";
import type { HostCaller, UserCaller } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import {
  artifactNamed,
  artifactStore,
  artifactsOf,
  insertArtifactSet,
  newestArtifactAttempt,
  setsOf,
} from "../db/queries/artifacts.js";
import { type EventInput, recordEvent } from "../db/queries/events.js";
import { type Db, type JobRow, loadJob } from "../db/queries/jobs.js";
import { lockJobOfPart } from "../db/queries/log-parts.js";
import { checkId, checkText, denied, invalid, notFound, precondition, uuidv7 } from "../shared/common.js";
import type { SupervisorHandlers } from "./stream-handlers.js";

const DIGEST = /^sha256:[0-9a-f]{64}$/;
const MEDIA_TYPE = /^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$/;
/** An input's file name: one path component, no leading dot. */
const INPUT_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;
const SOURCE = /^artifact:([0-9a-f-]{36})\/(.+)$/;
const MAX_FILES = 128;
const MAX_INPUTS = 32;
/** Skipped files named on the timeline; the rest are counted. */
const SKIPPED_SHOWN = 10;

/** Whether `name` is an artifact name: a relative `/`-separated path without `.`/`..` parts or control characters. */
export function isArtifactName(name: string): boolean {
  if (name.length === 0 || name.length > 1024 || name.startsWith("/")) return false;
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f\\]/.test(name)) return false;
  return name.split("/").every((part) => part !== "" && part !== "." && part !== "..");
}

function printable(text: string, max: number): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f]+/g, " ").trim().slice(0, max);
}

/** Registers the stream's JobArtifactsReport (after the reports before it committed). */
export function registerArtifactHandlers(ctx: CoordinatorContext, handlers: SupervisorHandlers): void {
  handlers.on("jobArtifactsReport", { afterCommits: true, handle: (host, r) => onJobArtifactsReport(ctx, host, r) });
}

/**
 * Records a host's JobArtifactsReport and answers its AckReport. Malformed:
 * InvalidArgument (it ends the stream, as any malformed message does). A
 * report of an attempt that never ran on this host, or repeated, is
 * acknowledged and changes nothing.
 */
export async function onJobArtifactsReport(ctx: CoordinatorContext, host: HostCaller, r: JobArtifactsReport): Promise<AttachResponse> {
  checkId("job_artifacts_report.job_id", r.jobId);
  if (r.attempt < 1) throw invalid("job_artifacts_report.attempt must be at least 1");
  checkText("job_artifacts_report.report_id", r.reportId, 64);
  if (r.files.length > MAX_FILES) throw invalid(`job_artifacts_report.files must have at most ${MAX_FILES} entries`);
  const names = new Set<string>();
  const files = r.files.map((f, i) => {
    const field = `job_artifacts_report.files[${i}]`;
    if (!isArtifactName(f.name)) throw invalid(`${field}.name must be a relative path without . or .. parts`);
    if (names.has(f.name)) throw invalid(`${field}.name "${f.name}" is repeated`);
    names.add(f.name);
    if (!DIGEST.test(f.digest)) throw invalid(`${field}.digest must be sha256:<64 lower-case hex digits>`);
    if (f.sizeBytes < 0n) throw invalid(`${field}.size_bytes must not be negative`);
    const mediaType = f.mediaType === "" ? "application/octet-stream" : f.mediaType;
    if (!MEDIA_TYPE.test(mediaType)) throw invalid(`${field}.media_type is not a media type`);
    return { name: f.name, size: f.sizeBytes, digest: f.digest, mediaType };
  });
  if (files.length > 0) {
    if (!DIGEST.test(r.manifestDigest)) throw invalid("job_artifacts_report.manifest_digest must be sha256:<64 lower-case hex digits>");
    if (r.uploadUrl === "" || r.uploadUrl.length > 2048) throw invalid("job_artifacts_report.upload_url must be a url of at most 2048 characters");
  }
  const actor = `host:${host.hostName}`;
  await ctx.sql.begin(async (tx) => {
    const job = await lockJobOfPart(tx, { jobId: r.jobId, attempt: r.attempt, hostId: host.hostId });
    if (!job) return;
    const recorded = await insertArtifactSet(
      tx,
      {
        id: uuidv7(ctx.clock()),
        jobId: r.jobId,
        attempt: r.attempt,
        hostId: host.hostId,
        ownerId: job.owner_id,
        reportId: r.reportId,
        manifestDigest: files.length > 0 ? r.manifestDigest : "",
        storeUrl: files.length > 0 ? r.uploadUrl : "",
      },
      files,
    );
    if (!recorded) return;
    await recordEvent(tx, {
      jobId: r.jobId,
      // job_events.kind is free text; the timeline maps it to JOB_EVENT_KIND_ARTIFACTS.
      kind: "artifacts" as EventInput["kind"],
      state: job.state,
      attempt: r.attempt,
      hostId: host.hostId,
      actor,
      ownerId: job.owner_id,
      message: reportMessage(r, files, host.hostName),
    });
    // The feed's job.artifacts event (docs/events.md): what this host uploaded.
    await recordFeedEvent(tx, {
      kind: "job.artifacts",
      jobId: r.jobId,
      hostId: host.hostId,
      payload: { job_id: r.jobId, attempt: r.attempt, count: files.length, bytes: Number(files.reduce((sum, f) => sum + f.size, 0n)) },
    });
    ctx.logger.info(
      { jobId: r.jobId, attempt: r.attempt, hostId: host.hostId, files: files.length, skipped: r.skipped.length },
      "job artifacts recorded",
    );
  });
  return create(AttachResponseSchema, {
    payload: { case: "ackReport", value: { reportId: r.reportId, jobId: r.jobId, attempt: r.attempt, terminal: false } },
  });
}

/** The timeline line of a report: what was uploaded, what was skipped and why, a failure. */
function reportMessage(r: JobArtifactsReport, files: { size: bigint }[], hostName: string): string {
  const total = files.reduce((sum, f) => sum + f.size, 0n);
  const parts = [`artifacts: ${files.length} file${files.length === 1 ? "" : "s"} (${formatBytes(total)}) uploaded from host ${hostName}`];
  for (const s of r.skipped.slice(0, SKIPPED_SHOWN)) {
    parts.push(`skipped ${printable(s.name, 256)} (${formatBytes(s.sizeBytes)}): ${printable(s.reason, 256)}`);
  }
  if (r.skipped.length > SKIPPED_SHOWN) parts.push(`and ${r.skipped.length - SKIPPED_SHOWN} more skipped`);
  if (r.error !== "") parts.push(`upload failed: ${printable(r.error, 1024)}`);
  return parts.join("; ");
}

/** The attempt a request names: its own, or (0) the newest with artifacts, else the job's current one. */
async function attemptOf(sql: Db, job: JobRow, attempt: number): Promise<number> {
  if (!Number.isInteger(attempt) || attempt < 0) throw invalid("attempt must not be negative");
  if (attempt > 0) {
    if (attempt > job.attempt) throw notFound(`job ${job.id} has no attempt ${attempt}`);
    return attempt;
  }
  return (await newestArtifactAttempt(sql, job.id)) ?? job.attempt;
}

function artifactMessage(row: Awaited<ReturnType<typeof artifactsOf>>[number]): Artifact {
  return create(ArtifactSchema, {
    jobId: row.job_id,
    attempt: row.attempt,
    name: row.name,
    sizeBytes: BigInt(row.size_bytes),
    digest: row.digest,
    mediaType: row.media_type,
    manifestDigest: row.manifest_digest,
    storeUrl: row.store_url,
    createTime: timestampFromDate(row.created_at),
  });
}

/** ListJobArtifacts of a job the caller may see. */
export async function listJobArtifacts(ctx: CoordinatorContext, job: JobRow, attempt: number) {
  const at = await attemptOf(ctx.sql, job, attempt);
  const rows = await artifactsOf(ctx.sql, job.id, at);
  return { attempt: at, artifacts: rows.map(artifactMessage), totalBytes: rows.reduce((sum, r) => sum + BigInt(r.size_bytes), 0n) };
}

/** An image:read token of `manifest` held by `holder`, for `subject`. */
async function readToken(ctx: CoordinatorContext, manifest: string, holder: string, subject: string, ttlMs: number) {
  const token = await ctx.keys.sign({ scope: "image:read", digest: manifest, holder }, ttlMs, { subject, audience: "image" });
  return { token, scope: CapabilityScope.IMAGE_READ, expireTime: timestampFromMs(ctx.clock() + ttlMs) };
}

/** GetJobArtifactAccess of a job the caller may see. */
export async function jobArtifactAccess(ctx: CoordinatorContext, caller: UserCaller, job: JobRow, attempt: number) {
  const at = await attemptOf(ctx.sql, job, attempt);
  const sets = await setsOf(ctx.sql, job.id, at);
  if (sets.length === 0) throw precondition(`job ${job.id} attempt ${at} has no artifacts`);
  const ttl = ctx.config.imageTokenTtlMs;
  return {
    attempt: at,
    access: await Promise.all(
      sets.map(async (s) => ({
        manifestDigest: s.manifest_digest,
        storeUrl: s.store_url,
        readToken: await readToken(ctx, s.manifest_digest, s.owner_id, caller.userId, ttl),
      })),
    ),
  };
}

/**
 * SubmitJob's inputs, resolved: each `artifact:<job>/<name>` to the newest
 * live artifact of that name in a job the caller may see (NotFound when the
 * job or the artifact is missing, PermissionDenied when the job is
 * another's), with its digest, size and attempt set.
 */
export async function resolveInputs(sql: Db, caller: UserCaller, inputs: readonly JobInput[]): Promise<JobInput[]> {
  if (inputs.length > MAX_INPUTS) throw invalid(`spec.inputs must have at most ${MAX_INPUTS} entries`);
  const names = new Set<string>();
  const resolved: JobInput[] = [];
  for (const [i, input] of inputs.entries()) {
    const field = `spec.inputs[${i}]`;
    if (!INPUT_NAME.test(input.name)) throw invalid(`${field}.name must be 1 to 128 characters of [A-Za-z0-9._-], not starting with a dot`);
    if (names.has(input.name)) throw invalid(`${field}.name "${input.name}" is repeated`);
    names.add(input.name);
    const m = SOURCE.exec(input.source);
    if (!m || !isArtifactName(m[2])) throw invalid(`${field}.source must be artifact:<job id>/<artifact name>`);
    const [, jobId, name] = m;
    checkId(`${field}.source job id`, jobId);
    const job = await loadJob(sql, jobId, {});
    if (!job) throw notFound(`${field}.source: job ${jobId} not found`);
    if (caller.role !== "admin" && job.owner_id !== caller.userId) throw denied(`${field}.source: job ${jobId} belongs to another user`);
    const artifact = await artifactNamed(sql, jobId, name);
    if (!artifact) throw notFound(`${field}.source: job ${jobId} has no artifact named ${name}`);
    resolved.push(
      create(JobInputSchema, {
        name: input.name,
        source: input.source,
        digest: artifact.digest,
        sizeBytes: BigInt(artifact.size_bytes),
        sourceAttempt: artifact.attempt,
      }),
    );
  }
  return resolved;
}

/**
 * StartJob's inputs: each resolved input with the store holding it and a
 * read token of its manifest (for the job's owner, valid `ttlMs`). An input
 * whose artifact was removed meanwhile is left out; the supervisor then
 * fails the attempt naming it (it checks every input of the spec arrived).
 */
export async function inputSources(ctx: CoordinatorContext, inputs: readonly JobInput[], ownerId: string, ttlMs: number): Promise<JobInputSource[]> {
  const out: JobInputSource[] = [];
  for (const input of inputs) {
    const m = SOURCE.exec(input.source);
    if (!m) continue;
    const artifact = await artifactNamed(ctx.sql, m[1], m[2]);
    if (!artifact || artifact.digest !== input.digest) continue;
    out.push(
      create(JobInputSourceSchema, {
        name: input.name,
        digest: artifact.digest,
        sizeBytes: BigInt(artifact.size_bytes),
        storeUrl: artifact.store_url,
        readToken: await readToken(ctx, artifact.manifest_digest, artifact.owner_id, ownerId, ttlMs),
      }),
    );
  }
  return out;
}

/** StartJob's ArtifactTarget: where the attempt's artifacts go; undefined when no store is live. */
export async function artifactTarget(ctx: CoordinatorContext, ownerId: string, ttlMs: number): Promise<ArtifactTarget | undefined> {
  const url = await artifactStore(ctx.sql);
  if (url === undefined) return undefined;
  const token = await ctx.keys.sign({ scope: "image:write" }, ttlMs, { subject: ownerId, audience: "image" });
  const c = ctx.config;
  return create(ArtifactTargetSchema, {
    uploadUrl: url,
    writeToken: { token, scope: CapabilityScope.IMAGE_WRITE, expireTime: timestampFromMs(ctx.clock() + ttlMs) },
    maxFileBytes: BigInt(c.artifactMaxFileBytes),
    maxJobBytes: BigInt(c.artifactMaxJobBytes),
    maxFiles: c.artifactMaxFiles,
  });
}
