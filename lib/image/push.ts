/**
 * Pushing an image (DESIGN.md §6), the one implementation that `tml image
 * push`, the supervisor's snapshots and the testbed use. Three steps, each
 * exported so that a caller can frame them (the CLI names the store in its
 * errors while it uploads):
 *
 * 1. `requestUploadGrant`: the coordinator names a store and gives an
 *    `image:write` token for the image's digests.
 * 2. `uploadImage`: every blob resumably (a blob the writer holds there
 *    returns at once; a re-run resumes an interrupted one; a blob the store
 *    has from someone else is sent whole, as proof of possession), then the
 *    manifest.
 * 3. `registerImage`: `name:tag` in the catalog, with the store as its
 *    location.
 *
 * `pushImage` runs the three. Errors are the RPCs' own ConnectErrors.
 */
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import type { Image, ImageVisibility } from "../../gen/treadmill/coordinator/v1/image_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { fileSource, limitedSource } from "./blob-io.js";
import { imageStoreClient, imageStoreTransport, uploadBlob, type BlobProgress } from "./client.js";
import type { ClientTls } from "../grpc/trust.js";

/** An image on local disk, ready to push: manifest bytes and every blob's file. */
export interface LocalImage {
  manifestDigest: string;
  manifestJson: Uint8Array;
  /** Blobs by digest: the local file and its size. */
  blobs: { digest: string; size: number; path: string }[];
  /** Layer media types, for the catalog. */
  mediaTypes: string[];
}

/** One blob of an upload, with its place in the image. */
export interface BlobOfImage {
  digest: string;
  size: number;
  /** Its index in `LocalImage.blobs`. */
  index: number;
  count: number;
}

/** What a caller shows of one blob's upload (`tml image push` draws a bar). */
export interface BlobUploadObserver {
  /** Bytes of the blob at the store so far (a resumed prefix included). */
  progress(bytesDone: number): void;
  /** The whole blob is at the store. */
  done(): void;
  /** The upload failed; its error is thrown next. */
  failed(): void;
}

export interface UploadOptions {
  signal?: AbortSignal;
  /** The CAs an https store is verified with; default Node's roots. */
  tls?: ClientTls;
  /** Deadline of each unary call (QueryUpload, PutManifest), ms; default none. */
  timeoutMs?: number;
  /** Send at most this many bytes per second. */
  bytesPerSecond?: number;
  /** Called as each blob's bytes go up, with its place in the image. */
  onProgress?: (progress: BlobProgress & { blobIndex: number; blobCount: number }) => void;
  /**
   * Called once per blob, when the store said what it holds of it: the whole
   * blob (`exists`), or a prefix to resume from. What it returns follows
   * that blob's upload.
   */
  onBlob?: (blob: BlobOfImage, held: { exists: boolean; committedOffset: number }) => BlobUploadObserver | undefined;
  /**
   * Blobs in `digests` are not sent: the manifest mounts them with `tokens`
   * (image:read tokens, minted for the write token's subject, of images that
   * contain them); if the store refuses the mount (it lacks that image, say),
   * they are uploaded after all.
   */
  mount?: { tokens: string[]; digests: ReadonlySet<string> };
}

/** The coordinator's answer to an upload request: where to upload, and with what. */
export interface UploadGrant {
  storeId: string;
  storeUrl: string;
  /** The `image:write` token. */
  token: string;
}

/**
 * Asks the coordinator where to upload `image`: a store (the given one, or
 * one of `site`, or the coordinator's pick) and an `image:write` token that
 * names the image's digests, which lets the pusher register them.
 */
export async function requestUploadGrant(
  catalog: Client<typeof ImageService>,
  image: LocalImage,
  options: { storeId?: string; site?: string; signal?: AbortSignal; timeoutMs?: number } = {},
): Promise<UploadGrant> {
  const grant = await catalog.createUploadGrant(
    {
      storeId: options.storeId ?? "",
      site: options.site ?? "",
      sizeBytes: BigInt(totalBytes(image)),
      digests: [...new Set([image.manifestDigest, ...image.blobs.map((b) => b.digest)])],
    },
    { signal: options.signal, timeoutMs: options.timeoutMs },
  );
  const token = grant.writeToken?.token;
  if (!token) throw new ConnectError("upload grant came without a token", Code.Internal);
  return { storeId: grant.storeId, storeUrl: grant.storeUrl, token };
}

/**
 * Uploads an image's blobs (each resumably) and then its manifest to the
 * store (or cache) at `storeUrl`, with an `image:write` token (a string, or
 * a function for a token renewed meanwhile). Resolves with the image's size
 * as the store counts it (manifest and every blob).
 */
export async function uploadImage(
  storeUrl: string,
  token: string | (() => string),
  image: LocalImage,
  options: UploadOptions = {},
): Promise<{ totalSize: bigint }> {
  const transport = imageStoreTransport(storeUrl, { token, tls: options.tls });
  try {
    const store = imageStoreClient(transport);
    const count = image.blobs.length;
    const upload = async (skip: ReadonlySet<string>) => {
      for (const [index, blob] of image.blobs.entries()) {
        if (skip.has(blob.digest)) continue;
        const file = fileSource(blob.path);
        const source = options.bytesPerSecond === undefined ? file : limitedSource(file, options.bytesPerSecond);
        let observer: BlobUploadObserver | undefined;
        try {
          await uploadBlob(
            store,
            { digest: blob.digest, size: blob.size, source },
            {
              signal: options.signal,
              queryTimeoutMs: options.timeoutMs,
              onHeld: (held) => (observer = options.onBlob?.({ digest: blob.digest, size: blob.size, index, count }, held)),
              onProgress: (p) => {
                observer?.progress(p.bytesDone);
                options.onProgress?.({ ...p, blobIndex: index, blobCount: count });
              },
            },
          );
        } catch (err) {
          observer?.failed();
          throw err;
        }
        observer?.done();
      }
    };
    const put = (mountTokens: string[]) =>
      store.putManifest(
        { digest: image.manifestDigest, manifestJson: image.manifestJson, mountTokens },
        { signal: options.signal, timeoutMs: options.timeoutMs },
      );
    const mount = options.mount;
    if (!mount || mount.digests.size === 0) {
      await upload(new Set());
      return { totalSize: (await put([])).totalSize };
    }
    await upload(mount.digests);
    try {
      return { totalSize: (await put(mount.tokens)).totalSize };
    } catch (err) {
      if (ConnectError.from(err).code !== Code.PermissionDenied) throw err;
      await upload(new Set(image.blobs.map((b) => b.digest).filter((d) => !mount.digests.has(d))));
      return { totalSize: (await put([])).totalSize };
    }
  } finally {
    transport.close();
  }
}

export interface RegisterOptions {
  name: string;
  tag: string;
  /** The image's size as the store counts it (uploadImage's answer). */
  sizeBytes: bigint;
  /** The catalog entry's annotations (the manifest's are the store's). */
  annotations?: Record<string, string>;
  visibility?: ImageVisibility;
  /** Move an existing `name:tag` to this image. */
  replace?: boolean;
  signal?: AbortSignal;
  timeoutMs?: number;
}

/** Names an uploaded image `name:tag` in the catalog, with the grant's store as its location. */
export async function registerImage(
  catalog: Client<typeof ImageService>,
  image: LocalImage,
  grant: Pick<UploadGrant, "storeId">,
  options: RegisterOptions,
): Promise<Image> {
  const registered = await catalog.registerImage(
    {
      name: options.name,
      tag: options.tag,
      manifestDigest: image.manifestDigest,
      storeIds: [grant.storeId],
      mediaTypes: [...new Set(image.mediaTypes)],
      sizeBytes: options.sizeBytes,
      annotations: options.annotations,
      visibility: options.visibility,
      replace: options.replace ?? false,
    },
    { signal: options.signal, timeoutMs: options.timeoutMs },
  );
  if (!registered.image) throw new ConnectError("register image answered without the image", Code.Internal);
  return registered.image;
}

/**
 * Pushes an image and names it: requestUploadGrant, uploadImage,
 * registerImage. `coordinator` carries the user's token.
 */
export async function pushImage(
  coordinator: Transport,
  image: LocalImage,
  options: Omit<RegisterOptions, "sizeBytes"> & Omit<UploadOptions, "mount"> & { storeId?: string; site?: string },
): Promise<Image> {
  const catalog = createClient(ImageService, coordinator);
  const grant = await requestUploadGrant(catalog, image, options);
  const { totalSize } = await uploadImage(grant.storeUrl, grant.token, image, options);
  return registerImage(catalog, image, grant, { ...options, sizeBytes: totalSize });
}

/** Bytes of the image's blobs and manifest. */
function totalBytes(image: LocalImage): number {
  return image.blobs.reduce((sum, b) => sum + b.size, 0) + image.manifestJson.length;
}
