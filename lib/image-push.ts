import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { ImageService } from "../gen/treadmill/coordinator/v1/image_service_pb.js";
import type { Image } from "../gen/treadmill/coordinator/v1/image_pb.js";
import { fileSource } from "./image/blob-io.js";
import { imageStoreClient, imageStoreTransport, uploadBlob, type BlobProgress } from "./image/client.js";

/** An image on local disk, ready to push: manifest bytes and every blob's file. */
export interface LocalImage {
  manifestDigest: string;
  manifestJson: Uint8Array;
  /** Blobs by digest: the local file and its size. */
  blobs: { digest: string; size: number; path: string }[];
  /** Layer media types, for the catalog. */
  mediaTypes: string[];
}

/**
 * Pushes an image and names it (DESIGN.md §6): asks the coordinator for an
 * upload grant naming the image's digests (a store and an image:write
 * token), uploads each blob resumably (a blob the user holds there returns
 * at once; a re-run resumes an interrupted one; a blob the store has from
 * someone else is sent whole, as proof of possession), stores the manifest,
 * and registers `name:tag` in the catalog with the store as its location.
 * `coordinator` carries the user's token. Errors are the RPCs' own
 * ConnectErrors.
 */
export async function pushImage(
  coordinator: Transport,
  image: LocalImage,
  options: {
    name: string;
    tag: string;
    site?: string;
    replace?: boolean;
    signal?: AbortSignal;
    onProgress?: (progress: BlobProgress & { blobIndex: number; blobCount: number }) => void;
  },
): Promise<Image> {
  const catalog = createClient(ImageService, coordinator);
  const totalSize = image.blobs.reduce((sum, b) => sum + b.size, 0) + image.manifestJson.length;
  const grant = await catalog.createUploadGrant({
    site: options.site ?? "",
    sizeBytes: BigInt(totalSize),
    digests: [image.manifestDigest, ...image.blobs.map((b) => b.digest)],
  });
  const token = grant.writeToken?.token;
  if (!token) throw new ConnectError("upload grant came without a token", Code.Internal);
  await uploadImage(grant.storeUrl, token, image, options);
  const registered = await catalog.registerImage(
    {
      name: options.name,
      tag: options.tag,
      manifestDigest: image.manifestDigest,
      storeIds: [grant.storeId],
      mediaTypes: [...new Set(image.mediaTypes)],
      sizeBytes: BigInt(totalSize),
      replace: options.replace ?? false,
    },
    { signal: options.signal },
  );
  if (!registered.image) throw new ConnectError("register image answered without the image", Code.Internal);
  return registered.image;
}

/**
 * Uploads an image's blobs (each resumably; a blob the writer holds there
 * returns at once) and then its manifest to the store (or cache) at
 * `storeUrl`, with an `image:write` token (a string, or a function for a
 * token renewed meanwhile). Blobs in `mount.digests` are not sent: the
 * manifest mounts them with `mount.tokens` (image:read tokens, minted for
 * the write token's subject, of images that contain them); if the store
 * refuses the mount (it lacks that image, say), they are uploaded after all.
 */
export async function uploadImage(
  storeUrl: string,
  token: string | (() => string),
  image: LocalImage,
  options: {
    signal?: AbortSignal;
    onProgress?: (progress: BlobProgress & { blobIndex: number; blobCount: number }) => void;
    mount?: { tokens: string[]; digests: ReadonlySet<string> };
  } = {},
): Promise<void> {
  const transport = imageStoreTransport(storeUrl, { token });
  try {
    const store = imageStoreClient(transport);
    const upload = async (skip: ReadonlySet<string>) => {
      for (const [index, blob] of image.blobs.entries()) {
        if (skip.has(blob.digest)) continue;
        await uploadBlob(
          store,
          { digest: blob.digest, size: blob.size, source: fileSource(blob.path) },
          {
            signal: options.signal,
            onProgress: (p) => options.onProgress?.({ ...p, blobIndex: index, blobCount: image.blobs.length }),
          },
        );
      }
    };
    const put = (mountTokens: string[]) =>
      store.putManifest({ digest: image.manifestDigest, manifestJson: image.manifestJson, mountTokens }, { signal: options.signal });
    const mount = options.mount;
    if (!mount || mount.digests.size === 0) {
      await upload(new Set());
      await put([]);
      return;
    }
    await upload(mount.digests);
    try {
      await put(mount.tokens);
    } catch (err) {
      if (ConnectError.from(err).code !== Code.PermissionDenied) throw err;
      await upload(new Set(image.blobs.map((b) => b.digest).filter((d) => !mount.digests.has(d))));
      await put([]);
    }
  } finally {
    transport.close();
  }
}
