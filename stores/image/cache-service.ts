import { create } from "@bufbuild/protobuf";
import { timestampFromMs, type Duration } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  FetchDoneSchema,
  FetchResponseSchema,
  ImageCacheService,
  LocalBlobSchema,
  LocalPathResponseSchema,
  PinResponseSchema,
  PushResponseSchema,
  StatsResponseSchema,
  UnpinResponseSchema,
  type FetchRequest,
  type FetchResponse,
  type LocalPathRequest,
  type PinRequest,
  type PushRequest,
  type PushResponse,
  type StatsRequest,
  type TransferProgress,
  type UnpinRequest,
} from "../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { bearerToken } from "../../lib/tokens.js";
import type { Authorizer } from "./auth.js";
import { MAX_LEASE_TTL_MS, type ImageCache } from "./cache.js";
import { checkDigest } from "./manifest.js";
import type { BlobStore } from "./store.js";
import type { Upstreams } from "./upstreams.js";

const LEASE_ID = /^[A-Za-z0-9._:/-]{1,128}$/;
const MAX_LOCATIONS = 16;

function invalid(message: string): ConnectError {
  return new ConnectError(message, Code.InvalidArgument);
}

function leaseId(field: string, value: string): string {
  if (!LEASE_ID.test(value)) throw invalid(`${field} must be 1 to 128 of [A-Za-z0-9._:/-]`);
  return value;
}

function ttlMs(field: string, d: Duration | undefined): number {
  if (!d) throw invalid(`${field} is required`);
  const ms = Number(d.seconds) * 1000 + Math.floor(d.nanos / 1e6);
  if (!(ms > 0) || d.nanos < 0) throw invalid(`${field} must be positive`);
  if (ms > MAX_LEASE_TTL_MS) throw invalid(`${field} must be at most 24 h`);
  return ms;
}

function storeUrl(field: string, value: string): string {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw invalid(`${field} must be an http or https url`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") throw invalid(`${field} must be an http or https url`);
  return value;
}

/**
 * A queue of one: a producer's latest progress and the end, consumed by an
 * RPC's response generator (older progress is superseded, never queued).
 */
class LatestProgress {
  #latest: TransferProgress | undefined;
  #wake: (() => void) | undefined;

  put(p: TransferProgress): void {
    this.#latest = p;
    this.#wake?.();
  }

  async *drain<T, R>(work: Promise<T>, wrap: (p: TransferProgress) => R): AsyncGenerator<R, T> {
    let finished = false;
    let outcome: { value: T } | { error: unknown } | undefined;
    work.then(
      (value) => (outcome = { value }),
      (error: unknown) => (outcome = { error }),
    ).finally(() => {
      finished = true;
      this.#wake?.();
    });
    for (;;) {
      if (this.#latest) {
        const p = this.#latest;
        this.#latest = undefined;
        yield wrap(p);
        continue;
      }
      if (finished) break;
      await new Promise<void>((resolve) => (this.#wake = resolve));
      this.#wake = undefined;
    }
    if (!outcome || "error" in outcome) throw outcome ? outcome.error : new Error("fetch ended without an outcome");
    return outcome.value;
  }
}

/** ImageCacheService (cache mode): Fetch, Pin/Unpin, LocalPath, Push, Stats. */
export class ImageCacheServiceImpl implements ServiceImpl<typeof ImageCacheService> {
  constructor(
    private readonly cache: ImageCache,
    private readonly store: BlobStore,
    private readonly auth: Authorizer,
    private readonly upstreams: Upstreams,
    private readonly options: { capBytes: number; freeFloorBytes: number },
  ) {}

  async *fetch(request: FetchRequest, context: HandlerContext): AsyncGenerator<FetchResponse> {
    const digest = checkDigest("manifest_digest", request.manifestDigest);
    // The holder is proved by the fetch itself (a location serves the image
    // to this token, or confirms it), not looked up here.
    const verified = await this.auth.readToken(context.requestHeader, digest);
    if (request.locations.length === 0) throw invalid("locations must name at least one store");
    if (request.locations.length > MAX_LOCATIONS) throw invalid(`locations must name at most ${MAX_LOCATIONS} stores`);
    request.locations.forEach((l, i) => storeUrl(`locations[${i}]`, l));
    await this.upstreams.check("locations", request.locations);
    let lease: { id: string; ttlMs: number } | undefined;
    if (request.leaseId !== "") lease = { id: leaseId("lease_id", request.leaseId), ttlMs: ttlMs("lease_ttl", request.leaseTtl) };
    const token = request.token !== "" ? request.token : (bearerToken(context.requestHeader) ?? "");
    const holder = verified.capability.scope === "image:read" ? verified.capability.holder : undefined;
    const leaseExpiry = lease ? await this.cache.pin(digest, lease.id, lease.ttlMs, true) : undefined;
    const queue = new LatestProgress();
    const work = this.cache.fetch(digest, request.locations, token, holder, (p) => queue.put(p));
    // A fetch that fails leaves no lease behind (it would keep what it pins).
    if (lease) void work.catch(() => this.cache.unpin(lease.id).catch(() => undefined));
    const result = yield* queue.drain(work, (p) => create(FetchResponseSchema, { payload: { case: "progress", value: p } }));
    const blobs = this.cache.hasSharedPath
      ? [[digest, result.record.size] as const, ...result.record.blobs].map(([d, size]) =>
          create(LocalBlobSchema, { digest: d, path: this.cache.localPath(d), size: BigInt(size) }),
        )
      : [];
    yield create(FetchResponseSchema, {
      payload: {
        case: "done",
        value: create(FetchDoneSchema, {
          manifest: result.record.manifest,
          manifestJson: result.json,
          blobs,
          hit: result.hit,
          leaseExpireTime: leaseExpiry === undefined ? undefined : timestampFromMs(leaseExpiry),
        }),
      },
    });
  }

  async pin(request: PinRequest, context: HandlerContext) {
    const digest = checkDigest("manifest_digest", request.manifestDigest);
    const verified = await this.auth.readToken(context.requestHeader, digest);
    const id = leaseId("lease_id", request.leaseId);
    const ms = ttlMs("ttl", request.ttl);
    await this.auth.requireHolder(verified, digest);
    const expiresAt = await this.cache.pin(digest, id, ms);
    return create(PinResponseSchema, { expireTime: timestampFromMs(expiresAt) });
  }

  async unpin(request: UnpinRequest, context: HandlerContext) {
    const id = leaseId("lease_id", request.leaseId);
    const digest = this.cache.leaseDigest(id);
    // The caller must hold a read token for the leased image; an unknown
    // lease only needs a valid token.
    if (digest !== undefined) await this.auth.readManifest(context.requestHeader, digest);
    else await this.auth.any(context.requestHeader);
    await this.cache.unpin(id);
    return create(UnpinResponseSchema, {});
  }

  async localPath(request: LocalPathRequest, context: HandlerContext) {
    const digest = checkDigest("manifest_digest", request.manifestDigest);
    const blob = request.blobDigest === "" ? digest : checkDigest("blob_digest", request.blobDigest);
    await this.auth.readManifest(context.requestHeader, digest);
    const record = this.store.getManifestRecord(digest);
    if (!record) throw new ConnectError(`image ${digest} is not cached`, Code.NotFound);
    if (blob !== digest && !record.blobs.has(blob)) throw invalid("blob_digest is not a blob of the manifest");
    const path = this.cache.localPath(blob);
    const stat = await this.store.statBlob(blob);
    if (!stat) throw new ConnectError(`blob ${blob} is not cached`, Code.NotFound);
    this.cache.touch(digest);
    return create(LocalPathResponseSchema, { blob: create(LocalBlobSchema, { digest: blob, path, size: BigInt(stat.size) }) });
  }

  async *push(request: PushRequest, context: HandlerContext): AsyncGenerator<PushResponse> {
    const digest = checkDigest("manifest_digest", request.manifestDigest);
    const verified = await this.auth.readToken(context.requestHeader, digest);
    storeUrl("target_url", request.targetUrl);
    if (request.targetToken === "") throw invalid("target_token is required");
    await this.auth.requireHolder(verified, digest);
    await this.upstreams.check("target_url", [request.targetUrl]);
    const queue = new LatestProgress();
    const work = this.cache.push(digest, request.targetUrl, request.targetToken, (p) => queue.put(p), context.signal);
    const result = yield* queue.drain(work, (p) => create(PushResponseSchema, { payload: { case: "progress", value: p } }));
    yield create(PushResponseSchema, {
      payload: { case: "done", value: { bytesUploaded: BigInt(result.bytesUploaded), blobsSkipped: result.blobsSkipped } },
    });
  }

  async stats(_request: StatsRequest, context: HandlerContext) {
    await this.auth.any(context.requestHeader);
    const c = this.cache.counters;
    return create(StatsResponseSchema, {
      sizeBytes: BigInt(this.store.usedBytes),
      capBytes: BigInt(this.options.capBytes),
      freeBytes: BigInt(await this.store.freeBytes()),
      freeFloorBytes: BigInt(this.options.freeFloorBytes),
      blobCount: BigInt(this.store.blobCount),
      manifestCount: BigInt(this.store.manifestRecords().length),
      pinnedCount: BigInt(this.cache.pinnedCount()),
      hits: BigInt(c.hits),
      misses: BigInt(c.misses),
      evictions: BigInt(c.evictions),
      bytesFetched: BigInt(c.bytesFetched),
    });
  }
}
