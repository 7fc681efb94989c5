import { createHash, randomUUID } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, stat } from "node:fs/promises";
import { join } from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { ImageCacheService } from "../gen/treadmill/image/v1/image_cache_service_pb.js";
import type { ImageSource } from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { Manifest } from "../gen/treadmill/image/v1/manifest_pb.js";
import {
  downloadBlob,
  imageStoreClient,
  imageStoreTransport,
  type ImageTransport,
} from "../lib/image/client.js";
import { DIGEST_PATTERN, DigestMismatchError, digestOfBytes } from "../lib/image/digest.js";
import type { ClientTls } from "../lib/grpc/trust.js";
import type { Logger } from "../lib/logger.js";
import { backoff, isNetworkError, sleep } from "../lib/retry.js";
import type { JobImage } from "./drivers/driver.js";

/**
 * The image itself cannot be used: every place asked said it is missing,
 * refused this job's token for it, or served bytes that do not match its
 * digest. The user's fault: the attempt ends IMAGE_ERROR.
 */
export class ImageError extends Error {
  override readonly name = "ImageError";
}

/**
 * The image could not be had because its cache or stores were unreachable
 * (or failed) for longer than the fetch budget: an infrastructure failure,
 * which the restart policy re-queues.
 */
export class ImageUnavailableError extends Error {
  override readonly name = "ImageUnavailableError";
}

/** Codes that are the image's (or the token's) fault, not the place's. */
const IMAGE_FAULTS = new Set([Code.NotFound, Code.PermissionDenied, Code.InvalidArgument]);

/** Whether a failure says the image is unusable (rather than its source unreachable or failing). */
function isImageFault(err: unknown): boolean {
  // By code and message: ConnectError's instanceof takes any ConnectError
  // for a DigestMismatchError.
  const error = ConnectError.from(err);
  return IMAGE_FAULTS.has(error.code) || (error.code === Code.DataLoss && /not match|hash(es)? to/.test(error.rawMessage));
}

/** `not_found`, `unavailable`: a code as the log and the job's channel show it. */
function codeName(code: Code): string {
  return Code[code].replace(/[a-z](?=[A-Z])/g, "$&_").toLowerCase();
}

/** A job's image on this host, held until `release()`. */
export interface ProvisionedImage {
  image: JobImage;
  /** Unpins the image at the cache (best effort). Idempotent. */
  release(): Promise<void>;
}

export interface ProvisionOptions {
  signal: AbortSignal;
  /** Overall progress in bytes, for the job's `supervisor` channel. */
  onProgress?: (done: number, total: number) => void;
  /** What the fetch is going through (a source failed, a retry is coming), for the job's `supervisor` channel. */
  onNotice?: (text: string) => void;
  /** The current image:read token (StartJob may renew it). */
  token: () => string;
}

export interface ImageProvisionerOptions {
  blobDir: string;
  logger: Logger;
  /**
   * The fetch budget: how long after it began a fetch whose sources are
   * unreachable is tried again (a round that started within it runs to its
   * end). Default 5 minutes.
   */
  fetchBudgetMs?: number;
  /** Delays between rounds; default backoff from 1 s to 15 s with full jitter. */
  retryDelays?: () => Iterator<number>;
  clock?: () => number;
  /** The CAs an https cache or store is verified with (--ca-file); default Node's roots. */
  tls?: ClientTls;
}

/** The default fetch budget (supervisor config `image-fetch-budget-ms`). */
export const DEFAULT_FETCH_BUDGET_MS = 5 * 60_000;

/** How long a pin lasts unless renewed; renewed at a third of it while the job runs. */
const LEASE_TTL_MS = 10 * 60 * 1000;

/**
 * Gets a job's image onto this host (DESIGN.md §6): through the site cache
 * when StartJob names one (Fetch pins it with a lease that is renewed while
 * the job runs; blobs are read in place from the cache's shared directory),
 * falling back to the stores in `location_urls`, in order, into this
 * supervisor's own blob directory. Every blob's digest is verified here too:
 * nothing trusts a store or a cache for integrity (DESIGN.md §3).
 *
 * A round asks the cache, then each store. When every place says the image
 * is missing or corrupt (or refuses the token), provision throws ImageError.
 * Otherwise (something was unreachable or failed) another round follows
 * after a backoff delay, while the fetch budget lasts; then it throws
 * ImageUnavailableError. Each failure and retry is told to `onNotice`.
 */
export class ImageProvisioner {
  /** Digests already verified at a path, keyed by path, size and mtime. */
  private readonly verified = new Map<string, string>();
  private readonly budgetMs: number;
  private readonly clock: () => number;

  constructor(private readonly options: ImageProvisionerOptions) {
    this.budgetMs = options.fetchBudgetMs ?? DEFAULT_FETCH_BUDGET_MS;
    this.clock = options.clock ?? Date.now;
  }

  async provision(source: ImageSource, options: ProvisionOptions): Promise<ProvisionedImage> {
    if (!DIGEST_PATTERN.test(source.manifestDigest)) {
      throw new ImageError(`image manifest digest ${source.manifestDigest} is malformed`);
    }
    const places: { name: string; get: () => Promise<ProvisionedImage> }[] = [];
    if (source.cacheUrl !== "") places.push({ name: `image cache ${source.cacheUrl}`, get: () => this.throughCache(source, options) });
    for (const url of source.locationUrls) places.push({ name: `image store ${url}`, get: () => this.fromStore(url, source, options) });
    if (places.length === 0) throw new ImageError("the job's image has no cache and no location");
    const deadline = this.clock() + this.budgetMs;
    const delays = this.options.retryDelays?.() ?? backoff({ initialMs: 1000, maxMs: 15_000, jitter: "full" });
    for (let round = 1; ; round++) {
      const failures: { name: string; text: string; imageFault: boolean }[] = [];
      for (const [i, place] of places.entries()) {
        try {
          return await place.get();
        } catch (err) {
          if (options.signal.aborted) throw err;
          const error = ConnectError.from(err);
          const code = isNetworkError(err) ? Code.Unavailable : error.code;
          const failure = { name: place.name, text: `${codeName(code)}: ${error.rawMessage}`, imageFault: isImageFault(err) };
          failures.push(failure);
          this.options.logger.warn({ place: place.name, err: failure.text }, "image source failed");
          const next = places[i + 1];
          if (next) options.onNotice?.(`${place.name} failed (${failure.text}); trying ${next.name}`);
        }
      }
      const summary = failures.map((f) => `${f.name}: ${f.text}`).join("; ");
      if (failures.every((f) => f.imageFault)) throw new ImageError(`image ${source.manifestDigest} cannot be used: ${summary}`);
      const delay = delays.next().value as number;
      if (this.clock() + delay > deadline) {
        throw new ImageUnavailableError(
          `image ${source.manifestDigest} could not be fetched within the fetch budget of ${Math.round(this.budgetMs / 1000)} s (${round} attempts): ${summary}`,
        );
      }
      const down = failures.filter((f) => !f.imageFault).map((f) => f.name);
      options.onNotice?.(`${down.join(", ")} unreachable or failing, retrying in ${formatDelay(delay)} (attempt ${round + 1})`);
      await sleep(delay, options.signal);
    }
  }

  private async throughCache(source: ImageSource, options: ProvisionOptions): Promise<ProvisionedImage> {
    const transport = imageStoreTransport(source.cacheUrl, { token: options.token, tls: this.options.tls });
    const cache = createClient(ImageCacheService, transport);
    const leaseId = randomUUID();
    let manifest: Manifest | undefined;
    let paths = new Map<string, string>();
    try {
      for await (const message of cache.fetch(
        {
          manifestDigest: source.manifestDigest,
          locations: source.locationUrls,
          token: options.token(),
          leaseId,
          leaseTtl: { seconds: BigInt(LEASE_TTL_MS / 1000) },
        },
        { signal: options.signal },
      )) {
        if (message.payload.case === "progress") {
          options.onProgress?.(Number(message.payload.value.bytesDone), Number(message.payload.value.bytesTotal));
        } else if (message.payload.case === "done") {
          manifest = message.payload.value.manifest;
          paths = new Map(message.payload.value.blobs.map((b) => [b.digest, b.path]));
        }
      }
      if (!manifest) throw new ConnectError("image cache ended the fetch without the image", Code.Unavailable);
      const store = imageStoreClient(transport);
      const image = await this.jobImage(source.manifestDigest, manifest, async (digest, size) => {
        const shared = paths.get(digest);
        if (shared !== undefined) {
          // The cache's directory is mounted here (same machine, or NFS).
          await this.verify(shared, digest);
          return shared;
        }
        // No shared mount: copy the blob from the cache, which serves it too.
        return this.download(store, digest, size, options);
      });
      const renew = setInterval(() => {
        cache
          .pin({ manifestDigest: source.manifestDigest, leaseId, ttl: { seconds: BigInt(LEASE_TTL_MS / 1000) } })
          .catch((err: unknown) => this.options.logger.warn({ err: ConnectError.from(err).rawMessage }, "cannot renew image pin"));
      }, LEASE_TTL_MS / 3);
      let released: Promise<void> | undefined;
      return {
        image,
        release: () => {
          released ??= (async () => {
            clearInterval(renew);
            await cache.unpin({ leaseId }, { timeoutMs: 5000 }).catch(() => undefined);
            transport.close();
          })();
          return released;
        },
      };
    } catch (err) {
      await cache.unpin({ leaseId }, { timeoutMs: 5000 }).catch(() => undefined);
      transport.close();
      throw err;
    }
  }

  /** The image from one store, into this supervisor's blob directory. */
  private async fromStore(url: string, source: ImageSource, options: ProvisionOptions): Promise<ProvisionedImage> {
    const transport: ImageTransport = imageStoreTransport(url, { token: options.token, tls: this.options.tls });
    try {
      const store = imageStoreClient(transport);
      const got = await store.getManifest({ digest: source.manifestDigest }, { signal: options.signal, timeoutMs: 30000 });
      if (!got.manifest) throw new ConnectError("store answered without a manifest", Code.DataLoss);
      const actual = digestOfBytes(got.manifestJson);
      if (actual !== source.manifestDigest) throw new DigestMismatchError(source.manifestDigest, actual);
      const total = got.manifest.layers.reduce((sum, l) => sum + Number(l.size), 0);
      let before = 0;
      const image = await this.jobImage(source.manifestDigest, got.manifest, async (digest, size) => {
        const path = await this.download(store, digest, size, {
          ...options,
          onProgress: (done) => options.onProgress?.(before + done, total),
        });
        before += size;
        options.onProgress?.(before, total);
        return path;
      });
      return { image, release: async () => transport.close() };
    } catch (err) {
      transport.close();
      throw err;
    }
  }

  private async jobImage(
    manifestDigest: string,
    manifest: Manifest,
    blobPath: (digest: string, size: number) => Promise<string>,
  ): Promise<JobImage> {
    const layers = [];
    for (const layer of manifest.layers) {
      if (!DIGEST_PATTERN.test(layer.digest)) {
        throw new ConnectError(`manifest layer digest ${layer.digest} is malformed`, Code.InvalidArgument);
      }
      layers.push({
        digest: layer.digest,
        mediaType: layer.mediaType,
        size: Number(layer.size),
        annotations: { ...layer.annotations },
        path: await blobPath(layer.digest, Number(layer.size)),
      });
    }
    return { manifestDigest, layers, annotations: { ...manifest.annotations } };
  }

  /** Downloads one blob into this supervisor's blob directory (once), verified. */
  private async download(
    store: ReturnType<typeof imageStoreClient>,
    digest: string,
    size: number,
    options: ProvisionOptions,
  ): Promise<string> {
    await mkdir(this.options.blobDir, { recursive: true });
    const path = join(this.options.blobDir, digest.replace(":", "-"));
    if (!(await this.isVerified(path, digest))) {
      await downloadBlob(store, { digest, size }, path, {
        signal: options.signal,
        onProgress: (p) => options.onProgress?.(p.bytesDone, size),
      });
      await this.verify(path, digest);
    }
    return path;
  }

  private async isVerified(path: string, digest: string): Promise<boolean> {
    const st = await stat(path).catch(() => undefined);
    return st !== undefined && this.verified.get(`${path}:${st.size}:${st.mtimeMs}`) === digest;
  }

  /** Hashes the file at `path` (once per path, size and mtime) and checks it is `digest`. */
  private async verify(path: string, digest: string): Promise<void> {
    if (await this.isVerified(path, digest)) return;
    const st = await stat(path);
    const hash = createHash("sha256");
    for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
    const actual = `sha256:${hash.digest("hex")}`;
    if (actual !== digest) throw new DigestMismatchError(digest, actual);
    this.verified.set(`${path}:${st.size}:${st.mtimeMs}`, digest);
  }
}

function formatDelay(ms: number): string {
  return ms < 1000 ? `${ms} ms` : `${Math.round(ms / 100) / 10} s`;
}
