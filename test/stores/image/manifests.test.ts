import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { readdir, readFile, stat, utimes } from "node:fs/promises";
import { join } from "node:path";
import { type BlobSource } from "../../../lib/image/blob-io.js";
import { uploadBlob } from "../../../lib/image/client.js";
import { codeOf, makeSigner, makeTempDir, manifestFor, randomBlob, removeDir, sha256, startStore, type RunningStore, type Signer } from "../../support/image-store.js";

const source =
  (data: Buffer): BlobSource =>
  async function* (offset) {
    yield data.subarray(offset);
  };


describe("image store manifests and garbage collection", () => {
  let dir: string;
  let signer: Signer;
  let store: RunningStore;
  let writer: ReturnType<RunningStore["client"]>;
  let admin: ReturnType<RunningStore["client"]>;

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    store = await startStore(signer, { dir: join(dir, "data") });
    writer = store.client(await signer.token({ scope: "image:write" }));
    admin = store.client(await signer.token({ scope: "image:admin" }));
  });

  afterAll(async () => {
    await store.stop();
    await removeDir(dir);
  });

  async function put(b: { data: Buffer; digest: string; size: number }) {
    await uploadBlob(writer, { digest: b.digest, size: b.size, source: source(b.data) });
  }

  it("stores a valid manifest, serves its exact bytes and lists it in index.json", async () => {
    const layers = [randomBlob(100), randomBlob(200)];
    for (const l of layers) await put(l);
    const m = manifestFor(
      [
        { ...layers[0], mediaType: "application/vnd.treadmill.disk.qcow2" },
        { ...layers[1], mediaType: "application/vnd.treadmill.disk.qcow2", annotations: { "treadmill.lower": layers[0].digest } },
      ],
      { "org.opencontainers.image.title": "two layers" },
    );
    const res = await writer.putManifest({ digest: m.digest, manifestJson: m.json });
    expect(Number(res.totalSize)).toBe(m.json.length + 300);
    expect(res.manifest?.layers.map((l) => l.digest)).toEqual(layers.map((l) => l.digest));
    // Idempotent.
    await writer.putManifest({ digest: m.digest, manifestJson: m.json });
    const reader = store.client(await signer.token({ scope: "image:read", digest: m.digest, holder: "test" }));
    const got = await reader.getManifest({ digest: m.digest });
    expect(Buffer.from(got.manifestJson).equals(m.json)).toBe(true);
    expect(got.manifest?.annotations["org.opencontainers.image.title"]).toBe("two layers");
    const index = JSON.parse(await readFile(join(store.dir, "index.json"), "utf8")) as { manifests: { digest: string }[] };
    expect(index.manifests.map((e) => e.digest)).toContain(m.digest);
  });

  it("validates manifests: digest, form, media types, lower chains and blobs the writer does not hold", async () => {
    const layer = randomBlob(50);
    await put(layer);
    const ok = manifestFor([layer]);
    expect(await codeOf(writer.putManifest({ digest: sha256(Buffer.from("x")), manifestJson: ok.json }))).toBe(Code.InvalidArgument);
    const bad = (doc: unknown) => {
      const json = Buffer.from(typeof doc === "string" ? doc : JSON.stringify(doc));
      return codeOf(writer.putManifest({ digest: sha256(json), manifestJson: json }));
    };
    const base = { schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json" };
    const desc = { mediaType: "application/vnd.treadmill.disk.raw", digest: layer.digest, size: layer.size };
    expect(await bad("{not json")).toBe(Code.InvalidArgument);
    expect(await bad({ ...base, schemaVersion: 1, layers: [desc] })).toBe(Code.InvalidArgument);
    expect(await bad({ ...base, mediaType: "text/plain", layers: [desc] })).toBe(Code.InvalidArgument);
    expect(await bad({ ...base, layers: [] })).toBe(Code.InvalidArgument);
    expect(await bad({ ...base, layers: [{ ...desc, mediaType: "no slash" }] })).toBe(Code.InvalidArgument);
    expect(await bad({ ...base, layers: [{ ...desc, size: -1 }] })).toBe(Code.InvalidArgument);
    expect(await bad({ ...base, layers: [{ ...desc, digest: "sha256:../../etc/passwd" }] })).toBe(Code.InvalidArgument);
    expect(await bad({ ...base, layers: [{ ...desc, annotations: { "treadmill.lower": sha256(Buffer.from("q")) } }] })).toBe(
      Code.InvalidArgument,
    );
    expect(await bad({ ...base, layers: [{ ...desc, annotations: { k: "v".repeat(5000) } }] })).toBe(Code.InvalidArgument);
    expect(await bad({ ...base, layers: [{ ...desc, size: layer.size + 1 }] })).toBe(Code.InvalidArgument);
    const missing = randomBlob(10);
    const m = manifestFor([layer, missing]);
    const err = await writer.putManifest({ digest: m.digest, manifestJson: m.json }).catch((e: unknown) => ConnectError.from(e));
    // Missing or not the writer's: the same answer (no writer learns what another stored).
    expect((err as ConnectError).code).toBe(Code.PermissionDenied);
    expect((err as ConnectError).rawMessage).toContain(missing.digest);
    expect(await codeOf(writer.putManifest({ digest: m.digest, manifestJson: Buffer.alloc(1024 * 1024 + 1, 32) }))).toBe(
      Code.InvalidArgument,
    );
  });

  it("lists manifests in pages and deletes them", async () => {
    const digests: string[] = [];
    for (let i = 0; i < 3; i++) {
      const l = randomBlob(10 + i);
      await put(l);
      const m = manifestFor([l]);
      await writer.putManifest({ digest: m.digest, manifestJson: m.json });
      digests.push(m.digest);
    }
    const seen: string[] = [];
    let pageToken = "";
    do {
      const page = await admin.listManifests({ pageSize: 2, pageToken });
      expect(page.manifests.length).toBeLessThanOrEqual(2);
      seen.push(...page.manifests.map((e) => e.digest));
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    expect([...seen].sort()).toEqual(seen);
    for (const d of digests) expect(seen).toContain(d);
    expect(await codeOf(admin.listManifests({ pageToken: "../x" }))).toBe(Code.InvalidArgument);
    await admin.deleteManifest({ digest: digests[0] });
    expect(await codeOf(admin.deleteManifest({ digest: digests[0] }))).toBe(Code.NotFound);
    const after = await admin.listManifests({ pageSize: 1000 });
    expect(after.manifests.map((e) => e.digest)).not.toContain(digests[0]);
  });

  it("collects unreferenced blobs older than the grace period and never an upload in flight", async () => {
    const kept = randomBlob(1000);
    const orphanOld = randomBlob(2000);
    const orphanNew = randomBlob(3000);
    for (const b of [kept, orphanOld, orphanNew]) await put(b);
    const m = manifestFor([kept]);
    await writer.putManifest({ digest: m.digest, manifestJson: m.json });
    const hour = Date.now() / 1000 - 7200;
    for (const b of [kept, orphanOld]) await utimes(join(store.dir, "blobs", "sha256", b.digest.slice(7)), hour, hour);
    // An upload in flight: its first message is written, the stream stays open.
    const inflight = randomBlob(2 * 1024 * 1024);
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    let firstSent!: () => void;
    const sent = new Promise<void>((r) => (firstSent = r));
    const upload = writer.putBlob(
      (async function* () {
        yield { digest: inflight.digest, size: BigInt(inflight.size), offset: 0n, data: inflight.data.subarray(0, 1024 * 1024) };
        firstSent();
        await held;
        yield { offset: BigInt(1024 * 1024), data: inflight.data.subarray(1024 * 1024) };
      })(),
    );
    await sent;
    const deadline = Date.now() + 20_000;
    while (Number((await writer.queryUpload({ digest: inflight.digest })).committedOffset) < 1024 * 1024) {
      if (Date.now() > deadline) throw new Error("upload did not start");
      await new Promise((r) => setImmediate(r));
    }
    await utimes(join(store.dir, "uploads", inflight.digest.slice(7)), hour, hour);

    const dry = await admin.collectGarbage({ gracePeriod: { seconds: 3600n }, dryRun: true });
    expect(dry.deletedDigests).toEqual([orphanOld.digest]);
    expect(await stat(join(store.dir, "blobs", "sha256", orphanOld.digest.slice(7)))).toBeTruthy();

    const gc = await admin.collectGarbage({ gracePeriod: { seconds: 3600n } });
    expect(gc.deletedDigests).toEqual([orphanOld.digest]);
    expect(Number(gc.bytesFreed)).toBe(2000);
    expect(Number(gc.tempFilesDeleted)).toBe(0);
    const left = await readdir(join(store.dir, "blobs", "sha256"));
    expect(left).toContain(kept.digest.slice(7));
    expect(left).toContain(orphanNew.digest.slice(7));
    expect(left).not.toContain(orphanOld.digest.slice(7));
    release();
    expect(await upload).toMatchObject({ complete: true });
    expect(await codeOf(admin.collectGarbage({ gracePeriod: { seconds: -1n } }))).toBe(Code.InvalidArgument);
  });

  it("removes stale temp files of abandoned uploads", async () => {
    const b = randomBlob(4096);
    const res = await writer.putBlob(
      (async function* () {
        yield { digest: b.digest, size: BigInt(b.size), offset: 0n, data: b.data.subarray(0, 100) };
      })(),
    );
    expect(res.complete).toBe(false);
    const old = Date.now() / 1000 - 7200;
    await utimes(join(store.dir, "uploads", b.digest.slice(7)), old, old);
    const gc = await admin.collectGarbage({ gracePeriod: { seconds: 3600n } });
    expect(Number(gc.tempFilesDeleted)).toBe(1);
    expect(await writer.queryUpload({ digest: b.digest })).toMatchObject({ exists: false, committedOffset: 0n });
  });
});
