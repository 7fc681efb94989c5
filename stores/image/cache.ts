/**
 * The site cache's state and work (DESIGN.md §6): read-through fetches from
 * ordered locations with failover, leases that pin images, least-recently-
 * used eviction under a size cap and a free-space floor, and pushes to other
 * stores. The bytes live in the same BlobStore a store uses.
 *
 * State kept across restarts in `<data-dir>/cache.json`: leases (so a
 * restart does not unpin a running job's image) and last-access times. Saves
 * are coalesced: one write at a time, and a save asked while one is queued
 * joins it (it will carry the change).
 *
 * Possession (store.ts): the cache records as a holder of an image (and its
 * blobs) the holder of the token a location served it to, since that
 * location checked the holder's possession. A token whose holder the cache
 * has not recorded gets a cached image only after a location confirms it
 * (GetManifest with that token). Locations are the caller's, already
 * matched against the cache's upstreams (upstreams.ts).
 */
import { create } from "@bufbuild/protobuf";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join, posix } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { TransferProgressSchema, type TransferProgress } from "../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { fileSource } from "../../lib/image/blob-io.js";
import {
  imageStoreClient,
  imageStoreTransport,
  readBlobPieces,
  uploadBlob,
  type ImageStoreClient,
  type ImageTransport,
} from "../../lib/image/client.js";
import { digestOf } from "../../lib/image/digest.js";
import type { Logger } from "../../lib/logger.js";
import type { ClientTls } from "../../lib/grpc/trust.js";
import { sleep } from "../../lib/retry.js";
import { manifestBlobs, parseManifest } from "./manifest.js";
import type { CacheHooks } from "./store-service.js";
import { atomicWrite, type BlobStore, type ManifestRecord } from "./store.js";

export const MAX_LEASE_TTL_MS = 24 * 3600 * 1000;
const PROGRESS_INTERVAL_MS = 100;

export interface CacheOptions {
  store: BlobStore;
  logger: Logger;
  dataDir: string;
  /** Size cap; 0: none. */
  capBytes: number;
  /** Eviction keeps at least this much free; 0: none. */
  freeFloorBytes: number;
  /** Where clients mount dataDir; "" when there is no shared mount. */
  sharedPath: string;
  evictIntervalMs: number;
  clock?: () => number;
  /** Opens a transport to a location; default imageStoreTransport. */
  transport?: (url: string, token: string) => ImageTransport;
  /** The CAs an https store is verified with (--ca-file); default Node's roots. */
  tls?: ClientTls;
}

export interface FetchResult {
  record: ManifestRecord;
  json: Uint8Array;
  hit: boolean;
}

interface Lease {
  digest: string;
  expiresAtMs: number;
}

/**
 * An error of the cache itself (not of a location): ends a fetch at once.
 * Recognised by its brand: ConnectError's `instanceof` accepts any
 * ConnectError-shaped object, so it cannot tell subclasses apart.
 */
class LocalError extends ConnectError {
  readonly local = true;
}

function isLocal(err: unknown): boolean {
  return typeof err === "object" && err !== null && (err as { local?: unknown }).local === true;
}

export class ImageCache implements CacheHooks {
  readonly #o: CacheOptions;
  /** Opens a transport to a store. */
  readonly #transport: (url: string, token: string) => ImageTransport;
  readonly #store: BlobStore;
  readonly #log: Logger;
  readonly #clock: () => number;
  readonly #leases = new Map<string, Lease>();
  readonly #lastAccess = new Map<string, number>();
  readonly #fetches = new Map<string, { listeners: Set<(p: TransferProgress) => void>; result: Promise<FetchResult> }>();
  #dirty = false;
  /** The state write in progress (or done), and the one queued behind it, not yet started. */
  #writing: Promise<void> = Promise.resolve();
  #queued: Promise<void> | undefined;
  #timer: Promise<void> | undefined;
  readonly #stop = new AbortController();
  readonly counters = { hits: 0, misses: 0, evictions: 0, bytesFetched: 0 };

  constructor(options: CacheOptions) {
    this.#o = options;
    this.#transport = options.transport ?? ((url, token) => imageStoreTransport(url, { token, tls: options.tls }));
    this.#store = options.store;
    this.#log = options.logger;
    this.#clock = options.clock ?? Date.now;
  }

  get #statePath(): string {
    return join(this.#o.dataDir, "cache.json");
  }

  /** Loads leases and access times; starts the periodic enforcement. */
  async open(): Promise<void> {
    try {
      const state = JSON.parse(await readFile(this.#statePath, "utf8")) as {
        leases?: Record<string, Lease>;
        lastAccess?: Record<string, number>;
      };
      for (const [id, lease] of Object.entries(state.leases ?? {})) this.#leases.set(id, lease);
      for (const [digest, ms] of Object.entries(state.lastAccess ?? {})) this.#lastAccess.set(digest, ms);
    } catch (err) {
      if ((err as { code?: string }).code !== "ENOENT") this.#log.warn({ err }, "cache state unreadable; starting without leases");
    }
    this.#timer = this.#loop(this.#stop.signal);
  }

  async close(): Promise<void> {
    this.#stop.abort();
    await this.#timer;
    await this.#save();
  }

  async #loop(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      await sleep(this.#o.evictIntervalMs, signal).catch(() => undefined);
      if (signal.aborted) break;
      await this.enforce().catch((err: unknown) => this.#log.warn({ err }, "cache limits not enforced"));
    }
  }

  /** Drops expired leases and evicts until the cap and floor hold. */
  async enforce(): Promise<void> {
    const now = this.#clock();
    for (const [id, lease] of this.#leases) {
      if (lease.expiresAtMs <= now) {
        this.#leases.delete(id);
        this.#dirty = true;
        this.#log.info({ leaseId: id, digest: lease.digest }, "lease expired");
      }
    }
    await this.#makeRoom(0, new Set()).catch((err: unknown) => {
      if (!isLocal(err)) throw err;
      this.#log.warn({ usedBytes: this.#store.usedBytes }, "cache over its limits and nothing left to evict");
    });
    await this.#save();
  }

  /**
   * Saves the state if it changed; resolves once a write that began after
   * this call has ended. Writes run one at a time; a call made while a write
   * is queued (not yet begun) joins that write, which reads the state when it
   * begins, so many concurrent saves cost two writes at most.
   */
  #save(): Promise<void> {
    if (this.#queued) return this.#queued;
    const queued = this.#writing.then(async () => {
      this.#queued = undefined;
      if (!this.#dirty) return;
      this.#dirty = false;
      const state = { leases: Object.fromEntries(this.#leases), lastAccess: Object.fromEntries(this.#lastAccess) };
      await atomicWrite(this.#statePath, JSON.stringify(state)).catch((err: unknown) => {
        this.#dirty = true;
        this.#log.warn({ err }, "cache state not saved");
      });
    });
    this.#queued = queued;
    this.#writing = queued;
    return queued;
  }

  // ---- CacheHooks ----

  touch(digest: string): void {
    this.#lastAccess.set(digest, this.#clock());
    this.#dirty = true;
  }

  entryInfo(digest: string): { lastAccessMs?: number; pinned: boolean } {
    return { lastAccessMs: this.#lastAccess.get(digest) ?? this.#store.getManifestRecord(digest)?.createdMs, pinned: this.isPinned(digest) };
  }

  isPinned(digest: string): boolean {
    const now = this.#clock();
    for (const lease of this.#leases.values()) if (lease.digest === digest && lease.expiresAtMs > now) return true;
    return false;
  }

  // ---- leases ----

  /** Whether the manifest and every blob it references are here. */
  async isComplete(digest: string): Promise<boolean> {
    const record = this.#store.getManifestRecord(digest);
    if (!record) return false;
    for (const [blob, size] of record.blobs) {
      const s = await this.#store.statBlob(blob);
      if (s?.size !== size) return false;
    }
    return true;
  }

  /** Creates or renews a lease; the image must be completely cached unless `evenIfMissing`. */
  async pin(digest: string, leaseId: string, ttlMs: number, evenIfMissing = false): Promise<number> {
    if (!evenIfMissing && !(await this.isComplete(digest))) {
      throw new ConnectError(`image ${digest} is not completely cached: fetch it first`, Code.NotFound);
    }
    const expiresAtMs = this.#clock() + ttlMs;
    this.#leases.set(leaseId, { digest, expiresAtMs });
    this.touch(digest);
    await this.#save();
    return expiresAtMs;
  }

  /** The lease's image, if the lease exists and is live. */
  leaseDigest(leaseId: string): string | undefined {
    const lease = this.#leases.get(leaseId);
    return lease && lease.expiresAtMs > this.#clock() ? lease.digest : undefined;
  }

  async unpin(leaseId: string): Promise<void> {
    if (this.#leases.delete(leaseId)) {
      this.#dirty = true;
      await this.#save();
    }
  }

  pinnedCount(): number {
    const now = this.#clock();
    return new Set([...this.#leases.values()].filter((l) => l.expiresAtMs > now).map((l) => l.digest)).size;
  }

  /** Where a blob is as clients mount the data directory; FailedPrecondition without a shared mount. */
  localPath(digest: string): string {
    if (this.#o.sharedPath === "") {
      throw new ConnectError("this cache has no shared mount configured (shared-path)", Code.FailedPrecondition);
    }
    return posix.join(this.#o.sharedPath, "blobs", "sha256", digest.slice("sha256:".length));
  }

  get hasSharedPath(): boolean {
    return this.#o.sharedPath !== "";
  }

  // ---- eviction ----

  /**
   * Evicts least recently used, unpinned images not in `protect` until `need`
   * more bytes fit under the cap and above the free-space floor. Throws
   * LocalError ResourceExhausted when nothing more can go.
   */
  async #makeRoom(need: number, protect: Set<string>): Promise<void> {
    for (;;) {
      const cap = this.#o.capBytes;
      const floor = this.#o.freeFloorBytes;
      const overCap = cap > 0 && this.#store.usedBytes + need > cap;
      const underFloor = floor > 0 && (await this.#store.freeBytes()) - need < floor;
      if (!overCap && !underFloor) return;
      const victim = this.#store
        .manifestRecords()
        .filter((r) => !protect.has(r.digest) && !this.isPinned(r.digest) && !this.#fetches.has(r.digest))
        .sort((a, b) => this.#accessOf(a) - this.#accessOf(b))[0];
      if (!victim) {
        throw new LocalError(
          overCap ? `image does not fit under the cache's cap of ${cap} bytes` : "image does not fit above the cache's free-space floor",
          Code.ResourceExhausted,
        );
      }
      await this.#evict(victim, protect);
    }
  }

  #accessOf(record: ManifestRecord): number {
    return this.#lastAccess.get(record.digest) ?? record.createdMs;
  }

  async #evict(record: ManifestRecord, protect: Set<string>): Promise<void> {
    await this.#store.deleteManifest(record.digest).catch(() => undefined);
    const blobs = [record.digest, ...record.blobs.keys()].filter((d) => !protect.has(d));
    const freed = await this.#store.removeUnreferenced(blobs);
    this.#lastAccess.delete(record.digest);
    this.#dirty = true;
    this.counters.evictions++;
    this.#log.info({ digest: record.digest, freedBytes: freed }, "image evicted");
  }

  // ---- fetch ----

  /**
   * Makes an image local (see ImageCacheService.Fetch) for a token whose
   * holder is `holder` (undefined: an admin token, which needs none).
   * Concurrent calls for one digest share one fetch: later callers get its
   * progress and result. Ends with the holder's possession recorded here,
   * confirmed by a location when the cache did not know it.
   */
  async fetch(
    digest: string,
    locations: string[],
    token: string,
    holder: string | undefined,
    onProgress: (p: TransferProgress) => void,
  ): Promise<FetchResult> {
    let job = this.#fetches.get(digest);
    if (!job) {
      const listeners = new Set<(p: TransferProgress) => void>();
      const result = this.#runFetch(digest, locations, token, holder, (p) => {
        for (const l of listeners) l(p);
      }).finally(() => this.#fetches.delete(digest));
      job = { listeners, result };
      this.#fetches.set(digest, job);
    }
    job.listeners.add(onProgress);
    let result: FetchResult;
    try {
      result = await job.result;
    } finally {
      job.listeners.delete(onProgress);
    }
    if (holder !== undefined && !(await this.#store.holds(digest, holder, { legacy: true }))) {
      await this.#confirmHolder(digest, locations, token, holder);
    }
    return result;
  }

  /**
   * Asks the locations, in order, whether `holder` holds the image there
   * (GetManifest with the holder's token); the first that serves it makes
   * the holder a holder here too. PermissionDenied when every location
   * refuses or lacks it, Unavailable when none could answer.
   */
  async #confirmHolder(digest: string, locations: string[], token: string, holder: string): Promise<void> {
    const failures: { url: string; error: ConnectError }[] = [];
    for (const url of locations) {
      const transport = this.#transport(url, token);
      try {
        const got = await imageStoreClient(transport).getManifest({ digest }, { timeoutMs: 30_000 });
        if (digestOf(createHash("sha256").update(got.manifestJson)) !== digest) throw new ConnectError(`manifest from ${url} does not match its digest`, Code.DataLoss);
        const record = this.#store.getManifestRecord(digest);
        await this.#store.addHolder([digest, ...(record?.blobs.keys() ?? [])], holder);
        return;
      } catch (err) {
        const error = ConnectError.from(err);
        this.#log.info({ digest, location: url, code: Code[error.code], reason: error.rawMessage }, "holder not confirmed by location");
        failures.push({ url, error });
      } finally {
        transport.close();
      }
    }
    const list = failures.map((f) => `${f.url}: ${Code[f.error.code]}: ${f.error.rawMessage}`).join("; ");
    const refused = failures.every((f) => [Code.NotFound, Code.PermissionDenied, Code.Unauthenticated].includes(f.error.code));
    throw new ConnectError(
      refused ? `no location confirms that the token's holder holds image ${digest} (${list})` : `no location could confirm the token's holder of image ${digest}: ${list}`,
      refused ? Code.PermissionDenied : Code.Unavailable,
    );
  }

  async #runFetch(
    digest: string,
    locations: string[],
    token: string,
    holder: string | undefined,
    emit: (p: TransferProgress) => void,
  ): Promise<FetchResult> {
    if (await this.isComplete(digest)) {
      try {
        const json = await this.#store.readManifest(digest);
        this.counters.hits++;
        this.touch(digest);
        return { record: this.#store.getManifestRecord(digest)!, json, hit: true };
      } catch (err) {
        if (ConnectError.from(err).code !== Code.DataLoss) throw err;
        // The manifest file was corrupt and is gone: fetch it again.
      }
    }
    this.counters.misses++;
    const failures: { url: string; error: ConnectError }[] = [];
    for (const url of locations) {
      const transport = this.#transport(url, token);
      try {
        const result = await this.#fetchFrom(url, imageStoreClient(transport), digest, emit);
        // The location served it to this token: its holder holds it there.
        if (holder !== undefined) await this.#store.addHolder([digest, ...result.record.blobs.keys()], holder);
        return result;
      } catch (err) {
        if (isLocal(err)) throw err;
        const error = ConnectError.from(err);
        this.#log.warn({ digest, location: url, code: Code[error.code], reason: error.rawMessage }, "fetch from location failed");
        failures.push({ url, error });
      } finally {
        transport.close();
      }
    }
    const list = failures.map((f) => `${f.url}: ${Code[f.error.code]}: ${f.error.rawMessage}`).join("; ");
    if (failures.every((f) => f.error.code === Code.NotFound)) {
      throw new ConnectError(`no location has image ${digest} (${list})`, Code.NotFound);
    }
    if (failures.every((f) => f.error.code === Code.NotFound || f.error.code === Code.DataLoss)) {
      // Every location answered, and what they served does not match: the image's fault, not an outage.
      throw new ConnectError(`no location has a sound copy of image ${digest}: its bytes do not match (${list})`, Code.DataLoss);
    }
    throw new ConnectError(`no location could serve image ${digest}: ${list}`, Code.Unavailable);
  }

  async #fetchFrom(url: string, client: ImageStoreClient, digest: string, emit: (p: TransferProgress) => void): Promise<FetchResult> {
    const got = await client.getManifest({ digest });
    const json = got.manifestJson;
    const actual = digestOf(createHash("sha256").update(json));
    if (actual !== digest) throw new ConnectError(`manifest from ${url} hashes to ${actual}`, Code.DataLoss);
    const manifest = parseManifest(json);
    const blobs = manifestBlobs(manifest);
    const progress = create(TransferProgressSchema, {
      bytesTotal: BigInt(json.length + [...blobs.values()].reduce((a, b) => a + b, 0)),
      blobCount: blobs.size,
      currentLocation: url,
    });
    let lastEmit = 0;
    const send = (force: boolean) => {
      const now = this.#clock();
      if (!force && now - lastEmit < PROGRESS_INTERVAL_MS) return;
      lastEmit = now;
      emit(create(TransferProgressSchema, progress));
    };
    const missing: [string, number][] = [];
    for (const [blob, size] of blobs) {
      const s = await this.#store.statBlob(blob);
      if (s?.size === size) {
        progress.bytesDone += BigInt(size);
        progress.blobsDone++;
      } else {
        missing.push([blob, size]);
      }
    }
    const protect = new Set([digest, ...blobs.keys()]);
    const need = missing.reduce((a, [, size]) => a + size, 0) + json.length;
    await this.#makeRoom(need, protect);
    send(true);
    for (const [blob, size] of missing) {
      progress.currentDigest = blob;
      progress.currentSize = BigInt(size);
      progress.currentBytesDone = 0n;
      const before = progress.bytesDone;
      await this.#fetchBlob(url, client, blob, size, (bytes) => {
        progress.currentBytesDone = BigInt(bytes);
        progress.bytesDone = before + BigInt(bytes);
        send(false);
      });
      progress.bytesDone = before + BigInt(size);
      progress.blobsDone++;
      send(true);
    }
    const record = await this.#store.putManifest(digest, json, undefined).catch((err: unknown) => {
      const e = ConnectError.from(err);
      throw e.code === Code.ResourceExhausted ? new LocalError(e.rawMessage, e.code) : e;
    });
    progress.bytesDone += BigInt(json.length);
    progress.currentDigest = "";
    send(true);
    this.touch(digest);
    return { record, json, hit: false };
  }

  /**
   * Downloads one blob from a location into the store, resuming a partial
   * upload left by an earlier location. A digest mismatch discards the bytes;
   * if they were resumed from another location's prefix, this location is
   * tried once more from zero before it is blamed.
   */
  async #fetchBlob(url: string, client: ImageStoreClient, digest: string, size: number, onBytes: (n: number) => void): Promise<void> {
    for (let attempt = 0; attempt < 2; attempt++) {
      const state = await this.#store.queryUpload(digest, undefined);
      const offset = state.size === size ? state.committedOffset : 0;
      const upload = await this.#store.beginUpload(digest, size, offset, undefined).catch((err: unknown) => {
        const e = ConnectError.from(err);
        throw e.code === Code.ResourceExhausted ? new LocalError(e.rawMessage, e.code) : e;
      });
      if (upload === "exists") return;
      const resumed = upload.offset > 0;
      onBytes(upload.offset);
      try {
        for await (const pieces of readBlobPieces(client, { digest, offset: upload.offset })) {
          const before = upload.offset;
          await upload.write(pieces);
          this.counters.bytesFetched += upload.offset - before;
          onBytes(upload.offset);
        }
      } catch (err) {
        await upload.suspend();
        const e = ConnectError.from(err);
        if (e.code === Code.ResourceExhausted && e.rawMessage === "image store is full") throw new LocalError(e.rawMessage, e.code);
        throw err;
      }
      let result;
      try {
        result = await upload.finish();
      } catch (err) {
        if (ConnectError.from(err).code === Code.InvalidArgument) {
          if (resumed) continue;
          throw new ConnectError(`${url} served bytes of ${digest} that do not match its digest`, Code.DataLoss);
        }
        throw err;
      }
      if (!result.complete) throw new ConnectError(`${url} ended ${digest} at ${result.committedSize} of ${size} bytes`, Code.DataLoss);
      return;
    }
    throw new ConnectError(`${url} served bytes of ${digest} that do not match its digest`, Code.DataLoss);
  }

  // ---- push ----

  /** Uploads a cached image to another store, resumably (see ImageCacheService.Push). */
  async push(
    digest: string,
    targetUrl: string,
    targetToken: string,
    onProgress: (p: TransferProgress) => void,
    signal: AbortSignal,
  ): Promise<{ bytesUploaded: number; blobsSkipped: number }> {
    const record = this.#store.getManifestRecord(digest);
    if (!record) throw new ConnectError(`image ${digest} is not cached`, Code.NotFound);
    const json = await this.#store.readManifest(digest);
    for (const [blob] of record.blobs) {
      if (!(await this.#store.statBlob(blob))) throw new ConnectError(`image ${digest} is not completely cached`, Code.NotFound);
    }
    this.touch(digest);
    const transport = this.#transport(targetUrl, targetToken);
    const client = imageStoreClient(transport);
    const progress = create(TransferProgressSchema, {
      bytesTotal: BigInt(record.totalSize),
      blobCount: record.blobs.size,
      currentLocation: targetUrl,
    });
    let lastEmit = 0;
    const send = (force: boolean) => {
      const now = this.#clock();
      if (!force && now - lastEmit < PROGRESS_INTERVAL_MS) return;
      lastEmit = now;
      onProgress(create(TransferProgressSchema, progress));
    };
    let bytesUploaded = 0;
    let blobsSkipped = 0;
    try {
      for (const [blob, size] of record.blobs) {
        const before = progress.bytesDone;
        progress.currentDigest = blob;
        progress.currentSize = BigInt(size);
        const result = await uploadBlob(
          client,
          { digest: blob, size, source: fileSource(this.#store.blobPath(blob)) },
          {
            signal,
            onProgress: (p) => {
              progress.currentBytesDone = BigInt(p.bytesDone);
              progress.bytesDone = before + BigInt(p.bytesDone);
              send(false);
            },
          },
        );
        bytesUploaded += result.bytesSent;
        if (result.alreadyExisted) blobsSkipped++;
        progress.bytesDone = before + BigInt(size);
        progress.blobsDone++;
        send(true);
      }
      await client.putManifest({ digest, manifestJson: json }, { signal });
      progress.bytesDone = BigInt(record.totalSize);
      progress.currentDigest = "";
      send(true);
      return { bytesUploaded, blobsSkipped };
    } finally {
      transport.close();
    }
  }
}
