// A site cache's guards (issue #17 holes 3 and 4, issue #18 defect 6): it
// fetches from its upstreams only, sending nothing anywhere else; it serves a
// cached image to a token's holder only once a location vouched for that
// holder; and its state survives a storm of concurrent pins intact.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { readFile } from "node:fs/promises";
import { createServer as createNetServer, type Server as NetServer } from "node:net";
import { join } from "node:path";
import { Writable } from "node:stream";
import { readBlobChunks, uploadBlob } from "../../../lib/image/client.js";
import { createLogger } from "../../../lib/logger.js";
import type { Capability } from "../../../lib/tokens.js";
import { bufferSource, codeOf, collect, makeSigner, makeTempDir, manifestFor, randomBlob, removeDir, startStore, type RunningStore, type Signer } from "../../support/image-store.js";

describe("a site cache's guards", () => {
  let dir: string;
  let signer: Signer;
  let origin: RunningStore;
  let cache: RunningStore;
  const as = (subject: string, capability: Capability) => signer.signer.sign(capability, 600_000, { subject });
  const layer = randomBlob(100_000);
  const manifest = manifestFor([layer]);

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    origin = await startStore(signer, { dir: join(dir, "origin") });
    const alice = origin.client(await as("alice", { scope: "image:write" }));
    await uploadBlob(alice, { digest: layer.digest, size: layer.size, source: bufferSource(layer.data) });
    await alice.putManifest({ digest: manifest.digest, manifestJson: manifest.json });
    cache = await startStore(signer, { dir: join(dir, "cache"), config: { mode: "cache", upstreamUrls: [origin.url] } });
  });

  afterAll(async () => {
    await cache.stop();
    await origin.stop();
    await removeDir(dir);
  });

  it("refuses a location that is not one of its upstreams and sends nothing to it", async () => {
    const connections: string[] = [];
    const listener: NetServer = createNetServer((socket) => {
      connections.push(String(socket.remotePort));
      socket.destroy();
    });
    await new Promise<void>((r) => listener.listen(0, "127.0.0.1", r));
    const url = `http://127.0.0.1:${(listener.address() as { port: number }).port}`;
    try {
      const token = await as("alice", { scope: "image:read", digest: manifest.digest, holder: "alice" });
      const err = await collect(cache.cacheClient(token).fetch({ manifestDigest: manifest.digest, locations: [origin.url, url] })).catch(
        (e: unknown) => ConnectError.from(e),
      );
      expect((err as ConnectError).code).toBe(Code.PermissionDenied);
      expect((err as ConnectError).rawMessage).toContain(`locations[1]: ${url}`);
      const push = collect(cache.cacheClient(token).push({ manifestDigest: manifest.digest, targetUrl: url, targetToken: token }));
      expect(await codeOf(push)).toBe(Code.NotFound); // not cached yet: nothing to push, nothing sent
      expect(connections).toEqual([]);
    } finally {
      await new Promise<void>((r) => listener.close(() => r()));
    }
  });

  it("serves a cached image to a new holder only after a location vouched for it", async () => {
    const alice = cache.cacheClient(await as("alice", { scope: "image:read", digest: manifest.digest, holder: "alice" }));
    const done = (await collect(alice.fetch({ manifestDigest: manifest.digest, locations: [origin.url] }))).at(-1);
    expect(done?.payload.case).toBe("done");
    // mallory knows the digest; her token names herself, and the origin knows she never uploaded it.
    const malloryToken = await as("mallory", { scope: "image:read", digest: manifest.digest, holder: "mallory" });
    const mallory = cache.cacheClient(malloryToken);
    const err = await collect(mallory.fetch({ manifestDigest: manifest.digest, locations: [origin.url] })).catch((e: unknown) =>
      ConnectError.from(e),
    );
    expect((err as ConnectError).code).toBe(Code.PermissionDenied);
    expect(await codeOf(collect(readBlobChunks(cache.client(malloryToken), { digest: layer.digest })))).toBe(Code.PermissionDenied);
    expect(await codeOf(mallory.pin({ manifestDigest: manifest.digest, leaseId: "m", ttl: { seconds: 60n } }))).toBe(Code.PermissionDenied);
    // A token backed by alice (minted for bob: a public image, say) is served from the cache.
    const bob = cache.cacheClient(await as("bob", { scope: "image:read", digest: manifest.digest, holder: "alice" }));
    const again = (await collect(bob.fetch({ manifestDigest: manifest.digest, locations: [origin.url] }))).at(-1);
    expect(again?.payload.case === "done" && again.payload.value.hit).toBe(true);
  });

  it("saves its state once per burst: 300 concurrent pins warn of nothing and all survive a restart", async () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk, _enc, done) {
        lines.push(...String(chunk).split("\n").filter((l) => l !== ""));
        done();
      },
    });
    const stateDir = join(dir, "pins");
    const logger = createLogger({ level: "info", destination: sink });
    const config = { mode: "cache", upstreamUrls: [origin.url] } as const;
    const first = await startStore(signer, { dir: stateDir, config, deps: { logger } });
    const token = await as("alice", { scope: "image:read", digest: manifest.digest, holder: "alice" });
    const c = first.cacheClient(token);
    await collect(c.fetch({ manifestDigest: manifest.digest, locations: [origin.url] }));
    await Promise.all(
      Array.from({ length: 300 }, (_, i) => c.pin({ manifestDigest: manifest.digest, leaseId: `lease-${i}`, ttl: { seconds: 3600n } })),
    );
    // And 100 of them ended at once.
    await Promise.all(Array.from({ length: 100 }, (_, i) => c.unpin({ leaseId: `lease-${i * 3}` })));
    await first.stop();
    expect(lines.filter((l) => l.includes("cache state not saved"))).toEqual([]);
    const expected = Array.from({ length: 300 }, (_, i) => `lease-${i}`).filter((_, i) => i % 3 !== 0).sort();
    const saved = JSON.parse(await readFile(join(stateDir, "cache.json"), "utf8")) as { leases: Record<string, unknown> };
    expect(Object.keys(saved.leases).sort()).toEqual(expected);
    const second = await startStore(signer, { dir: stateDir, config });
    try {
      for (let i = 0; i < 300; i++) {
        expect([i, second.component.cache!.leaseDigest(`lease-${i}`)]).toEqual([i, i % 3 === 0 ? undefined : manifest.digest]);
      }
    } finally {
      await second.stop();
    }
  });
});
