// Issue #17, holes 3 and 4, as they were found: a real site (a coordinator
// on a real database, an image store and a site cache registered with it by a
// service credential, verifying tokens with the coordinator's keys) with two
// ordinary users, alice and mallory, made by the admin. alice pushes a
// private image; mallory knows its digests and tries what the sweep did.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createClient } from "@connectrpc/connect";
import { writeFile } from "node:fs/promises";
import { createServer as createNetServer, type Server as NetServer } from "node:net";
import { join } from "node:path";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { ImageCacheService } from "../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { imageStoreClient, imageStoreTransport, readBlobChunks, uploadBlob } from "../../lib/image/client.js";
import { pushImage } from "../../lib/image/push.js";
import { silentLogger } from "../../lib/logger.js";
import { loadImageStoreConfig } from "../../stores/image/config.js";
import { createImageStore, type ImageStoreComponent } from "../../stores/image/image-store.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { codeOf } from "../support/codes.js";
import { bufferSource, collect, makeTempDir, manifestFor, randomBlob, removeDir } from "../support/image-store.js";
import { ROOTFS_MEDIA_TYPE as ROOTFS } from "../../lib/image/media-types.js";

describe("private images and the cache's locations under attack", () => {
  let c: TestCoordinator;
  let dir: string;
  let store: ImageStoreComponent;
  let cache: ImageStoreComponent;
  let alice: { id: string; token: string };
  let mallory: { id: string; token: string };
  const layer = randomBlob(200_000);
  let secret: { manifestDigest: string; storeId: string };

  const waitRegistered = async (url: string) => {
    const deadline = Date.now() + 20_000;
    for (;;) {
      const [row] = await c.sql`select id from services where url = ${url}`;
      if (row) return row.id as string;
      if (Date.now() > deadline) throw new Error(`${url} did not register`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };

  beforeAll(async () => {
    dir = await makeTempDir("tml-security-");
    c = await startTestCoordinator();
    const admin = await c.createUser({ role: "admin" });
    alice = await c.createUser({ name: "alice" });
    mallory = await c.createUser({ name: "mallory" });
    const credential = await c.createServiceToken(admin.token);
    const base = { ...loadImageStoreConfig({ env: {}, argv: [] }), port: 0, logLevel: "silent" as const, coordinatorUrl: [c.url], serviceCredential: credential };
    store = createImageStore({ config: { ...base, dataDir: join(dir, "store") }, logger: silentLogger() });
    await store.start();
    await waitRegistered(store.address().url);
    cache = createImageStore({ config: { ...base, mode: "cache", site: "lab", dataDir: join(dir, "cache") }, logger: silentLogger() });
    await cache.start();
    // alice pushes a private image (grant, upload, manifest, registration).
    const path = join(dir, "layer.tar.gz");
    await writeFile(path, layer.data);
    const manifest = manifestFor([{ ...layer, mediaType: ROOTFS }]);
    const image = await pushImage(
      c.transport(alice.token),
      { manifestDigest: manifest.digest, manifestJson: manifest.json, blobs: [{ digest: layer.digest, size: layer.size, path }], mediaTypes: [ROOTFS] },
      { name: "alice/secret", tag: "v1" },
    );
    secret = { manifestDigest: image.manifestDigest, storeId: image.locations[0].storeId };
  });

  afterAll(async () => {
    await cache?.stop();
    await store?.stop();
    await c?.stop();
    await removeDir(dir);
  });

  const images = (token: string) => c.client(ImageService, token);
  const storeClient = (token: string) => imageStoreClient(imageStoreTransport(store.address().url, { token }));

  it("lets alice read her own image, from the store and through the cache", async () => {
    const { readToken } = await images(alice.token).resolveImage({ reference: "alice/secret:v1" });
    const bytes = Buffer.concat(await collect(readBlobChunks(storeClient(readToken!.token), { digest: layer.digest })));
    expect(bytes.equals(layer.data)).toBe(true);
    const viaCache = createClient(ImageCacheService, imageStoreTransport(cache.address().url, { token: readToken!.token }));
    const done = (await collect(viaCache.fetch({ manifestDigest: secret.manifestDigest, locations: [store.address().url] }))).at(-1);
    expect(done?.payload.case).toBe("done");
  });

  it("refuses mallory's registration of alice's private digest under a name of her own", async () => {
    const attempt = images(mallory.token).registerImage({
      name: "mallory/loot",
      tag: "v1",
      manifestDigest: secret.manifestDigest,
      storeIds: [secret.storeId],
      mediaTypes: [ROOTFS],
    });
    expect(await codeOf(attempt)).toBe("PermissionDenied");
    expect(await codeOf(images(mallory.token).resolveImage({ reference: secret.manifestDigest }))).toBe("NotFound");
  });

  it("refuses mallory's manifest naming alice's private layer, so no token of hers reads it", async () => {
    const own = randomBlob(1000);
    const hers = manifestFor([own, layer]);
    const grant = await images(mallory.token).createUploadGrant({ digests: [hers.digest, own.digest] });
    const writer = imageStoreClient(imageStoreTransport(grant.storeUrl, { token: grant.writeToken!.token }));
    await uploadBlob(writer, { digest: own.digest, size: own.size, source: bufferSource(own.data) });
    // The layer exists, but to mallory it does not: no shortcut, no oracle.
    expect((await writer.queryUpload({ digest: layer.digest })).exists).toBe(false);
    expect(await codeOf(writer.putManifest({ digest: hers.digest, manifestJson: hers.json }))).toBe("PermissionDenied");
    await images(mallory.token).registerImage({ name: "mallory/mine", tag: "v1", manifestDigest: hers.digest, storeIds: [grant.storeId], mediaTypes: [ROOTFS] });
    const { readToken } = await images(mallory.token).resolveImage({ reference: "mallory/mine:v1" });
    expect(await codeOf(collect(readBlobChunks(storeClient(readToken!.token), { digest: layer.digest })))).toBe("PermissionDenied");
  });

  it("does not serve alice's image to mallory even with a grant naming its digest", async () => {
    await images(mallory.token).createUploadGrant({ digests: [secret.manifestDigest] });
    await images(mallory.token).registerImage({
      name: "mallory/loot",
      tag: "v2",
      manifestDigest: secret.manifestDigest,
      storeIds: [secret.storeId],
      mediaTypes: [ROOTFS],
    });
    const { readToken } = await images(mallory.token).resolveImage({ reference: "mallory/loot:v2" });
    const reader = storeClient(readToken!.token);
    expect(await codeOf(reader.getManifest({ digest: secret.manifestDigest }))).toBe("PermissionDenied");
    expect(await codeOf(collect(readBlobChunks(reader, { digest: layer.digest })))).toBe("PermissionDenied");
    // Nor through the cache, which holds the image (alice fetched it) but asks the store about mallory.
    const viaCache = createClient(ImageCacheService, imageStoreTransport(cache.address().url, { token: readToken!.token }));
    expect(await codeOf(collect(viaCache.fetch({ manifestDigest: secret.manifestDigest, locations: [store.address().url] })))).toBe(
      "PermissionDenied",
    );
    const cacheReader = imageStoreClient(imageStoreTransport(cache.address().url, { token: readToken!.token }));
    expect(await codeOf(collect(readBlobChunks(cacheReader, { digest: layer.digest })))).toBe("PermissionDenied");
  });

  it("refuses a Fetch from a location that is not a registered store, and nothing reaches it", async () => {
    const connections: number[] = [];
    const listener: NetServer = createNetServer((socket) => {
      connections.push(socket.remotePort ?? 0);
      socket.destroy();
    });
    await new Promise<void>((r) => listener.listen(0, "127.0.0.1", r));
    const url = `http://127.0.0.1:${(listener.address() as { port: number }).port}`;
    try {
      // Any valid read token will do; the cache must not carry it anywhere unregistered.
      const { image, readToken } = await images(alice.token).resolveImage({ reference: "alice/secret:v1" });
      const viaCache = createClient(ImageCacheService, imageStoreTransport(cache.address().url, { token: readToken!.token }));
      const fetch = (locations: string[]) => collect(viaCache.fetch({ manifestDigest: image!.manifestDigest, locations }));
      const err = await fetch([url]).catch((e: unknown) => e as Error);
      expect(await codeOf(Promise.reject(err))).toBe("PermissionDenied");
      expect((err as Error).message).toContain(url);
      // Before a registered store in the list, too: nothing is sent to any of it.
      expect(await codeOf(fetch([store.address().url, url]))).toBe("PermissionDenied");
      expect(connections).toEqual([]);
      // The registered store (learnt from ListServices) is fine.
      expect((await fetch([store.address().url])).at(-1)?.payload.case).toBe("done");
    } finally {
      await new Promise<void>((r) => listener.close(() => r()));
    }
  });
});
