import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { downloadBlob, readBlobChunks, uploadBlob } from "../../../lib/image/client.js";
import { writeRandomFile } from "../../bench/baselines.js";
import {
  bufferSource,
  codeOf,
  collect,
  makeSigner,
  makeTempDir,
  manifestFor,
  randomBlob,
  removeDir,
  sha256,
  startStore,
  storeImage as storeBlobs,
  type RunningStore,
  type Signer,
} from "../../support/image-store.js";
import { fileSource } from "../../../lib/image/blob-io.js";
import { digestFile } from "../../../lib/image/digest.js";

describe("image store blobs", () => {
  let dir: string;
  let signer: Signer;
  let store: RunningStore;
  let writeToken: string;

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    store = await startStore(signer, { dir: join(dir, "data") });
    writeToken = await signer.token({ scope: "image:write" });
  });

  afterAll(async () => {
    await store.stop();
    await removeDir(dir);
  });

  /** Uploads blobs and a manifest over them; returns a read token for it. */
  const storeImage = (blobs: { data: Buffer; digest: string; size: number }[]) => storeBlobs(store, signer, writeToken, blobs);

  it("stores blobs of 0 bytes, a few bytes and several MiB and serves them back verified", async () => {
    const blobs = [randomBlob(0), randomBlob(7), randomBlob(5 * 1024 * 1024 + 3)];
    const { readToken } = await storeImage(blobs);
    const reader = store.client(readToken);
    for (const b of blobs) {
      const out = join(dir, `out-${b.size}`);
      await downloadBlob(reader, { digest: b.digest, size: b.size }, out);
      expect((await readFile(out)).equals(b.data)).toBe(true);
      const st = await reader.statBlob({ digest: b.digest });
      expect(Number(st.size)).toBe(b.size);
    }
    // The OCI layout on disk.
    expect(JSON.parse(await readFile(join(store.dir, "oci-layout"), "utf8"))).toEqual({ imageLayoutVersion: "1.0.0" });
    const files = await readdir(join(store.dir, "blobs", "sha256"));
    for (const b of blobs) expect(files).toContain(b.digest.slice(7));
  });

  it("streams a range from an offset with an optional length", async () => {
    const b = randomBlob(3 * 1024 * 1024 + 100);
    const { readToken } = await storeImage([b]);
    const reader = store.client(readToken);
    const tail = Buffer.concat(await collect(readBlobChunks(reader, { digest: b.digest, offset: 2 * 1024 * 1024 + 5 })));
    expect(tail.equals(b.data.subarray(2 * 1024 * 1024 + 5))).toBe(true);
    const mid = Buffer.concat(await collect(readBlobChunks(reader, { digest: b.digest, offset: 10, length: 1000 })));
    expect(mid.equals(b.data.subarray(10, 1010))).toBe(true);
    const end = await collect(readBlobChunks(reader, { digest: b.digest, offset: b.size }));
    expect(end).toHaveLength(0);
    expect(await codeOf(collect(readBlobChunks(reader, { digest: b.digest, offset: b.size + 1 })))).toBe(Code.OutOfRange);
  });

  it("round-trips a 300 MiB blob from a file with the digest verified at both ends", async () => {
    const src = join(dir, "big.bin");
    await writeRandomFile(src, 300 * 1024 * 1024);
    const { digest, size } = await digestFile(src);
    const writer = store.client(writeToken);
    const up = await uploadBlob(writer, { digest, size, source: fileSource(src) });
    expect(up).toEqual({ alreadyExisted: false, bytesSent: size });
    const m = manifestFor([{ digest, size }]);
    await writer.putManifest({ digest: m.digest, manifestJson: m.json });
    const reader = store.client(await signer.token({ scope: "image:read", digest: m.digest, holder: "test" }));
    const out = join(dir, "big.out");
    await downloadBlob(reader, { digest, size }, out);
    expect(await digestFile(out)).toEqual({ digest, size });
  }, 120_000);

  it("returns at once when the blob exists", async () => {
    const b = randomBlob(1000);
    await storeImage([b]);
    const res = await uploadBlob(store.client(writeToken), { digest: b.digest, size: b.size, source: bufferSource(b.data) });
    expect(res).toEqual({ alreadyExisted: true, bytesSent: 0 });
    // PutBlob itself says so too.
    const direct = await store.client(writeToken).putBlob(
      (async function* () {
        yield { digest: b.digest, size: BigInt(b.size), offset: 0n, data: b.data };
      })(),
    );
    expect(direct).toMatchObject({ complete: true, alreadyExisted: true });
  });

  it("rejects a digest mismatch with InvalidArgument and leaves nothing behind", async () => {
    const b = randomBlob(2 * 1024 * 1024);
    const wrong = sha256(Buffer.from("something else"));
    const err = await store
      .client(writeToken)
      .putBlob(
        (async function* () {
          yield { digest: wrong, size: BigInt(b.size), offset: 0n, data: b.data.subarray(0, 1024 * 1024) };
          yield { offset: BigInt(1024 * 1024), data: b.data.subarray(1024 * 1024) };
        })(),
      )
      .catch((e: unknown) => ConnectError.from(e));
    expect(err).toBeInstanceOf(ConnectError);
    expect((err as ConnectError).code).toBe(Code.InvalidArgument);
    expect((err as ConnectError).rawMessage).toMatch(/digest mismatch/);
    const q = await store.client(writeToken).queryUpload({ digest: wrong });
    expect(q).toMatchObject({ exists: false, committedOffset: 0n });
    expect((await readdir(join(store.dir, "uploads"))).filter((f) => f.startsWith(wrong.slice(7)))).toEqual([]);
    expect(await stat(join(store.dir, "blobs", "sha256", wrong.slice(7))).catch(() => undefined)).toBeUndefined();
  });

  it("keeps the committed prefix of a half-closed upload and resumes from it", async () => {
    const b = randomBlob(3 * 1024 * 1024);
    const writer = store.client(writeToken);
    const first = await writer.putBlob(
      (async function* () {
        yield { digest: b.digest, size: BigInt(b.size), offset: 0n, data: b.data.subarray(0, 1024 * 1024) };
      })(),
    );
    expect(first).toMatchObject({ complete: false, committedSize: BigInt(1024 * 1024) });
    expect(await writer.queryUpload({ digest: b.digest })).toMatchObject({
      exists: false,
      committedOffset: BigInt(1024 * 1024),
      size: BigInt(b.size),
    });
    // Not the committed offset: OutOfRange, and the prefix is kept.
    expect(
      await codeOf(
        writer.putBlob(
          (async function* () {
            yield { digest: b.digest, size: BigInt(b.size), offset: 0n, data: b.data.subarray(0, 10) };
          })(),
        ),
      ),
    ).toBe(Code.OutOfRange);
    let sentFrom = -1;
    const res = await uploadBlob(writer, {
      digest: b.digest,
      size: b.size,
      source: (offset) => {
        sentFrom = offset;
        return bufferSource(b.data)(offset);
      },
    });
    expect(sentFrom).toBe(1024 * 1024);
    expect(res.bytesSent).toBe(2 * 1024 * 1024);
    expect(await writer.queryUpload({ digest: b.digest })).toMatchObject({ exists: true, committedOffset: BigInt(b.size) });
  });

  it("answers concurrent uploads of one blob and of different blobs correctly", async () => {
    const same = randomBlob(4 * 1024 * 1024);
    const others = [randomBlob(2 * 1024 * 1024), randomBlob(3 * 1024 * 1024)];
    const writer = store.client(writeToken);
    const results = await Promise.all([
      uploadBlob(writer, { digest: same.digest, size: same.size, source: bufferSource(same.data) }, { attempts: 50 }),
      uploadBlob(writer, { digest: same.digest, size: same.size, source: bufferSource(same.data) }, { attempts: 50 }),
      uploadBlob(writer, { digest: same.digest, size: same.size, source: bufferSource(same.data) }, { attempts: 50 }),
      ...others.map((o) => uploadBlob(writer, { digest: o.digest, size: o.size, source: bufferSource(o.data) })),
    ]);
    expect(results.slice(3).every((r) => r.bytesSent > 0)).toBe(true);
    for (const b of [same, ...others]) {
      const bytes = await readFile(join(store.dir, "blobs", "sha256", b.digest.slice(7)));
      expect(bytes.equals(b.data)).toBe(true);
    }
  });

  it("validates every field of PutBlob messages", async () => {
    const writer = store.client(writeToken);
    const b = randomBlob(100);
    const put = (msgs: object[]) =>
      codeOf(
        writer.putBlob(
          (async function* () {
            for (const m of msgs) yield m;
          })(),
        ),
      );
    expect(await put([])).toBe(Code.InvalidArgument);
    expect(await put([{ digest: "sha256:abc", size: 100n, data: b.data }])).toBe(Code.InvalidArgument);
    expect(await put([{ digest: b.digest.toUpperCase(), size: 100n, data: b.data }])).toBe(Code.InvalidArgument);
    expect(await put([{ digest: b.digest, size: -1n, data: b.data }])).toBe(Code.InvalidArgument);
    expect(await put([{ digest: b.digest, size: 100n, offset: 101n, data: new Uint8Array() }])).toBe(Code.OutOfRange);
    expect(await put([{ digest: b.digest, size: 50n, data: b.data }])).toBe(Code.OutOfRange);
    expect(
      await put([
        { digest: b.digest, size: 100n, data: b.data.subarray(0, 10) },
        { offset: 20n, data: b.data.subarray(20) },
      ]),
    ).toBe(Code.OutOfRange);
  });

  it("answers NotFound for a blob of the manifest that is gone and for an unknown manifest", async () => {
    const b = randomBlob(10);
    const { readToken, manifest } = await storeImage([b]);
    const reader = store.client(readToken);
    expect(await codeOf(reader.getManifest({ digest: manifest.digest }))).toBe("ok");
    const other = sha256(Buffer.from("no such manifest"));
    const otherReader = store.client(await signer.token({ scope: "image:read", digest: other, holder: "test" }));
    expect(await codeOf(otherReader.getManifest({ digest: other }))).toBe(Code.NotFound);
    expect(await codeOf(otherReader.statBlob({ digest: other }))).toBe(Code.NotFound);
  });

  it("detects a bit flip on disk when reading, removes the blob and says DataLoss", async () => {
    const b = randomBlob(2 * 1024 * 1024);
    const { readToken } = await storeImage([b]);
    const path = join(store.dir, "blobs", "sha256", b.digest.slice(7));
    const flipped = Buffer.from(b.data);
    flipped[1234] ^= 0x01;
    await writeFile(path, flipped);
    const reader = store.client(readToken);
    const err = await downloadBlob(reader, { digest: b.digest, size: b.size }, join(dir, "flipped.out")).catch((e: unknown) =>
      ConnectError.from(e),
    );
    expect((err as ConnectError).code).toBe(Code.DataLoss);
    expect(await stat(path).catch(() => undefined)).toBeUndefined();
  });
});
