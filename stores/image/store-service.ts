import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  CollectGarbageResponseSchema,
  DeleteManifestResponseSchema,
  GetBlobResponseSchema,
  GetManifestResponseSchema,
  ImageStoreService,
  ListManifestsResponseSchema,
  ManifestEntrySchema,
  PutBlobResponseSchema,
  PutManifestResponseSchema,
  QueryUploadResponseSchema,
  StatBlobResponseSchema,
  type CollectGarbageRequest,
  type DeleteManifestRequest,
  type GetBlobRequest,
  type GetBlobResponse,
  type GetManifestRequest,
  type ListManifestsRequest,
  type PutBlobResponse,
  type PutManifestRequest,
  type QueryUploadRequest,
  type StatBlobRequest,
} from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import type { Logger } from "../../lib/logger.js";
import type { Authorizer } from "./auth.js";
import { checkDigest } from "./manifest.js";
import type { BlobStore, Upload } from "./store.js";

/** Largest `data` in one PutBlob or GetBlob message (image_store_service.proto). */
export const MAX_CHUNK_BYTES = 3 * 1024 * 1024;

/** What the site cache adds to the store's behaviour. */
export interface CacheHooks {
  /** A manifest (or a blob through it) was read: it is recently used. */
  touch(manifestDigest: string): void;
  /** Cache-only fields of a ListManifests entry. */
  entryInfo(digest: string): { lastAccessMs?: number; pinned: boolean };
  /** Whether a manifest is pinned (DeleteManifest refuses then). */
  isPinned(digest: string): boolean;
}

/**
 * A PutBlob message as putBlob takes it: a PutBlobRequest from the Connect
 * adapter, or from the raw path with its data left in the pieces it arrived
 * in (bulk-grpc.ts).
 */
export interface BlobPiece {
  digest: string;
  size: bigint;
  offset: bigint;
  data: Uint8Array | readonly Uint8Array[];
  /** PutBlobRequest.digest_at_end. */
  digestAtEnd?: boolean;
}

function byteLength(data: Uint8Array | readonly Uint8Array[]): number {
  if (data instanceof Uint8Array) return data.length;
  let n = 0;
  for (const p of data) n += p.length;
  return n;
}

function invalid(message: string): ConnectError {
  return new ConnectError(message, Code.InvalidArgument);
}

function int64(field: string, value: bigint): number {
  if (value < 0n) throw invalid(`${field} must not be negative`);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(`${field} is too large`);
  return Number(value);
}

/**
 * ImageStoreService: blobs and manifests over the BlobStore, every call
 * authorized by its capability token. `putBlob` and `getBlob` are also
 * served by the raw gRPC path (bulk-grpc.ts), which calls these same
 * methods.
 */
export class ImageStoreServiceImpl implements ServiceImpl<typeof ImageStoreService> {
  constructor(
    private readonly store: BlobStore,
    private readonly auth: Authorizer,
    private readonly options: { gcGraceMs: number; logger: Logger; cache?: CacheHooks },
  ) {}

  /** Authorizes, then writes the stream to an upload. */
  async putBlob(requests: AsyncIterable<BlobPiece>, context: HandlerContext): Promise<PutBlobResponse> {
    const signal = context.signal;
    const writer = (await this.auth.require(context.requestHeader, { scope: "image:write" })).subject;
    const iterator = requests[Symbol.asyncIterator]();
    const first = await iterator.next();
    if (first.done) throw invalid("put_blob stream has no message");
    const head = first.value;
    if (head.digestAtEnd) return this.#putBlobDigestAtEnd(head, iterator, writer, signal);
    const digest = checkDigest("digest", head.digest);
    const size = int64("size", head.size);
    const offset = int64("offset", head.offset);
    if (byteLength(head.data) > MAX_CHUNK_BYTES) throw invalid(`data is larger than ${MAX_CHUNK_BYTES} bytes`);
    if (offset > size) throw new ConnectError(`offset ${offset} is past the size ${size}`, Code.OutOfRange);
    const begun = await this.store.beginUpload(digest, size, offset, writer);
    if (begun === "exists") {
      await iterator.return?.();
      return create(PutBlobResponseSchema, { digest, committedSize: BigInt(size), complete: true, alreadyExisted: true });
    }
    const upload: Upload = begun;
    try {
      await upload.write(head.data);
      for (let next = await iterator.next(); !next.done; next = await iterator.next()) {
        if (signal.aborted) throw ConnectError.from(signal.reason);
        const m = next.value;
        if (m.digest !== "" && m.digest !== digest) throw invalid("digest differs from the first message's");
        if (m.size !== 0n && m.size !== BigInt(size)) throw invalid("size differs from the first message's");
        if (m.offset !== BigInt(upload.offset)) {
          throw new ConnectError(`offset ${m.offset} is not the next offset ${upload.offset}`, Code.OutOfRange);
        }
        if (byteLength(m.data) > MAX_CHUNK_BYTES) throw invalid(`data is larger than ${MAX_CHUNK_BYTES} bytes`);
        await upload.write(m.data);
      }
    } catch (err) {
      // Whatever broke the stream, the committed prefix stays for a resume.
      await upload.suspend();
      throw err;
    }
    const result = await upload.finish();
    return create(PutBlobResponseSchema, {
      digest,
      committedSize: BigInt(result.committedSize),
      complete: result.complete,
      alreadyExisted: false,
    });
  }

  /**
   * PutBlob with the digest in its last message (digest_at_end): written to a
   * temp file of its own while hashed, committed under the digest only if it
   * matches; anything else discards the bytes (not resumable).
   */
  async #putBlobDigestAtEnd(head: BlobPiece, iterator: AsyncIterator<BlobPiece>, writer: string, signal: AbortSignal): Promise<PutBlobResponse> {
    const size = int64("size", head.size);
    if (head.offset !== 0n) throw new ConnectError(`offset ${head.offset} is not 0: an upload with digest_at_end is not resumable`, Code.OutOfRange);
    if (byteLength(head.data) > MAX_CHUNK_BYTES) throw invalid(`data is larger than ${MAX_CHUNK_BYTES} bytes`);
    const upload = await this.store.beginPendingUpload(size, writer);
    let digest: string | undefined;
    try {
      for (let message: BlobPiece | undefined = head; message !== undefined; ) {
        if (signal.aborted) throw ConnectError.from(signal.reason);
        if (digest !== undefined) throw invalid("a message follows the one with the digest (digest_at_end)");
        if (message !== head) {
          if (message.size !== 0n && message.size !== BigInt(size)) throw invalid("size differs from the first message's");
          if (message.offset !== BigInt(upload.offset)) {
            throw new ConnectError(`offset ${message.offset} is not the next offset ${upload.offset}`, Code.OutOfRange);
          }
          if (byteLength(message.data) > MAX_CHUNK_BYTES) throw invalid(`data is larger than ${MAX_CHUNK_BYTES} bytes`);
        }
        if (message.digest !== "") digest = checkDigest("digest", message.digest);
        await upload.write(message.data);
        const next: IteratorResult<BlobPiece> = await iterator.next();
        message = next.done ? undefined : next.value;
      }
      if (digest === undefined) throw invalid("the stream ended without the digest (digest_at_end)");
    } catch (err) {
      await upload.discard();
      throw err;
    }
    const { alreadyHeld } = await upload.finishAs(digest);
    return create(PutBlobResponseSchema, { digest, committedSize: BigInt(size), complete: true, alreadyExisted: alreadyHeld });
  }

  /** Authorizes and validates, then yields the chunks (the raw path writes each chunk's data without a copy). */
  async *getBlob(request: GetBlobRequest, context: HandlerContext): AsyncGenerator<GetBlobResponse> {
    const digest = checkDigest("digest", request.digest);
    const offset = int64("offset", request.offset);
    const length = request.length === undefined ? undefined : int64("length", request.length);
    const token = await this.auth.readBlob(context.requestHeader, digest);
    const stat = await this.store.statBlob(digest);
    if (!stat) throw new ConnectError(`blob ${digest} not found`, Code.NotFound);
    if (offset > stat.size) throw new ConnectError(`offset ${offset} is past the end ${stat.size} of ${digest}`, Code.OutOfRange);
    if (token.capability.scope === "image:read") this.options.cache?.touch(token.capability.digest);
    let size = BigInt(stat.size);
    for await (const chunk of this.store.readBlob(digest, offset, length, stat.size)) {
      // The size goes with the first chunk only.
      yield create(GetBlobResponseSchema, { offset: BigInt(chunk.offset), data: chunk.data, size });
      size = 0n;
    }
  }

  async queryUpload(request: QueryUploadRequest, context: HandlerContext) {
    const digest = checkDigest("digest", request.digest);
    const writer = (await this.auth.require(context.requestHeader, { scope: "image:write" })).subject;
    const state = await this.store.queryUpload(digest, writer);
    return create(QueryUploadResponseSchema, {
      exists: state.exists,
      committedOffset: BigInt(state.committedOffset),
      size: BigInt(state.size),
    });
  }

  async statBlob(request: StatBlobRequest, context: HandlerContext) {
    const digest = checkDigest("digest", request.digest);
    await this.auth.readBlob(context.requestHeader, digest);
    const stat = await this.store.statBlob(digest);
    if (!stat) throw new ConnectError(`blob ${digest} not found`, Code.NotFound);
    return create(StatBlobResponseSchema, { size: BigInt(stat.size), createTime: timestampFromMs(Math.floor(stat.mtimeMs)) });
  }

  async putManifest(request: PutManifestRequest, context: HandlerContext) {
    const digest = checkDigest("digest", request.digest);
    const writer = (await this.auth.require(context.requestHeader, { scope: "image:write" })).subject;
    const mountable = await this.auth.mountable(request.mountTokens, writer);
    const record = await this.store.putManifest(digest, request.manifestJson, writer, mountable);
    this.options.cache?.touch(digest);
    return create(PutManifestResponseSchema, { digest, manifest: record.manifest, totalSize: BigInt(record.totalSize) });
  }

  async getManifest(request: GetManifestRequest, context: HandlerContext) {
    const digest = checkDigest("digest", request.digest);
    await this.auth.readManifest(context.requestHeader, digest);
    const record = this.store.getManifestRecord(digest);
    if (!record) throw new ConnectError(`manifest ${digest} not found`, Code.NotFound);
    const json = await this.store.readManifest(digest);
    this.options.cache?.touch(digest);
    return create(GetManifestResponseSchema, { digest, manifestJson: json, manifest: record.manifest });
  }

  async listManifests(request: ListManifestsRequest, context: HandlerContext) {
    await this.auth.require(context.requestHeader, { scope: "image:admin" });
    if (request.pageSize < 0) throw invalid("page_size must not be negative");
    const pageSize = request.pageSize === 0 ? 100 : Math.min(request.pageSize, 1000);
    if (request.pageToken !== "") checkDigest("page_token", request.pageToken);
    const all = this.store.manifestRecords().filter((r) => request.pageToken === "" || r.digest > request.pageToken);
    const page = all.slice(0, pageSize);
    return create(ListManifestsResponseSchema, {
      manifests: page.map((r) => {
        const info = this.options.cache?.entryInfo(r.digest);
        return create(ManifestEntrySchema, {
          digest: r.digest,
          manifest: r.manifest,
          totalSize: BigInt(r.totalSize),
          createTime: timestampFromMs(r.createdMs),
          lastAccessTime: info?.lastAccessMs === undefined ? undefined : timestampFromMs(info.lastAccessMs),
          pinned: info?.pinned ?? false,
        });
      }),
      nextPageToken: all.length > pageSize ? page[page.length - 1].digest : "",
    });
  }

  async deleteManifest(request: DeleteManifestRequest, context: HandlerContext) {
    const digest = checkDigest("digest", request.digest);
    await this.auth.require(context.requestHeader, { scope: "image:admin" });
    if (this.options.cache?.isPinned(digest)) {
      throw new ConnectError(`manifest ${digest} is pinned by a lease`, Code.FailedPrecondition);
    }
    await this.store.deleteManifest(digest);
    return create(DeleteManifestResponseSchema, {});
  }

  async collectGarbage(request: CollectGarbageRequest, context: HandlerContext) {
    await this.auth.require(context.requestHeader, { scope: "image:admin" });
    let graceMs = this.options.gcGraceMs;
    if (request.gracePeriod) {
      graceMs = Number(request.gracePeriod.seconds) * 1000 + Math.floor(request.gracePeriod.nanos / 1e6);
      if (graceMs < 0 || request.gracePeriod.nanos < 0) throw invalid("grace_period must not be negative");
    }
    const result = await this.store.collectGarbage(graceMs, request.dryRun);
    this.options.logger.info(
      { blobs: result.blobs.length, bytes: result.bytes, tempFiles: result.tempFiles, dryRun: request.dryRun },
      "garbage collected",
    );
    return create(CollectGarbageResponseSchema, {
      blobsDeleted: BigInt(result.blobs.length),
      bytesFreed: BigInt(result.bytes),
      deletedDigests: result.blobs.slice(0, 1000),
      tempFilesDeleted: BigInt(result.tempFiles),
    });
  }
}
