import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { type BlobSource } from "../../../lib/image/blob-io.js";
import { readBlobChunks, uploadBlob } from "../../../lib/image/client.js";
import { TokenSigner, generateSigningKey } from "../../../lib/tokens.js";
import {
  codeOf,
  collect,
  makeSigner,
  makeTempDir,
  manifestFor,
  randomBlob,
  removeDir,
  startStore,
  type RunningStore,
  type Signer,
} from "../../support/image-store.js";

const source =
  (data: Buffer): BlobSource =>
  async function* (offset) {
    yield data.subarray(offset);
  };

const TRAVERSALS = [
  "sha256:../../../../etc/passwd",
  "../../etc/passwd",
  "/etc/passwd",
  `sha256:${"a".repeat(63)}/`,
  `sha256:${"A".repeat(64)}`,
  `sha256:${"a".repeat(64)}\u0000`,
  `sha512:${"a".repeat(64)}`,
  `sha256:${"a".repeat(62)}..`,
  "",
];

describe("image store authorization and names", () => {
  let dir: string;
  let signer: Signer;
  let store: RunningStore;
  let cache: RunningStore;
  const layer = randomBlob(1000);
  const other = randomBlob(500);
  let manifest: { json: Buffer; digest: string };
  let otherManifest: { json: Buffer; digest: string };

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    store = await startStore(signer, { dir: join(dir, "store") });
    cache = await startStore(signer, { dir: join(dir, "cache"), config: { mode: "cache", sharedPath: "/mnt/cache" } });
    const writer = store.client(await signer.token({ scope: "image:write" }));
    for (const b of [layer, other]) await uploadBlob(writer, { digest: b.digest, size: b.size, source: source(b.data) });
    manifest = manifestFor([layer]);
    otherManifest = manifestFor([other]);
    for (const m of [manifest, otherManifest]) await writer.putManifest({ digest: m.digest, manifestJson: m.json });
  });

  afterAll(async () => {
    await store.stop();
    await cache.stop();
    await removeDir(dir);
  });

  /** Every RPC of the store with a valid request, as `client` makes it. */
  function calls(client: ReturnType<RunningStore["client"]>) {
    return {
      putBlob: () =>
        client.putBlob(
          (async function* () {
            yield { digest: layer.digest, size: BigInt(layer.size), offset: 0n, data: layer.data };
          })(),
        ),
      queryUpload: () => client.queryUpload({ digest: layer.digest }),
      getBlob: () => collect(client.getBlob({ digest: layer.digest })),
      statBlob: () => client.statBlob({ digest: layer.digest }),
      putManifest: () => client.putManifest({ digest: manifest.digest, manifestJson: manifest.json }),
      getManifest: () => client.getManifest({ digest: manifest.digest }),
      listManifests: () => client.listManifests({}),
      deleteManifest: () => client.deleteManifest({ digest: sha(9) }),
      collectGarbage: () => client.collectGarbage({ dryRun: true }),
    };
  }
  const sha = (n: number) => `sha256:${String(n).repeat(64).slice(0, 64)}`;

  it("refuses every RPC without a token, with a malformed one, an expired one or one of another signer", async () => {
    const stranger = await TokenSigner.create(await generateSigningKey(), { issuer: "test-coordinator" });
    const tokens = [
      "",
      "not-a-jwt",
      await signer.expiredToken({ scope: "image:admin" }),
      await stranger.sign({ scope: "image:admin" }, 60_000, { subject: "x" }),
    ];
    for (const token of tokens) {
      for (const [name, call] of Object.entries(calls(store.client(token)))) {
        expect([name, await codeOf(call())]).toEqual([name, Code.Unauthenticated]);
      }
    }
  });

  it("allows each RPC only with its scope", async () => {
    const read = calls(store.client(await signer.token({ scope: "image:read", digest: manifest.digest, holder: "test" })));
    const write = calls(store.client(await signer.token({ scope: "image:write" })));
    const admin = calls(store.client(await signer.token({ scope: "image:admin" })));
    expect(await codeOf(read.getManifest())).toBe("ok");
    expect(await codeOf(read.getBlob())).toBe("ok");
    expect(await codeOf(read.statBlob())).toBe("ok");
    for (const denied of [read.putBlob, read.queryUpload, read.putManifest, read.listManifests, read.collectGarbage, read.deleteManifest]) {
      expect(await codeOf(denied())).toBe(Code.PermissionDenied);
    }
    expect(await codeOf(write.putBlob())).toBe("ok");
    expect(await codeOf(write.queryUpload())).toBe("ok");
    expect(await codeOf(write.putManifest())).toBe("ok");
    for (const denied of [write.getBlob, write.getManifest, write.statBlob, write.listManifests, write.collectGarbage, write.deleteManifest]) {
      expect(await codeOf(denied())).toBe(Code.PermissionDenied);
    }
    expect(await codeOf(admin.listManifests())).toBe("ok");
    expect(await codeOf(admin.collectGarbage())).toBe("ok");
    expect(await codeOf(admin.deleteManifest())).toBe(Code.NotFound);
  });

  it("lets a read token read only its manifest and the blobs it references", async () => {
    const client = store.client(await signer.token({ scope: "image:read", digest: manifest.digest, holder: "test" }));
    expect(await codeOf(client.getManifest({ digest: otherManifest.digest }))).toBe(Code.PermissionDenied);
    expect(await codeOf(collect(client.getBlob({ digest: other.digest })))).toBe(Code.PermissionDenied);
    expect(await codeOf(client.statBlob({ digest: other.digest }))).toBe(Code.PermissionDenied);
    const chunks = await collect(readBlobChunks(client, { digest: layer.digest }));
    expect(Buffer.concat(chunks).equals(layer.data)).toBe(true);
  });

  it("answers InvalidArgument to a bad name in every name field and creates no file", async () => {
    const admin = store.client(await signer.token({ scope: "image:admin" }));
    const writer = store.client(await signer.token({ scope: "image:write" }));
    const reader = store.client(await signer.token({ scope: "image:read", digest: manifest.digest, holder: "test" }));
    const cacheReader = cache.cacheClient(await signer.token({ scope: "image:read", digest: manifest.digest, holder: "test" }));
    const before = await readdir(store.dir, { recursive: true });
    for (const name of TRAVERSALS) {
      const cases: [string, Promise<unknown>][] = [
        ["PutBlob.digest", writer.putBlob((async function* () { yield { digest: name, size: 1n, data: new Uint8Array(1) }; })())],
        ["QueryUpload.digest", writer.queryUpload({ digest: name })],
        ["GetBlob.digest", collect(reader.getBlob({ digest: name }))],
        ["StatBlob.digest", reader.statBlob({ digest: name })],
        ["PutManifest.digest", writer.putManifest({ digest: name, manifestJson: manifest.json })],
        ["GetManifest.digest", reader.getManifest({ digest: name })],
        ["DeleteManifest.digest", admin.deleteManifest({ digest: name })],
        ["Fetch.manifest_digest", collect(cacheReader.fetch({ manifestDigest: name, locations: [store.url] }))],
        ["Pin.manifest_digest", cacheReader.pin({ manifestDigest: name, leaseId: "l1", ttl: { seconds: 60n } })],
        ["LocalPath.manifest_digest", cacheReader.localPath({ manifestDigest: name })],
        ["LocalPath.blob_digest", cacheReader.localPath({ manifestDigest: manifest.digest, blobDigest: name === "" ? "x" : name })],
        ["Push.manifest_digest", collect(cacheReader.push({ manifestDigest: name, targetUrl: store.url, targetToken: "t" }))],
      ];
      if (name !== "") cases.push(["ListManifests.page_token", admin.listManifests({ pageToken: name })]);
      for (const [field, call] of cases) {
        const err = await call.then(() => undefined, (e: unknown) => ConnectError.from(e));
        expect([field, name, err?.code]).toEqual([field, name, Code.InvalidArgument]);
      }
    }
    expect(await readdir(store.dir, { recursive: true })).toEqual(before);
  });

  it("validates the cache's other fields", async () => {
    const c = cache.cacheClient(await signer.token({ scope: "image:read", digest: manifest.digest, holder: "test" }));
    const d = manifest.digest;
    expect(await codeOf(c.pin({ manifestDigest: d, leaseId: "", ttl: { seconds: 60n } }))).toBe(Code.InvalidArgument);
    expect(await codeOf(c.pin({ manifestDigest: d, leaseId: "x".repeat(129), ttl: { seconds: 60n } }))).toBe(Code.InvalidArgument);
    expect(await codeOf(c.pin({ manifestDigest: d, leaseId: "bad lease", ttl: { seconds: 60n } }))).toBe(Code.InvalidArgument);
    expect(await codeOf(c.pin({ manifestDigest: d, leaseId: "l1" }))).toBe(Code.InvalidArgument);
    expect(await codeOf(c.pin({ manifestDigest: d, leaseId: "l1", ttl: { seconds: 25n * 3600n } }))).toBe(Code.InvalidArgument);
    expect(await codeOf(c.pin({ manifestDigest: d, leaseId: "l1", ttl: { seconds: 60n } }))).toBe(Code.NotFound);
    expect(await codeOf(collect(c.fetch({ manifestDigest: d, locations: [] })))).toBe(Code.InvalidArgument);
    expect(await codeOf(collect(c.fetch({ manifestDigest: d, locations: ["file:///etc/passwd"] })))).toBe(Code.InvalidArgument);
    expect(await codeOf(collect(c.fetch({ manifestDigest: d, locations: Array(17).fill(store.url) })))).toBe(Code.InvalidArgument);
    expect(await codeOf(collect(c.push({ manifestDigest: d, targetUrl: "not a url", targetToken: "t" })))).toBe(Code.InvalidArgument);
    // A token for another image cannot fetch this one.
    const o = cache.cacheClient(await signer.token({ scope: "image:read", digest: otherManifest.digest, holder: "test" }));
    expect(await codeOf(collect(o.fetch({ manifestDigest: d, locations: [store.url] })))).toBe(Code.PermissionDenied);
    expect(await codeOf(c.stats({}))).toBe("ok");
    expect(await codeOf(cache.cacheClient("").stats({}))).toBe(Code.Unauthenticated);
  });

  it("answers Unimplemented for the cache service in store mode", async () => {
    const c = store.cacheClient(await signer.token({ scope: "image:read", digest: manifest.digest, holder: "test" }));
    expect(await codeOf(c.stats({}))).toBe(Code.Unimplemented);
  });
});
