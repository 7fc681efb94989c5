// PutBlob with the digest at the end (PutBlobRequest.digest_at_end): the
// client hashes while it sends and names the digest in the last message; the
// store commits the blob only if what it wrote hashes to it, makes the writer
// a holder, and never resumes such an upload. Real store on port 0, real
// tokens.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code } from "@connectrpc/connect";
import { readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { downloadBlob, uploadBlob, uploadBlobHashing, type ImageStoreClient } from "../../../lib/image/client.js";
import type { Capability } from "../../../lib/tokens.js";
import { bufferSource, codeOf, makeSigner, makeTempDir, manifestFor, randomBlob, removeDir, sha256, startStore, type RunningStore, type Signer } from "../../support/image-store.js";

const MIB = 1024 * 1024;

describe("PutBlob with the digest at the end", () => {
  let dir: string;
  let signer: Signer;
  let store: RunningStore;
  const as = (subject: string, capability: Capability) => signer.signer.sign(capability, 600_000, { subject });
  const writer = async (subject: string) => store.client(await as(subject, { scope: "image:write" }));
  const pendingFiles = async (at = store) => (await readdir(join(at.dir, "uploads"))).filter((f) => f.startsWith("pending-"));
  const put = (client: ImageStoreClient, messages: object[]) =>
    codeOf(
      client.putBlob(
        (async function* () {
          for (const m of messages) yield m;
        })(),
      ),
    );

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    store = await startStore(signer, { dir: join(dir, "data") });
  });

  afterAll(async () => {
    await store.stop();
    await removeDir(dir);
  });

  it("stores blobs of 0 bytes, a few bytes and several MiB under the digest sent last, readable and held by their writer", async () => {
    const alice = await writer("alice");
    const blobs = [randomBlob(0), randomBlob(7), randomBlob(7 * MIB + 5)];
    for (const b of blobs) {
      expect(await uploadBlobHashing(alice, { size: b.size, source: bufferSource(b.data) })).toEqual({ digest: b.digest, alreadyExisted: false });
    }
    // A manifest over them is taken: alice holds every blob.
    const manifest = manifestFor(blobs);
    await alice.putManifest({ digest: manifest.digest, manifestJson: manifest.json });
    const reader = store.client(await as("alice", { scope: "image:read", digest: manifest.digest, holder: "alice" }));
    for (const b of blobs) {
      const out = join(dir, `out-${b.size}`);
      await downloadBlob(reader, { digest: b.digest, size: b.size }, out);
      expect((await readFile(out)).equals(b.data)).toBe(true);
    }
    expect(await pendingFiles()).toEqual([]);
  });

  it("hashes a blob of 64 MiB or more on a thread of its own and stores it under the right digest", async () => {
    const alice = await writer("alice");
    const b = randomBlob(80 * MIB + 3);
    expect(await uploadBlobHashing(alice, { size: b.size, source: bufferSource(b.data) })).toEqual({ digest: b.digest, alreadyExisted: false });
    expect((await readFile(join(store.dir, "blobs", "sha256", b.digest.slice(7)))).equals(b.data)).toBe(true);
  }, 60_000);

  it("refuses a digest that does not match the bytes with InvalidArgument and keeps nothing", async () => {
    const alice = await writer("alice");
    const b = randomBlob(2 * MIB);
    const wrong = sha256(Buffer.from("something else"));
    const err = await alice
      .putBlob(
        (async function* () {
          yield { digestAtEnd: true, size: BigInt(b.size), offset: 0n, data: b.data.subarray(0, MIB) };
          yield { offset: BigInt(MIB), data: b.data.subarray(MIB), digest: wrong };
        })(),
      )
      .catch((e: unknown) => e as { code: Code; rawMessage: string });
    expect(err).toMatchObject({ code: Code.InvalidArgument, rawMessage: expect.stringMatching(/^digest mismatch: the data hashes to sha256:[0-9a-f]{64}, not sha256:/) });
    expect(await pendingFiles()).toEqual([]);
    for (const digest of [wrong, b.digest]) {
      expect(await stat(join(store.dir, "blobs", "sha256", digest.slice(7))).catch(() => undefined)).toBeUndefined();
    }
  });

  it("refuses a stream without the digest, short of its size, with a message after the digest or not starting at 0, and keeps nothing", async () => {
    const alice = await writer("alice");
    const b = randomBlob(100);
    const first = { digestAtEnd: true, size: 100n, offset: 0n };
    expect(await put(alice, [{ ...first, data: b.data }])).toBe(Code.InvalidArgument);
    expect(await put(alice, [{ ...first, data: b.data.subarray(0, 50), digest: b.digest }])).toBe(Code.InvalidArgument);
    expect(
      await put(alice, [
        { ...first, data: b.data.subarray(0, 50), digest: b.digest },
        { offset: 50n, data: b.data.subarray(50) },
      ]),
    ).toBe(Code.InvalidArgument);
    expect(await put(alice, [{ ...first, data: b.data, digest: "sha256:abc" }])).toBe(Code.InvalidArgument);
    expect(await put(alice, [{ ...first, offset: 10n, data: b.data.subarray(10), digest: b.digest }])).toBe(Code.OutOfRange);
    expect(await put(alice, [{ ...first, size: 50n, data: b.data, digest: b.digest }])).toBe(Code.OutOfRange);
    expect(
      await put(alice, [
        { ...first, data: b.data.subarray(0, 10) },
        { offset: 20n, data: b.data.subarray(20), digest: b.digest },
      ]),
    ).toBe(Code.OutOfRange);
    expect(await pendingFiles()).toEqual([]);
    expect(await stat(join(store.dir, "blobs", "sha256", b.digest.slice(7))).catch(() => undefined)).toBeUndefined();
  });

  it("answers already_existed only to a writer that held the blob, makes another writer a holder, and leaves the stored blob as it was", async () => {
    const alice = await writer("alice");
    const bob = await writer("bob");
    const b = randomBlob(MIB + 1);
    await uploadBlob(alice, { digest: b.digest, size: b.size, source: bufferSource(b.data) });
    const path = join(store.dir, "blobs", "sha256", b.digest.slice(7));
    const before = await stat(path);
    expect(await uploadBlobHashing(alice, { size: b.size, source: bufferSource(b.data) })).toEqual({ digest: b.digest, alreadyExisted: true });
    // bob learns nothing of alice's blob, and proved possession by sending it.
    const manifest = manifestFor([b]);
    expect(await codeOf(bob.putManifest({ digest: manifest.digest, manifestJson: manifest.json }))).toBe(Code.PermissionDenied);
    expect(await uploadBlobHashing(bob, { size: b.size, source: bufferSource(b.data) })).toEqual({ digest: b.digest, alreadyExisted: false });
    expect(await codeOf(bob.putManifest({ digest: manifest.digest, manifestJson: manifest.json }))).toBe("ok");
    const after = await stat(path);
    expect([after.ino, after.mtimeMs]).toEqual([before.ino, before.mtimeMs]);
    expect(await pendingFiles()).toEqual([]);
  });

  it("keeps an upload in progress through a garbage collection", async () => {
    const alice = await writer("alice");
    const admin = store.client(await as("admin", { scope: "image:admin" }));
    const b = randomBlob(3 * MIB);
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let sentFirst!: () => void;
    const firstSent = new Promise<void>((resolve) => (sentFirst = resolve));
    const upload = alice.putBlob(
      (async function* () {
        yield { digestAtEnd: true, size: BigInt(b.size), offset: 0n, data: b.data.subarray(0, MIB) };
        sentFirst();
        await released;
        yield { offset: BigInt(MIB), data: b.data.subarray(MIB), digest: b.digest };
      })(),
    );
    await firstSent;
    // The store has the first message's bytes in its temp file.
    const deadline = Date.now() + 10_000;
    while ((await pendingFiles()).length === 0 || (await stat(join(store.dir, "uploads", (await pendingFiles())[0]))).size < MIB) {
      if (Date.now() > deadline) throw new Error("the first message never reached the store's disk");
      await new Promise((resolve) => setImmediate(resolve));
    }
    const gc = await admin.collectGarbage({ gracePeriod: {} });
    expect(gc.tempFilesDeleted).toBe(0n);
    release();
    expect(await upload).toMatchObject({ digest: b.digest, complete: true, alreadyExisted: false });
    expect((await readFile(join(store.dir, "blobs", "sha256", b.digest.slice(7)))).equals(b.data)).toBe(true);
  });

  it("answers ResourceExhausted over the size cap before writing anything", async () => {
    const capped = await startStore(signer, { dir: join(dir, "capped"), config: { capBytes: 5 * MIB } });
    try {
      const alice = capped.client(await as("alice", { scope: "image:write" }));
      const big = randomBlob(6 * MIB);
      const never = new Promise<void>(() => undefined);
      const code = await codeOf(
        alice.putBlob(
          (async function* () {
            yield { digestAtEnd: true, size: BigInt(big.size), offset: 0n, data: big.data.subarray(0, MIB) };
            // The store answers before it asks for more.
            await never;
          })(),
        ),
      );
      expect(code).toBe(Code.ResourceExhausted);
      expect(await readdir(join(capped.dir, "uploads"))).toEqual([]);
      const fits = randomBlob(MIB);
      expect(await uploadBlobHashing(alice, { size: fits.size, source: bufferSource(fits.data) })).toEqual({ digest: fits.digest, alreadyExisted: false });
    } finally {
      await capped.stop();
    }
  });

  it("needs an image:write token, as every upload does", async () => {
    const b = randomBlob(10);
    const message = { digestAtEnd: true, size: 10n, offset: 0n, data: b.data, digest: b.digest };
    expect(await put(store.client(""), [message])).toBe(Code.Unauthenticated);
    const manifest = manifestFor([b]);
    expect(await put(store.client(await as("alice", { scope: "image:read", digest: manifest.digest, holder: "alice" })), [message])).toBe(
      Code.PermissionDenied,
    );
    expect(await pendingFiles()).toEqual([]);
  });
});
