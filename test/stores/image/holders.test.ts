// Possession at an image store (issue #17, hole 3; docs/images.md): who
// uploaded a blob or manifest holds it, across restarts; a writer that does
// not hold an existing blob sends its bytes; a manifest names only blobs its
// writer holds or mounts; a read token is served only when its holder holds
// the manifest here. Real servers on port 0, real tokens.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { readBlobChunks, uploadBlob } from "../../../lib/image/client.js";
import type { Capability } from "../../../lib/tokens.js";
import { bufferSource, codeOf, collect, makeSigner, makeTempDir, manifestFor, randomBlob, removeDir, startStore, type RunningStore, type Signer } from "../../support/image-store.js";

describe("possession at an image store", () => {
  let dir: string;
  let signer: Signer;
  let store: RunningStore;
  const as = (subject: string, capability: Capability) => signer.signer.sign(capability, 600_000, { subject });
  const writer = async (subject: string) => store.client(await as(subject, { scope: "image:write" }));
  const reader = async (manifest: string, holder: string, subject = holder) =>
    store.client(await as(subject, { scope: "image:read", digest: manifest, holder }));

  /** alice's private image: one layer and its manifest, uploaded by alice. */
  async function alicesImage() {
    const layer = randomBlob(64 * 1024);
    const alice = await writer("alice");
    await uploadBlob(alice, { digest: layer.digest, size: layer.size, source: bufferSource(layer.data) });
    const manifest = manifestFor([layer]);
    await alice.putManifest({ digest: manifest.digest, manifestJson: manifest.json });
    return { layer, manifest };
  }

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    store = await startStore(signer, { dir: join(dir, "data") });
  });

  afterAll(async () => {
    await store.stop();
    await removeDir(dir);
  });

  it("serves an image only to read tokens whose holder uploaded it, also after a restart", async () => {
    const { layer, manifest } = await alicesImage();
    await store.stop();
    store = await startStore(signer, { dir: join(dir, "data") });
    const mine = await reader(manifest.digest, "alice", "bob");
    expect(Buffer.concat(await collect(readBlobChunks(mine, { digest: layer.digest }))).equals(layer.data)).toBe(true);
    const theirs = await reader(manifest.digest, "mallory");
    const err = await theirs.getManifest({ digest: manifest.digest }).catch((e: unknown) => ConnectError.from(e));
    expect((err as ConnectError).code).toBe(Code.PermissionDenied);
    expect(await codeOf(collect(readBlobChunks(theirs, { digest: layer.digest })))).toBe(Code.PermissionDenied);
    expect(await codeOf(theirs.statBlob({ digest: layer.digest }))).toBe(Code.PermissionDenied);
  });

  it("asks a writer that does not hold a stored blob for its bytes, and keeps the stored blob as it was", async () => {
    const { layer } = await alicesImage();
    const path = join(store.dir, "blobs", "sha256", layer.digest.slice(7));
    const before = await stat(path);
    const mallory = await writer("mallory");
    // To mallory the blob is not there: no existence oracle, and no shortcut.
    expect(await mallory.queryUpload({ digest: layer.digest })).toMatchObject({ exists: false, committedOffset: 0n, size: 0n });
    const wrong = randomBlob(layer.size);
    expect(await codeOf(uploadBlob(mallory, { digest: layer.digest, size: layer.size, source: bufferSource(wrong.data) }))).toBe(
      Code.InvalidArgument,
    );
    const sent = await uploadBlob(mallory, { digest: layer.digest, size: layer.size, source: bufferSource(layer.data) });
    expect(sent).toEqual({ alreadyExisted: false, bytesSent: layer.size });
    const after = await stat(path);
    expect([after.ino, after.mtimeMs]).toEqual([before.ino, before.mtimeMs]);
    expect((await mallory.queryUpload({ digest: layer.digest })).exists).toBe(true);
    // Now she holds it: a second upload returns at once.
    expect(await uploadBlob(mallory, { digest: layer.digest, size: layer.size, source: bufferSource(layer.data) })).toEqual({
      alreadyExisted: true,
      bytesSent: 0,
    });
  });

  it("lets only the writer that started an upload resume it", async () => {
    const blob = randomBlob(200_000);
    const alice = await writer("alice");
    const half = 100_000;
    await alice.putBlob(
      (async function* () {
        yield { digest: blob.digest, size: BigInt(blob.size), offset: 0n, data: blob.data.subarray(0, half) };
      })(),
    );
    expect(Number((await alice.queryUpload({ digest: blob.digest })).committedOffset)).toBe(half);
    const mallory = await writer("mallory");
    expect(Number((await mallory.queryUpload({ digest: blob.digest })).committedOffset)).toBe(0);
    const resume = mallory.putBlob(
      (async function* () {
        yield { digest: blob.digest, size: BigInt(blob.size), offset: BigInt(half), data: blob.data.subarray(half) };
      })(),
    );
    expect(await codeOf(resume)).toBe(Code.OutOfRange);
    await uploadBlob(alice, { digest: blob.digest, size: blob.size, source: bufferSource(blob.data) });
    expect((await alice.queryUpload({ digest: blob.digest })).exists).toBe(true);
  });

  it("refuses a manifest naming a blob its writer does not hold, and takes it with a mount token of the writer", async () => {
    const { layer, manifest } = await alicesImage();
    const own = randomBlob(1000);
    const mallory = await writer("mallory");
    await uploadBlob(mallory, { digest: own.digest, size: own.size, source: bufferSource(own.data) });
    const hers = manifestFor([own, layer]);
    const refused = await mallory.putManifest({ digest: hers.digest, manifestJson: hers.json }).catch((e: unknown) => ConnectError.from(e));
    expect((refused as ConnectError).code).toBe(Code.PermissionDenied);
    expect((refused as ConnectError).rawMessage).toContain(layer.digest);
    expect((refused as ConnectError).rawMessage).toContain("mount_tokens");
    // Nor is her manifest a key to alice's layer.
    expect(await codeOf(collect(readBlobChunks(await reader(hers.digest, "mallory"), { digest: layer.digest })))).toBe(Code.PermissionDenied);
    // A mount token minted for someone else, or whose holder does not hold the image, does not mount.
    const forBob = await as("bob", { scope: "image:read", digest: manifest.digest, holder: "alice" });
    expect(await codeOf(mallory.putManifest({ digest: hers.digest, manifestJson: hers.json, mountTokens: [forBob] }))).toBe(Code.PermissionDenied);
    const unbacked = await as("mallory", { scope: "image:read", digest: manifest.digest, holder: "mallory" });
    expect(await codeOf(mallory.putManifest({ digest: hers.digest, manifestJson: hers.json, mountTokens: [unbacked] }))).toBe(
      Code.PermissionDenied,
    );
    expect(await codeOf(mallory.putManifest({ digest: hers.digest, manifestJson: hers.json, mountTokens: ["junk"] }))).toBe(
      Code.InvalidArgument,
    );
    // A read token of alice's image minted for mallory (a public image, say) mounts its layer.
    const granted = await as("mallory", { scope: "image:read", digest: manifest.digest, holder: "alice" });
    await mallory.putManifest({ digest: hers.digest, manifestJson: hers.json, mountTokens: [granted] });
    const bytes = Buffer.concat(await collect(readBlobChunks(await reader(hers.digest, "mallory"), { digest: layer.digest })));
    expect(bytes.equals(layer.data)).toBe(true);
    expect((await mallory.queryUpload({ digest: layer.digest })).exists).toBe(true);
  });

  it("keeps serving the objects of a data directory from before holders, but takes no new manifest over them", async () => {
    const legacyDir = join(dir, "legacy");
    const old = await startStore(signer, { dir: legacyDir });
    const layer = randomBlob(5000);
    const w = old.client(await as("alice", { scope: "image:write" }));
    await uploadBlob(w, { digest: layer.digest, size: layer.size, source: bufferSource(layer.data) });
    const manifest = manifestFor([layer]);
    await w.putManifest({ digest: manifest.digest, manifestJson: manifest.json });
    await old.stop();
    // As a store of the first wave left it: no holders directory.
    await rm(join(legacyDir, "holders"), { recursive: true, force: true });
    const upgraded = await startStore(signer, { dir: legacyDir });
    try {
      const anyone = upgraded.client(await as("carol", { scope: "image:read", digest: manifest.digest, holder: "carol" }));
      expect(Buffer.from((await anyone.getManifest({ digest: manifest.digest })).manifestJson).equals(manifest.json)).toBe(true);
      const carol = upgraded.client(await as("carol", { scope: "image:write" }));
      const hers = manifestFor([layer], { "org.opencontainers.image.title": "carol's" });
      expect(await codeOf(carol.putManifest({ digest: hers.digest, manifestJson: hers.json }))).toBe(Code.PermissionDenied);
    } finally {
      await upgraded.stop();
    }
  });

  it("drops a collected blob's holders, so a later upload of it starts afresh", async () => {
    const blob = randomBlob(300);
    const alice = await writer("alice");
    await uploadBlob(alice, { digest: blob.digest, size: blob.size, source: bufferSource(blob.data) });
    const holders = join(store.dir, "holders", blob.digest.slice(7));
    expect((await stat(holders)).isFile()).toBe(true);
    const admin = store.client(await as("admin", { scope: "image:admin" }));
    await admin.collectGarbage({ gracePeriod: { seconds: 0n, nanos: 0 } });
    expect(await stat(holders).catch(() => undefined)).toBeUndefined();
    expect((await alice.queryUpload({ digest: blob.digest })).exists).toBe(false);
  });
});
