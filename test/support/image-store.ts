// An image store for tests (the store's own, the supervisor's image fetch,
// conformance, security): a real server on port 0 over a temporary data
// directory, a token signer whose public keys the server trusts, clients
// over real HTTP/2 connections, and blobs and manifests to put in it.
import { afterAll, beforeAll } from "@jest/globals";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { ImageCacheService } from "../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { type BlobSource } from "../../lib/image/blob-io.js";
import {
  imageStoreClient,
  imageStoreTransport,
  uploadBlob,
  type ImageStoreClient,
  type ImageTransport,
} from "../../lib/image/client.js";
import { digestOfBytes } from "../../lib/image/digest.js";
import { MANIFEST_MEDIA_TYPE, RAW_MEDIA_TYPE } from "../../lib/image/media-types.js";
import { silentLogger } from "../../lib/logger.js";
import { TokenSigner, generateSigningKey, type Capability } from "../../lib/tokens.js";
import { loadImageStoreConfig, type ImageStoreConfig } from "../../stores/image/config.js";
import { createImageStore, type ImageStoreComponent, type ImageStoreDeps } from "../../stores/image/image-store.js";
export { errorCodeOf as codeOf } from "./codes.js";

/** The digest of `data`. */
export function sha256(data: Uint8Array): string {
  return digestOfBytes(data);
}

/** A random blob and its digest. */
export function randomBlob(size: number): { data: Buffer; digest: string; size: number } {
  const data = randomBytes(size);
  return { data, digest: sha256(data), size };
}

/** A manifest JSON over the given layers (and its digest). */
export function manifestFor(
  layers: { digest: string; size: number; mediaType?: string; annotations?: Record<string, string> }[],
  annotations: Record<string, string> = {},
): { json: Buffer; digest: string } {
  const doc = {
    schemaVersion: 2,
    mediaType: MANIFEST_MEDIA_TYPE,
    layers: layers.map((l) => ({
      mediaType: l.mediaType ?? RAW_MEDIA_TYPE,
      digest: l.digest,
      size: l.size,
      ...(l.annotations ? { annotations: l.annotations } : {}),
    })),
    annotations,
  };
  const json = Buffer.from(JSON.stringify(doc));
  return { json, digest: sha256(json) };
}

export interface Signer {
  signer: TokenSigner;
  token(capability: Capability, ttlMs?: number): Promise<string>;
  /** A token of this signer that expired an hour ago. */
  expiredToken(capability: Capability): Promise<string>;
  jwksFile: string;
}

/** A signer, and its public keys in a JWKS file (the store's signing-keys-file). */
export async function makeSigner(dir: string): Promise<Signer> {
  const key = await generateSigningKey();
  const signer = await TokenSigner.create(key, { issuer: "test-coordinator" });
  const jwksFile = join(dir, "jwks.json");
  await writeFile(jwksFile, JSON.stringify(signer.publicJwks()));
  return {
    signer,
    jwksFile,
    token: (capability, ttlMs = 600_000) => signer.sign(capability, ttlMs, { subject: "test" }),
    async expiredToken(capability) {
      const past = await TokenSigner.create(key, { issuer: "test-coordinator", clock: () => Date.now() - 3_600_000 });
      return past.sign(capability, 60_000, { subject: "test" });
    },
  };
}

export interface RunningStore {
  component: ImageStoreComponent;
  url: string;
  dir: string;
  config: ImageStoreConfig;
  /** A client whose calls carry `token`. */
  client(token: string): ImageStoreClient;
  cacheClient(token: string): ReturnType<typeof createClient<typeof ImageCacheService>>;
  stop(): Promise<void>;
}

export async function makeTempDir(prefix = "tml-image-"): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix));
}

/** Starts a store (or cache) in this process on port 0. */
export async function startStore(
  signer: Signer,
  options: { dir?: string; config?: Partial<ImageStoreConfig>; deps?: Partial<ImageStoreDeps> } = {},
): Promise<RunningStore> {
  const dir = options.dir ?? (await makeTempDir());
  const config = {
    ...loadImageStoreConfig({ env: {}, argv: [] }),
    port: 0,
    dataDir: dir,
    signingKeysFile: signer.jwksFile,
    logLevel: "silent",
    graceMs: 1000,
    ...options.config,
  } as ImageStoreConfig;
  const component = createImageStore({ config, logger: silentLogger(), ...options.deps });
  await component.start();
  const url = component.address().url;
  const transports: ImageTransport[] = [];
  return {
    component,
    url,
    dir,
    config,
    client(token) {
      const t = imageStoreTransport(url, { token });
      transports.push(t);
      return imageStoreClient(t);
    },
    cacheClient(token) {
      const t = imageStoreTransport(url, { token });
      transports.push(t);
      return createClient(ImageCacheService, t);
    },
    async stop() {
      for (const t of transports) t.close();
      await component.stop();
    },
  };
}

export async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}

/** Collects a whole async iterable. */
export async function collect<T>(items: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const item of items) out.push(item);
  return out;
}

/** The code a call failed with, or "ok". */

/** A BlobSource over a buffer, in chunks of `chunk` bytes. */
export const bufferSource =
  (data: Buffer, chunk = 256 * 1024): BlobSource =>
  async function* (offset) {
    for (let i = offset; i < data.length; i += chunk) yield data.subarray(i, Math.min(data.length, i + chunk));
  };

/** Uploads `blobs` and a manifest over them; returns the manifest and a read token for it. */
export async function storeImage(
  store: RunningStore,
  signer: Signer,
  writeToken: string,
  blobs: { data: Buffer; digest: string; size: number }[],
): Promise<{ manifest: { json: Buffer; digest: string }; readToken: string }> {
  const writer = store.client(writeToken);
  for (const b of blobs) await uploadBlob(writer, { digest: b.digest, size: b.size, source: bufferSource(b.data) });
  const manifest = manifestFor(blobs);
  await writer.putManifest({ digest: manifest.digest, manifestJson: manifest.json });
  return { manifest, readToken: await signer.token({ scope: "image:read", digest: manifest.digest, holder: "test" }) };
}

/** A store holding one image, for the tests of one describe block. */
export interface StoreWithImage {
  store: RunningStore;
  /** May write any blob and manifest. */
  writeToken: string;
  /** May read the image's blobs. */
  readToken: string;
}

/**
 * Registers, in the calling describe block, a beforeAll that starts a store
 * over a temporary directory and uploads one image of `blobs`, and an
 * afterAll that stops it and removes the directory. The returned object's
 * fields are set once beforeAll has run.
 */
export function storeWithImage(blobs: { data: Buffer; digest: string; size: number }[]): StoreWithImage {
  const fixture = {} as StoreWithImage;
  let dir: string;
  beforeAll(async () => {
    dir = await makeTempDir();
    const signer = await makeSigner(dir);
    fixture.store = await startStore(signer, { dir: join(dir, "data") });
    fixture.writeToken = await signer.token({ scope: "image:write" });
    ({ readToken: fixture.readToken } = await storeImage(fixture.store, signer, fixture.writeToken, blobs));
  });
  afterAll(async () => {
    await fixture.store.stop();
    await removeDir(dir);
  });
  return fixture;
}
