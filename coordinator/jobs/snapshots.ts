/**
 * JobService.SnapshotJob (DESIGN.md §6): a running, single-host job's state
 * becomes a new image, registered in the catalog as `name:tag`, private to
 * the caller, with `source_job_id` set.
 *
 * The operation lives in the table `snapshots` (migration 0005). SnapshotJob
 * validates and inserts it PENDING, with the upload target chosen once (the
 * site's live image cache, else the first store holding the job's image), and
 * notifies 'treadmill_snapshots' with the host id. The replica holding that
 * host's stream sends TakeSnapshot (with a fresh `image:write` token), once
 * per stream: a supervisor that attaches again anywhere gets every pending
 * snapshot of its host again (it answers a repeated one from what it
 * remembers). The supervisor's SnapshotResult, on whichever replica holds the
 * stream, registers the image and ends the operation; every step is a
 * timeline event of the job (which wakes waiters on any replica through
 * 'treadmill_jobs').
 *
 * A snapshot whose host stayed detached longer than the grace period fails
 * (nothing can answer it any more); otherwise the supervisor always answers,
 * also when the job ended meanwhile (it then says so).
 *
 * Possession (docs/images.md): TakeSnapshot's write token is minted for the
 * job's owner, who thus holds the new layer and manifest at the upload
 * target; the supervisor mounts the base layers with the job's image token
 * (minted for the owner too, coordinator/jobs/commands.ts). The image is
 * registered with the job's owner as its holder.
 */
import { create } from "@bufbuild/protobuf";
import type { TransactionSql } from "postgres";
import { timestampFromDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext } from "@connectrpc/connect";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import { type Snapshot, SnapshotSchema, SnapshotState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import type { SnapshotJobRequest } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { AttachResponseSchema, type SnapshotResult } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { actorOf } from "../audit.js";
import { audit } from "../db/queries/audit.js";
import type { HostCaller, UserCaller } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import {
  checkId,
  checkMediaTypes,
  checkName,
  checkTag,
  checkText,
  clipText,
  denied,
  exists,
  invalid,
  isUniqueViolation,
  notFound,
  precondition,
  uuidv7,
} from "../shared/common.js";
import type { JobConfig } from "./config.js";
import { type EventInput, recordEvent } from "../db/queries/events.js";
import { type Db, loadJob } from "../db/queries/jobs.js";
import {
  type SnapshotRow,
  type UploadTarget,
  failSnapshotRow,
  firstStoreOf,
  hostGoneFor,
  imageExists,
  insertSnapshot,
  jobStateOf,
  liveSiteCache,
  lockSnapshotOfHost,
  notifySnapshots,
  pendingSnapshotsOfHost,
  registerSnapshotImage,
  snapshot,
  snapshotBase,
  snapshotHost,
  snapshotOfRequest,
  succeedSnapshot,
} from "../db/queries/snapshots.js";
import { HostDelivery } from "./host-delivery.js";
import { waitOperation } from "./operation-wait.js";
import type { HostSession } from "./session.js";
import type { SupervisorHandlers } from "./stream-handlers.js";
import type { SupervisorStreams } from "./supervisor-stream.js";
import type { JobWatchers } from "./watchers.js";

const DIGEST = /^sha256:[0-9a-f]{64}$/;

/** A pending snapshot as delivered, with its job's owner (the holder of the upload). */
type PendingSnapshot = SnapshotRow & { job_owner_id: string };

/** Timeline kinds of snapshots (job.proto JobEventKind SNAPSHOT_*). */
type SnapshotEventKind = "snapshot_requested" | "snapshot_succeeded" | "snapshot_failed";

const STATES: Record<SnapshotRow["state"], SnapshotState> = {
  pending: SnapshotState.PENDING,
  succeeded: SnapshotState.SUCCEEDED,
  failed: SnapshotState.FAILED,
};

function snapshotMessage(row: SnapshotRow): Snapshot {
  return create(SnapshotSchema, {
    id: row.id,
    jobId: row.job_id,
    attempt: row.attempt,
    name: row.name,
    tag: row.tag,
    state: STATES[row.state],
    message: row.message,
    manifestDigest: row.manifest_digest,
    createTime: timestampFromDate(row.created_at),
    finishTime: row.finished_at ? timestampFromDate(row.finished_at) : undefined,
  });
}

async function snapshotEvent(tx: Db, row: SnapshotRow, kind: SnapshotEventKind, message: string, actor: string): Promise<void> {
  const state = await jobStateOf(tx, row.job_id);
  await recordEvent(tx, {
    jobId: row.job_id,
    // recordEvent's kinds predate snapshots; job_events.kind is free text and
    // the timeline maps these to JOB_EVENT_KIND_SNAPSHOT_*.
    kind: kind as EventInput["kind"],
    state: state ?? "finalized",
    attempt: row.attempt,
    hostId: row.host_id,
    actor,
    ownerId: row.owner_id,
    message,
  });
}

/** Ends a pending snapshot FAILED (in `tx`, the row locked). */
async function failSnapshot(tx: Db, row: SnapshotRow, message: string, actor: string): Promise<void> {
  const why = clipText(message, 1024);
  await failSnapshotRow(tx, row.id, why);
  await snapshotEvent(tx, row, "snapshot_failed", `snapshot ${row.name}:${row.tag} failed: ${why}`, actor);
}

/**
 * The supervisor's SnapshotResult (the `snapshotResult` case of the stream):
 * registers the image and ends the operation, or ends it FAILED. Idempotent:
 * a result for an operation already ended, or of another host, changes
 * nothing. A malformed result is InvalidArgument (it ends the stream, as any
 * malformed message does).
 */
export async function onSnapshotResult(ctx: CoordinatorContext, host: HostCaller, result: SnapshotResult): Promise<void> {
  checkId("snapshot_result.snapshot_id", result.snapshotId);
  const actor = `host:${host.hostName}`;
  let ok: { digest: string; mediaTypes: string[]; size: bigint } | undefined;
  if (result.ok) {
    if (!DIGEST.test(result.manifestDigest)) throw invalid("snapshot_result.manifest_digest must be sha256:<64 lower-case hex digits>");
    if (result.sizeBytes < 0n) throw invalid("snapshot_result.size_bytes must not be negative");
    const mediaTypes = checkMediaTypes("snapshot_result.media_types", result.mediaTypes, { required: true });
    ok = { digest: result.manifestDigest, mediaTypes, size: result.sizeBytes };
  }
  await ctx.sql.begin(async (tx) => {
    const row = await lockSnapshotOfHost(tx, result.snapshotId, host.hostId);
    if (!row || row.state !== "pending") return;
    if (!ok) {
      const code = Code[result.errorCode] ?? "Unknown";
      await failSnapshot(tx, row, `${result.errorMessage.slice(0, 1000) || "the supervisor gave no reason"} (${code})`, actor);
      return;
    }
    // The catalog's media types of the image: every layer's (the base image's
    // and the snapshot layer's), as the scheduler matches hosts on them.
    const base = await snapshotBase(tx, row.job_id);
    const mediaTypes = [...new Set([...ok.mediaTypes, ...(base?.media_types ?? [])])];
    const annotations = { ...(base?.annotations ?? {}), ...row.annotations };
    const registered = await registerSnapshotImage(tx, {
      name: row.name,
      tag: row.tag,
      digest: ok.digest,
      mediaTypes,
      size: ok.size,
      ownerId: row.owner_id,
      holderId: base?.owner_id ?? row.owner_id,
      location: { id: row.upload_service_id, url: row.upload_url, site: row.upload_site },
      annotations,
      jobId: row.job_id,
    });
    if (!registered) {
      await failSnapshot(tx, row, `image ${row.name}:${row.tag} was registered by someone else meanwhile`, actor);
      return;
    }
    await succeedSnapshot(tx, row.id, ok.digest);
    await audit(tx, {
      kind: "image.snapshot",
      actor,
      jobId: row.job_id,
      hostId: host.hostId,
      userId: row.owner_id,
      message: `${row.name}:${row.tag} -> ${ok.digest}`,
      details: { name: row.name, tag: row.tag, digest: ok.digest, snapshotId: row.id, storeId: row.upload_service_id },
    });
    await snapshotEvent(tx, row, "snapshot_succeeded", `snapshot registered as ${row.name}:${row.tag} (${ok.digest})`, actor);
  });
}

/**
 * SnapshotJob and the delivery of TakeSnapshot on this replica. `start()`
 * listens for new snapshots and for (re)attached streams; `stop()` ends it.
 */
export class Snapshots {
  private readonly delivery: HostDelivery<PendingSnapshot>;

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
    streams: SupervisorStreams,
    private readonly watchers: JobWatchers,
  ) {
    this.delivery = new HostDelivery(ctx, config, streams, {
      channel: "treadmill_snapshots",
      what: "snapshots",
      pending: (hostId) => pendingSnapshotsOfHost(ctx.sql, hostId),
      send: (session, hostId, row) => this.send(session, hostId, row),
    });
  }

  /** The stream's SnapshotResult (after the stream's earlier reports have committed). */
  registerHandlers(handlers: SupervisorHandlers): void {
    handlers.on("snapshotResult", { afterCommits: true, handle: (host, result) => onSnapshotResult(this.ctx, host, result) });
  }

  start(): Promise<void> {
    return this.delivery.start();
  }

  stop(): Promise<void> {
    this.delivery.stop();
    return Promise.resolve();
  }

  /** JobService.SnapshotJob. */
  async snapshotJob(caller: UserCaller, req: SnapshotJobRequest, hctx: HandlerContext): Promise<{ snapshot: Snapshot }> {
    checkId("job_id", req.jobId);
    const name = checkName("name", req.name);
    const tag = checkTag("tag", req.tag);
    checkText("request_id", req.requestId, 64);
    const requestId = req.requestId === "" ? null : req.requestId;
    const id = await this.ctx.sql.begin(async (tx) => {
      if (requestId !== null) {
        const existing = await snapshotOfRequest(tx, caller.userId, requestId);
        if (existing) {
          if (existing.job_id !== req.jobId || existing.name !== name || existing.tag !== tag) {
            throw invalid("request_id was already used for another snapshot");
          }
          return existing.id;
        }
      }
      return this.create(tx, caller, req.jobId, name, tag, requestId);
    }).catch(async (err: unknown) => {
      // Two calls with one request_id at once: the second finds the first's.
      if (requestId === null || !isUniqueViolation(err, "snapshots_owner_request_id_idx")) throw err;
      const existing = await snapshotOfRequest(this.ctx.sql, caller.userId, requestId);
      return existing!.id;
    });
    const row = req.wait ? await this.waitDone(id, hctx) : await this.current(id);
    return { snapshot: snapshotMessage(row) };
  }

  private async create(tx: TransactionSql, caller: UserCaller, jobId: string, name: string, tag: string, requestId: string | null): Promise<string> {
    const job = await loadJob(tx, jobId, { lock: true });
    if (!job) throw notFound(`job ${jobId} not found`);
    if (caller.role !== "admin" && job.owner_id !== caller.userId) throw denied(`job ${jobId} belongs to another user`);
    if (job.state !== "running") throw precondition(`job ${jobId} is ${job.state}, not running`);
    if (job.stop_reason !== null) throw precondition(`job ${jobId} is being stopped (${job.stop_reason})`);
    if (job.host_ids.length !== 1) {
      throw precondition(`job ${jobId} runs on ${job.host_ids.length} hosts; only a single-host job can be snapshotted`);
    }
    const hostId = job.host_ids[0];
    const host = await snapshotHost(tx, hostId);
    if (!host) throw precondition(`job ${jobId} has no host any more`);
    if (host.driver_kind === "board") {
      throw precondition(`job ${jobId} runs on board host ${host.name}; the board driver cannot snapshot`);
    }
    if (await imageExists(tx, name, tag)) throw exists(`image ${name}:${tag} already exists; choose another name or tag`);
    const target = await this.uploadTarget(tx, job.manifest_digest, host.site);
    if (!target) {
      throw new ConnectError("no image cache or store is available to upload the snapshot to", Code.Unavailable);
    }
    const id = uuidv7(this.ctx.clock());
    const annotations = {
      "org.opencontainers.image.title": `${name}:${tag}`,
      "treadmill.snapshot.job": jobId,
      "treadmill.snapshot.attempt": String(job.attempt),
    };
    try {
      await tx.savepoint(async (sp) => {
        await insertSnapshot(sp, { id, jobId, attempt: job.attempt, hostId, ownerId: caller.userId, name, tag, target, annotations, requestId });
      });
    } catch (err) {
      if (isUniqueViolation(err, "snapshots_pending_name_idx")) {
        throw exists(`a snapshot to ${name}:${tag} is already in progress; choose another name or tag`);
      }
      throw err;
    }
    const row = { id, job_id: jobId, attempt: job.attempt, host_id: hostId, owner_id: caller.userId, name, tag } as SnapshotRow;
    await snapshotEvent(tx, row, "snapshot_requested", `snapshot to ${name}:${tag} requested by ${caller.name}`, actorOf(caller));
    await notifySnapshots(tx, hostId);
    return id;
  }

  /** The site's live cache (a cache serves the store API), else the first store holding the job's image. */
  private async uploadTarget(tx: Db, manifestDigest: string, site: string): Promise<UploadTarget | undefined> {
    const cache = site === "" ? undefined : await liveSiteCache(tx, site);
    return cache ?? firstStoreOf(tx, manifestDigest);
  }

  /** The operation now; a pending one whose host is gone for good ends FAILED first. */
  private async current(id: string): Promise<SnapshotRow> {
    return this.ctx.sql.begin(async (tx) => {
      const row = (await snapshot(tx, id, { lock: true }))!;
      if (row.state !== "pending") return row;
      const host = await hostGoneFor(tx, row.host_id, this.config.supervisorGraceMs);
      if (host && !host.gone) return row;
      await failSnapshot(tx, row, `host ${host?.name ?? row.host_id} went away before the snapshot finished`, "system");
      return (await snapshot(tx, id))!;
    });
  }

  /** Waits until the operation ends, bounded by the call's deadline (operation-wait.ts). */
  private waitDone(id: string, hctx: HandlerContext): Promise<SnapshotRow> {
    return waitOperation({
      watchers: this.watchers,
      current: () => this.current(id),
      ended: (row) => row.state !== "pending",
      heartbeatMs: this.config.supervisorHeartbeatMs,
      hctx,
      stillPending: `snapshot ${id} is still pending at the call's deadline; it goes on (call again with the same request_id to poll)`,
    });
  }

  /** TakeSnapshot of `row` on `session`, with a fresh write token, audited. */
  private async send(session: HostSession, hostId: string, row: PendingSnapshot): Promise<void> {
    const now = this.ctx.clock();
    const ttl = this.ctx.config.imageTokenTtlMs;
    // The job's owner becomes the holder of what the supervisor uploads.
    const token = await this.ctx.keys.sign({ scope: "image:write" }, ttl, { subject: row.job_owner_id, audience: "image" });
    const requestId = uuidv7(now);
    session.outbox.push(
      create(AttachResponseSchema, {
        payload: {
          case: "takeSnapshot",
          value: {
            requestId,
            snapshotId: row.id,
            jobId: row.job_id,
            attempt: row.attempt,
            uploadUrl: row.upload_url,
            writeToken: { token, scope: CapabilityScope.IMAGE_WRITE, expireTime: timestampFromMs(now + ttl) },
            annotations: row.annotations,
          },
        },
      }),
    );
    await audit(this.ctx.sql, {
      kind: "command.take_snapshot",
      actor: "system",
      jobId: row.job_id,
      hostId,
      message: `sent to host ${hostId}`,
      details: { requestId, snapshotId: row.id, attempt: row.attempt, replica: this.ctx.replicaId },
    });
  }
}
