import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { execFile } from "node:child_process";
import { createServer as createNetServer } from "node:net";
import { mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import type { FetchResponse } from "../../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { type BlobSource } from "../../../lib/image/blob-io.js";
import { readBlobChunks, uploadBlob } from "../../../lib/image/client.js";
import { codeOf, collect, makeSigner, makeTempDir, manifestFor, randomBlob, removeDir, startStore, type RunningStore, type Signer } from "../../support/image-store.js";

const run = promisify(execFile);
const MIB = 1024 * 1024;

const source =
  (data: Buffer): BlobSource =>
  async function* (offset) {
    for (let i = offset; i < data.length; i += MIB) yield data.subarray(i, Math.min(data.length, i + MIB));
  };


/** A URL where nothing listens. */
async function deadUrl(): Promise<string> {
  const s = createNetServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return `http://127.0.0.1:${port}`;
}

interface Image {
  blobs: { data: Buffer; digest: string; size: number }[];
  manifest: { json: Buffer; digest: string };
}

function makeImage(...sizes: number[]): Image {
  const blobs = sizes.map((s) => randomBlob(s));
  return { blobs, manifest: manifestFor(blobs) };
}

describe("image cache", () => {
  /** The caches' upstream-urls: every store a test names as a location or push target. */
  const upstreams: string[] = [];
  let dead: string;
  let dir: string;
  let signer: Signer;
  let origin: RunningStore;
  let bad: RunningStore;
  let writeToken: string;

  async function publish(store: RunningStore, image: Image) {
    const writer = store.client(writeToken);
    for (const b of image.blobs) await uploadBlob(writer, { digest: b.digest, size: b.size, source: source(b.data) });
    await writer.putManifest({ digest: image.manifest.digest, manifestJson: image.manifest.json });
  }

  const readToken = (image: Image) => signer.token({ scope: "image:read", digest: image.manifest.digest, holder: "test" });

  async function fetchVia(cache: RunningStore, image: Image, locations: string[], extra: { leaseId?: string; leaseTtl?: { seconds: bigint } } = {}) {
    const messages: FetchResponse[] = await collect(
      cache.cacheClient(await readToken(image)).fetch({ manifestDigest: image.manifest.digest, locations, ...extra }),
    );
    const last = messages[messages.length - 1];
    if (last.payload.case !== "done") throw new Error("fetch did not end with done");
    const progress = messages.flatMap((m) => (m.payload.case === "progress" ? [m.payload.value] : []));
    return { done: last.payload.value, progress };
  }

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    writeToken = await signer.token({ scope: "image:write" });
    origin = await startStore(signer, { dir: join(dir, "origin") });
    // A store that serves whatever is on its disk, unverified.
    bad = await startStore(signer, { dir: join(dir, "bad"), config: { verifyReads: false } });
    dead = await deadUrl();
    upstreams.push(dead, origin.url, bad.url);
  });

  afterAll(async () => {
    await origin.stop();
    await bad.stop();
    await removeDir(dir);
  });

  it("fails over from a location that is down and one that serves corrupt bytes to one that works", async () => {
    const cache = await startStore(signer, { dir: join(dir, "c1"), config: { mode: "cache", upstreamUrls: upstreams, sharedPath: "/mnt/site-cache" } });
    try {
      const image = makeImage(3 * MIB + 17, 1000);
      await publish(origin, image);
      await publish(bad, image);
      const victim = join(bad.dir, "blobs", "sha256", image.blobs[0].digest.slice(7));
      const corrupt = await readFile(victim);
      corrupt[MIB + 5] ^= 0x40;
      await writeFile(victim, corrupt);

      const { done, progress } = await fetchVia(cache, image, [dead, bad.url, origin.url]);
      expect(done.hit).toBe(false);
      expect(Buffer.from(done.manifestJson).equals(image.manifest.json)).toBe(true);
      expect(done.blobs.map((b) => b.path)).toContain(`/mnt/site-cache/blobs/sha256/${image.blobs[0].digest.slice(7)}`);
      const total = image.manifest.json.length + image.blobs.reduce((a, b) => a + b.size, 0);
      expect(progress.length).toBeGreaterThan(0);
      expect(progress.every((p) => Number(p.bytesTotal) === total)).toBe(true);
      expect(Number(progress[progress.length - 1].bytesDone)).toBe(total);
      for (const b of image.blobs) {
        expect((await readFile(join(cache.dir, "blobs", "sha256", b.digest.slice(7)))).equals(b.data)).toBe(true);
      }
      // Now a hit, served from the cache's disk.
      const again = await fetchVia(cache, image, [origin.url]);
      expect(again.done.hit).toBe(true);
      const reader = cache.client(await readToken(image));
      const bytes = Buffer.concat(await collect(readBlobChunks(reader, { digest: image.blobs[0].digest })));
      expect(bytes.equals(image.blobs[0].data)).toBe(true);
    } finally {
      await cache.stop();
    }
  });

  it("answers NotFound when no location has the image and Unavailable listing each location's error when none answers", async () => {
    const cache = await startStore(signer, { dir: join(dir, "c2"), config: { mode: "cache", upstreamUrls: upstreams } });
    try {
      const image = makeImage(10);
      const err = await fetchVia(cache, image, [origin.url]).catch((e: unknown) => ConnectError.from(e));
      expect((err as ConnectError).code).toBe(Code.NotFound);
      const down = await fetchVia(cache, image, [dead]).catch((e: unknown) => ConnectError.from(e));
      expect((down as ConnectError).code).toBe(Code.Unavailable);
      expect((down as ConnectError).rawMessage).toContain(dead);
    } finally {
      await cache.stop();
    }
  });

  it("shares one transfer between concurrent fetches of an image", async () => {
    const cache = await startStore(signer, { dir: join(dir, "c3"), config: { mode: "cache", upstreamUrls: upstreams } });
    try {
      const image = makeImage(4 * MIB);
      await publish(origin, image);
      const results = await Promise.all([1, 2, 3, 4].map(() => fetchVia(cache, image, [origin.url])));
      expect(results.every((r) => Buffer.from(r.done.manifestJson).equals(image.manifest.json))).toBe(true);
      const stats = await cache.cacheClient(await readToken(image)).stats({});
      expect(Number(stats.bytesFetched)).toBe(4 * MIB);
      expect(Number(stats.misses)).toBe(1);
    } finally {
      await cache.stop();
    }
  });

  it("refetches a blob found corrupt on the cache's disk", async () => {
    const cache = await startStore(signer, { dir: join(dir, "c4"), config: { mode: "cache", upstreamUrls: upstreams } });
    try {
      const image = makeImage(2 * MIB);
      await publish(origin, image);
      await fetchVia(cache, image, [origin.url]);
      const path = join(cache.dir, "blobs", "sha256", image.blobs[0].digest.slice(7));
      const flipped = await readFile(path);
      flipped[100] ^= 1;
      await writeFile(path, flipped);
      const reader = cache.client(await readToken(image));
      expect(await codeOf(collect(readBlobChunks(reader, { digest: image.blobs[0].digest })))).toBe(Code.DataLoss);
      const again = await fetchVia(cache, image, [origin.url]);
      expect(again.done.hit).toBe(false);
      expect((await readFile(path)).equals(image.blobs[0].data)).toBe(true);
    } finally {
      await cache.stop();
    }
  });

  it("evicts the least recently used unpinned image under its size cap, and lets a lease expire", async () => {
    let now = Date.now();
    const cache = await startStore(signer, {
      dir: join(dir, "c5"),
      config: { mode: "cache", upstreamUrls: upstreams, capBytes: Math.floor(3.5 * MIB) },
      deps: { clock: () => now },
    });
    try {
      const [a, b, c, d, e] = [1, 2, 3, 4, 5].map(() => makeImage(MIB));
      for (const img of [a, b, c, d, e]) await publish(origin, img);
      const has = (img: Image) => cache.component.blobs.getManifestRecord(img.manifest.digest) !== undefined;
      await fetchVia(cache, a, [origin.url]);
      now += 1000;
      await fetchVia(cache, b, [origin.url]);
      now += 1000;
      await fetchVia(cache, c, [origin.url]);
      now += 1000;
      // a is used again (a hit): b is now the least recently used.
      expect((await fetchVia(cache, a, [origin.url])).done.hit).toBe(true);
      now += 1000;
      // b is pinned for a minute: c goes instead.
      const pin = await cache.cacheClient(await readToken(b)).pin({ manifestDigest: b.manifest.digest, leaseId: "job-1/0", ttl: { seconds: 60n } });
      expect(Number(pin.expireTime?.seconds)).toBe(Math.floor((now + 60_000) / 1000));
      await fetchVia(cache, d, [origin.url]);
      expect([has(a), has(b), has(c), has(d)]).toEqual([true, true, false, true]);
      expect(await codeOf(cache.client(await signer.token({ scope: "image:admin" })).deleteManifest({ digest: b.manifest.digest }))).toBe(
        Code.FailedPrecondition,
      );
      // The lease expires (its holder crashed): b can go now. Pinning was b's
      // last use; a and d are used since, so b goes first.
      now += 61_000;
      await cache.component.cache!.enforce();
      expect(cache.component.cache!.isPinned(b.manifest.digest)).toBe(false);
      now += 1000;
      expect((await fetchVia(cache, a, [origin.url])).done.hit).toBe(true);
      expect((await fetchVia(cache, d, [origin.url])).done.hit).toBe(true);
      now += 1000;
      await fetchVia(cache, e, [origin.url]);
      expect([has(a), has(b), has(d), has(e)]).toEqual([true, false, true, true]);
      expect(await stat(join(cache.dir, "blobs", "sha256", b.blobs[0].digest.slice(7))).catch(() => undefined)).toBeUndefined();
      const stats = await cache.cacheClient(await readToken(a)).stats({});
      expect(Number(stats.evictions)).toBe(2);
      expect(Number(stats.sizeBytes)).toBeLessThanOrEqual(Math.floor(3.5 * MIB));
    } finally {
      await cache.stop();
    }
  });

  it("answers ResourceExhausted when an image cannot fit even after eviction", async () => {
    const cache = await startStore(signer, { dir: join(dir, "c6"), config: { mode: "cache", upstreamUrls: upstreams, capBytes: MIB } });
    try {
      const big = makeImage(2 * MIB);
      await publish(origin, big);
      expect(await codeOf(fetchVia(cache, big, [origin.url]))).toBe(Code.ResourceExhausted);
    } finally {
      await cache.stop();
    }
  });

  it("keeps a free-space floor on its file system (8 MiB tmpfs)", async () => {
    const mount = join(dir, "tmpfs");
    await mkdir(mount, { recursive: true });
    await run("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", mount]);
    try {
      const cache = await startStore(signer, { dir: join(mount, "cache"), config: { mode: "cache", upstreamUrls: upstreams, freeFloorBytes: 4 * MIB } });
      try {
        const images = [1, 2, 3].map(() => makeImage(1.5 * MIB));
        for (const img of images) await publish(origin, img);
        for (const img of images) await fetchVia(cache, img, [origin.url]);
        const kept = images.map((img) => cache.component.blobs.getManifestRecord(img.manifest.digest) !== undefined);
        // Two images (3 MiB) fit above the 4 MiB floor of 8 MiB; the oldest went.
        expect(kept).toEqual([false, true, true]);
        const stats = await cache.cacheClient(await readToken(images[2])).stats({});
        expect(Number(stats.freeBytes)).toBeGreaterThanOrEqual(4 * MIB);
      } finally {
        await cache.stop();
      }
    } finally {
      await run("umount", [mount]);
    }
  });

  it("gives local paths on the shared mount, and FailedPrecondition without one", async () => {
    const shared = await startStore(signer, { dir: join(dir, "c7"), config: { mode: "cache", upstreamUrls: upstreams, sharedPath: "/srv/cache" } });
    const plain = await startStore(signer, { dir: join(dir, "c8"), config: { mode: "cache", upstreamUrls: upstreams } });
    try {
      const image = makeImage(1234);
      await publish(origin, image);
      await fetchVia(shared, image, [origin.url]);
      await fetchVia(plain, image, [origin.url]);
      const c = shared.cacheClient(await readToken(image));
      const res = await c.localPath({ manifestDigest: image.manifest.digest, blobDigest: image.blobs[0].digest });
      expect(res.blob).toMatchObject({ digest: image.blobs[0].digest, size: 1234n, path: `/srv/cache/blobs/sha256/${image.blobs[0].digest.slice(7)}` });
      // The same file under the data directory, as a supervisor mounting it sees it.
      expect((await readFile(join(shared.dir, res.blob!.path.slice("/srv/cache/".length)))).equals(image.blobs[0].data)).toBe(true);
      const m = await c.localPath({ manifestDigest: image.manifest.digest });
      expect(m.blob?.digest).toBe(image.manifest.digest);
      const other = makeImage(5);
      expect(await codeOf(c.localPath({ manifestDigest: image.manifest.digest, blobDigest: other.blobs[0].digest }))).toBe(Code.InvalidArgument);
      expect(
        await codeOf(plain.cacheClient(await readToken(image)).localPath({ manifestDigest: image.manifest.digest, blobDigest: image.blobs[0].digest })),
      ).toBe(Code.FailedPrecondition);
    } finally {
      await shared.stop();
      await plain.stop();
    }
  });

  it("pushes an image to another store, skipping blobs it already has, and unpins idempotently", async () => {
    const target = await startStore(signer, { dir: join(dir, "target") });
    upstreams.push(target.url);
    const cache = await startStore(signer, { dir: join(dir, "c9"), config: { mode: "cache", upstreamUrls: upstreams } });
    try {
      const image = makeImage(2 * MIB, 700);
      // A snapshot uploaded to the cache by a supervisor.
      await publish(cache, image);
      // The target already has the small blob.
      await uploadBlob(target.client(writeToken), { digest: image.blobs[1].digest, size: 700, source: source(image.blobs[1].data) });
      const messages = await collect(
        cache.cacheClient(await readToken(image)).push({ manifestDigest: image.manifest.digest, targetUrl: target.url, targetToken: writeToken }),
      );
      const last = messages[messages.length - 1];
      expect(last.payload.case).toBe("done");
      expect(last.payload.value).toMatchObject({ bytesUploaded: BigInt(2 * MIB), blobsSkipped: 1 });
      const got = await target.client(await readToken(image)).getManifest({ digest: image.manifest.digest });
      expect(Buffer.from(got.manifestJson).equals(image.manifest.json)).toBe(true);
      // A bad target token: the target's PermissionDenied is passed on.
      expect(
        await codeOf(
          collect(
            cache.cacheClient(await readToken(image)).push({
              manifestDigest: image.manifest.digest,
              targetUrl: target.url,
              targetToken: await readToken(image),
            }),
          ),
        ),
      ).toBe(Code.PermissionDenied);
      const c = cache.cacheClient(await readToken(image));
      await c.pin({ manifestDigest: image.manifest.digest, leaseId: "l", ttl: { seconds: 30n } });
      expect((await c.stats({})).pinnedCount).toBe(1n);
      await c.unpin({ leaseId: "l" });
      await c.unpin({ leaseId: "l" });
      expect((await c.stats({})).pinnedCount).toBe(0n);
    } finally {
      await cache.stop();
      await target.stop();
    }
  });

  it("pins from the start of a fetch when given a lease, and keeps leases across a restart", async () => {
    const cacheDir = join(dir, "c10");
    const image = makeImage(100);
    await publish(origin, image);
    const first = await startStore(signer, { dir: cacheDir, config: { mode: "cache", upstreamUrls: upstreams } });
    try {
      const { done } = await fetchVia(first, image, [origin.url], { leaseId: "job-7/1", leaseTtl: { seconds: 600n } });
      expect(done.leaseExpireTime).toBeDefined();
    } finally {
      await first.stop();
    }
    const second = await startStore(signer, { dir: cacheDir, config: { mode: "cache", upstreamUrls: upstreams } });
    try {
      expect((await second.cacheClient(await readToken(image)).stats({})).pinnedCount).toBe(1n);
      expect(second.component.cache!.isPinned(image.manifest.digest)).toBe(true);
    } finally {
      await second.stop();
    }
  });
});
