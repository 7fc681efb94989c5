/**
 * TakeSnapshot on the supervisor (DESIGN.md §6): the driver writes the job's
 * state as a new layer, a manifest puts it on top of the job's image layers
 * (keeping the image's annotations, such as the entrypoint), and blobs and
 * manifest are uploaded to the store named by the command (the site cache,
 * which serves the store API too, or the image's first store): the new layer
 * with the command's write token (minted for the job's owner, who becomes
 * its holder), the image's layers mounted with the job's image token rather
 * than sent again (uploaded only if the store cannot mount them). The outcome
 * goes back as SnapshotResult; progress goes to the job's `supervisor` log
 * channel.
 *
 * Idempotent by snapshot id: a repeated command (a retry, or the same command
 * on a new stream) joins the operation in progress, or gets the same result
 * again; it never takes a second snapshot.
 */
import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { SnapshotResultSchema, type TakeSnapshot } from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { buildManifest, type LayerDescriptor } from "../lib/image/manifest.js";
import { uploadImage } from "../lib/image/push.js";
import type { Logger } from "../lib/logger.js";
import type { ClientTls } from "../lib/grpc/trust.js";
import { DriverError, type Driver, type SnapshotLayer } from "./drivers/driver.js";
import type { JobRunner, SnapshotSource } from "./job-runner.js";

type Result = MessageInitShape<typeof SnapshotResultSchema>;

/** Results kept for repeated commands; older ones are forgotten (the coordinator has them). */
const REMEMBERED = 256;

interface Operation {
  /** The newest command's token (a repeated command brings a fresh one). */
  token: string;
  /** Set once done. */
  result?: Result;
}

export interface SnapshotterDeps {
  driver: () => Driver;
  logger: Logger;
  /** Where snapshot layers are written before the upload (removed afterwards). */
  dir: string;
  /** Sends a SnapshotResult to the coordinator (queued across reconnects by the core). */
  send: (result: Result) => void;
  /** Aborted when the supervisor stops: uploads in progress end. */
  signal: AbortSignal;
  /** The CAs an https cache is verified with (--ca-file). */
  tls?: ClientTls;
}

/** The snapshots of one supervisor. */
export class Snapshotter {
  private readonly operations = new Map<string, Operation>();

  constructor(private readonly deps: SnapshotterDeps) {}

  /**
   * Handles one TakeSnapshot for `runner` (the attempt it names, if this host
   * holds it). Never throws: every outcome is a SnapshotResult.
   */
  take(cmd: TakeSnapshot, runner: JobRunner | undefined): void {
    const token = cmd.writeToken?.token ?? "";
    const known = this.operations.get(cmd.snapshotId);
    if (known) {
      known.token = token || known.token;
      // Done: the same answer again. In progress: its answer comes when done.
      if (known.result) this.deps.send({ ...known.result, requestId: cmd.requestId });
      return;
    }
    const op: Operation = { token };
    this.operations.set(cmd.snapshotId, op);
    while (this.operations.size > REMEMBERED) this.operations.delete(this.operations.keys().next().value!);
    const base = { requestId: cmd.requestId, snapshotId: cmd.snapshotId, jobId: cmd.jobId, attempt: cmd.attempt };
    void this.run(cmd, runner, op)
      .catch((err: unknown) => {
        const error = ConnectError.from(err);
        const internal = error.code === Code.Internal || error.code === Code.Unknown;
        if (internal) this.deps.logger.error({ err, snapshotId: cmd.snapshotId, jobId: cmd.jobId }, "snapshot failed");
        else this.deps.logger.warn({ snapshotId: cmd.snapshotId, jobId: cmd.jobId, reason: error.rawMessage }, "snapshot failed");
        return {
          ...base,
          ok: false,
          errorCode: error.code,
          errorMessage: internal && !(err instanceof ConnectError) ? "internal error while taking the snapshot" : error.rawMessage,
        };
      })
      .then((result: Result) => {
        op.result = create(SnapshotResultSchema, { ...base, ...result });
        this.deps.send(op.result);
      });
  }

  private async run(cmd: TakeSnapshot, runner: JobRunner | undefined, op: Operation): Promise<Result> {
    if (cmd.uploadUrl === "" || op.token === "") {
      throw new ConnectError("take_snapshot needs upload_url and write_token", Code.InvalidArgument);
    }
    const source = runner?.snapshotSource();
    if (!runner || !source) {
      throw new ConnectError(`job ${cmd.jobId} attempt ${cmd.attempt} is not running on this host (it ended or never started)`, Code.FailedPrecondition);
    }
    const say = (text: string) => source.say(`snapshot ${cmd.snapshotId}: ${text}`);
    await mkdir(this.deps.dir, { recursive: true, mode: 0o700 });
    const outFile = join(this.deps.dir, `${cmd.snapshotId}.layer`);
    try {
      say("writing the job's state as a new layer");
      const layer = await source.hold(this.layer(source, outFile, runner));
      say(`layer ${layer.digest}, ${layer.size} bytes`);
      const image = manifestOf(source, layer, cmd.annotations);
      const blobBytes = image.blobs.reduce((sum, b) => sum + b.size, 0);
      let lastPercent = -1;
      say(`uploading to ${cmd.uploadUrl}`);
      await uploadImage(cmd.uploadUrl, () => op.token, image, {
        signal: this.deps.signal,
        tls: this.deps.tls,
        mount: { tokens: [source.imageToken()], digests: new Set(source.image.layers.map((l) => l.digest)) },
        onProgress: (p) => {
          const before = image.blobs.slice(0, p.blobIndex).reduce((sum, b) => sum + b.size, 0);
          const percent = blobBytes > 0 ? Math.floor(((before + p.bytesDone) / blobBytes) * 10) * 10 : 100;
          if (percent !== lastPercent) {
            lastPercent = percent;
            say(`uploading ${percent}%`);
          }
        },
      });
      say(`done: image ${image.manifestDigest}`);
      const sizeBytes = BigInt(blobBytes + image.manifestJson.length);
      return { ok: true, manifestDigest: image.manifestDigest, sizeBytes, mediaTypes: image.mediaTypes };
    } catch (err) {
      say(`failed: ${ConnectError.from(err).rawMessage}`);
      throw err;
    } finally {
      await rm(outFile, { force: true });
    }
  }

  /** The driver's layer; a driver that cannot, or a job that ended meanwhile, is FailedPrecondition. */
  private async layer(source: SnapshotSource, outFile: string, runner: JobRunner): Promise<SnapshotLayer> {
    try {
      return await this.deps.driver().snapshot(source.running, { outFile });
    } catch (err) {
      if (!runner.snapshotSource()) {
        throw new ConnectError(`the job ended during the snapshot (${errorText(err)})`, Code.FailedPrecondition);
      }
      if (err instanceof DriverError) throw new ConnectError(`the driver cannot snapshot this job: ${err.message}`, Code.FailedPrecondition);
      throw err;
    }
  }
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * The new image: the job's image layers, bottom first, then the snapshot
 * layer with its media type and annotations (a qcow2 overlay names its lower
 * layer there); the image's annotations with the command's on top.
 */
export function manifestOf(source: Pick<SnapshotSource, "image">, layer: SnapshotLayer, annotations: Record<string, string>) {
  // A layer's annotations are written only when it has some.
  const descriptor = (l: LayerDescriptor): LayerDescriptor => ({
    mediaType: l.mediaType,
    digest: l.digest,
    size: l.size,
    annotations: l.annotations && Object.keys(l.annotations).length > 0 ? { ...l.annotations } : undefined,
  });
  const layers = [...source.image.layers.map(descriptor), descriptor(layer)];
  const { manifestJson, manifestDigest } = buildManifest(layers, { ...source.image.annotations, ...annotations });
  const blobs = [
    ...source.image.layers.map((l) => ({ digest: l.digest, size: l.size, path: l.path })),
    { digest: layer.digest, size: layer.size, path: layer.path },
  ];
  return {
    manifestDigest,
    manifestJson,
    // A layer shared by two descriptors is uploaded once.
    blobs: blobs.filter((b, i) => blobs.findIndex((x) => x.digest === b.digest) === i),
    mediaTypes: [...new Set(layers.map((l) => l.mediaType))],
  };
}
