/**
 * Artifact retention (docs/artifacts.md): a set of artifacts older than
 * `artifactMaxAgeMs`, or beyond its owner's `artifactMaxUserBytes` (the
 * oldest sets go first), has its store manifest deleted (DeleteManifest
 * with an image:admin token the coordinator mints for itself): its blobs are
 * then referenced by nothing of it and the store's CollectGarbage removes
 * them (unless another manifest still lists the same bytes). The set is
 * then marked removed, its listing dropped, and the job's timeline and the
 * audit log say so.
 *
 * Every replica runs the keeper; it is idempotent rather than exclusive: a
 * manifest already gone (NotFound) counts as deleted, and only the replica
 * whose update marks the set removed writes the event. A store that cannot
 * be reached leaves the set for the next sweep.
 */
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import { ImageStoreService } from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { formatBytes } from "../../lib/bytes.js";
import type { Logger } from "../../lib/logger.js";
import { SweepLoop } from "../../lib/async/sweep-loop.js";
import type { CoordinatorContext } from "../context.js";
import { type ArtifactSetRow, markSetRemoved, setsPastRetention } from "../db/queries/artifacts.js";
import { audit } from "../db/queries/audit.js";
import { type EventInput, recordEvent } from "../db/queries/events.js";

/** Sets removed per sweep before it asks for another run. */
const BATCH = 100;
/** Lifetime of the admin token of one deletion. */
const TOKEN_TTL_MS = 60_000;

export class ArtifactKeeper {
  private readonly log: Logger;
  private readonly loop: SweepLoop;

  constructor(private readonly ctx: CoordinatorContext) {
    this.log = ctx.logger.child({ subsystem: "artifact-retention" });
    this.loop = new SweepLoop(() => this.sweep(), ctx.config.artifactSweepIntervalMs, (err) => this.log.warn({ err }, "artifact retention sweep failed"));
  }

  start(): void {
    this.loop.start();
  }

  stop(): Promise<void> {
    return this.loop.stop();
  }

  /** Removes every set past retention (also for tests); true when there may be more. */
  async sweep(): Promise<boolean> {
    const c = this.ctx.config;
    if (c.artifactMaxAgeMs === 0 && c.artifactMaxUserBytes === 0) return false;
    const due = await setsPastRetention(this.ctx.sql, { maxAgeMs: c.artifactMaxAgeMs, maxUserBytes: c.artifactMaxUserBytes, limit: BATCH });
    let removed = 0;
    for (const set of due) {
      if (this.loop.isStopped) return false;
      if (await this.remove(set)) removed++;
    }
    return due.length === BATCH && removed > 0;
  }

  private async remove(set: ArtifactSetRow): Promise<boolean> {
    if (set.manifest_digest !== "") {
      try {
        await this.deleteManifest(set);
      } catch (err) {
        this.log.warn({ err: ConnectError.from(err).rawMessage, setId: set.id, store: set.store_url }, "cannot delete an artifact manifest; retrying later");
        return false;
      }
    }
    const why = this.ctx.config.artifactMaxAgeMs > 0 ? "retention (age or per-user total)" : "retention (per-user total)";
    await this.ctx.sql.begin(async (tx) => {
      if (!(await markSetRemoved(tx, set.id))) return;
      const [job] = await tx<{ state: EventInput["state"] }[]>`select state from jobs where id = ${set.job_id}`;
      const message = `artifacts of attempt ${set.attempt} (${formatBytes(BigInt(set.total_bytes))}) removed by ${why}`;
      if (job) {
        await recordEvent(tx, {
          jobId: set.job_id,
          kind: "artifacts" as EventInput["kind"],
          state: job.state,
          attempt: set.attempt,
          actor: "system",
          ownerId: set.owner_id,
          message,
        });
      } else {
        await audit(tx, { kind: "job.artifacts", actor: "system", userId: set.owner_id, message, details: { jobId: set.job_id, setId: set.id } });
      }
    });
    this.log.info({ jobId: set.job_id, attempt: set.attempt, bytes: Number(set.total_bytes) }, "artifacts removed by retention");
    return true;
  }

  /** Deletes the set's manifest at its store; already gone counts as deleted. */
  private async deleteManifest(set: ArtifactSetRow): Promise<void> {
    const token = await this.ctx.keys.sign({ scope: "image:admin" }, TOKEN_TTL_MS, { subject: "coordinator", audience: "image" });
    // One unary call: a plain gRPC client (the tuned blob client is for bulk bytes, and a client file servers do not import).
    const sessionManager = new Http2SessionManager(set.store_url);
    const transport = createGrpcTransport({
      baseUrl: set.store_url,
      sessionManager,
      interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${token}`), next(req))],
    });
    try {
      await createClient(ImageStoreService, transport).deleteManifest({ digest: set.manifest_digest }, { timeoutMs: 30_000 });
    } catch (err) {
      if (ConnectError.from(err).code !== Code.NotFound) throw err;
    } finally {
      sessionManager.abort();
    }
  }
}
