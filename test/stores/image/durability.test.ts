// Crashes and full disks: the store as a real child process killed with
// SIGKILL mid-upload, an interrupted client, and a store on a small tmpfs.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code } from "@connectrpc/connect";
import { execFile } from "node:child_process";
import { mkdir, readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { type BlobSource } from "../../../lib/image/blob-io.js";
import { imageStoreClient, imageStoreTransport, uploadBlob } from "../../../lib/image/client.js";
import { startProcess, type RunningProcess } from "../../support/process.js";
import { codeOf, makeSigner, makeTempDir, randomBlob, removeDir, startStore, type Signer } from "../../support/image-store.js";

const run = promisify(execFile);
const MIB = 1024 * 1024;

/** A source that sends `data` in 1 MiB pieces and stops after `pauseAt` bytes until released. */
function pausingSource(data: Buffer, pauseAt: number) {
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  let paused!: () => void;
  const reachedPause = new Promise<void>((r) => (paused = r));
  const source: BlobSource = async function* (offset) {
    for (let i = offset; i < data.length; i += MIB) {
      if (i >= pauseAt && offset < pauseAt) {
        paused();
        await released;
      }
      yield data.subarray(i, Math.min(data.length, i + MIB));
    }
  };
  return { source, release, reachedPause };
}

async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("image store durability", () => {
  let dir: string;
  let signer: Signer;
  let writeToken: string;

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    writeToken = await signer.token({ scope: "image:write" });
  });

  afterAll(async () => {
    await removeDir(dir);
  });

  function startChild(dataDir: string): Promise<{ proc: RunningProcess; url: string }> {
    const proc = startProcess("bin/treadmill-image-store.js", ["--port", "0", "--data-dir", dataDir, "--signing-keys-file", signer.jwksFile]);
    return proc.waitForLine(/image store ready/, 30_000).then((line) => ({ proc, url: (JSON.parse(line) as { url: string }).url }));
  }

  it("survives a SIGKILL mid-upload: no partial blob after restart, the upload resumes, no temp file is left", async () => {
    const dataDir = join(dir, "killed");
    const blob = randomBlob(24 * MIB);
    const first = await startChild(dataDir);
    const t1 = imageStoreTransport(first.url, { token: writeToken });
    const client1 = imageStoreClient(t1);
    const { source, reachedPause } = pausingSource(blob.data, 8 * MIB);
    const upload = uploadBlob(client1, { digest: blob.digest, size: blob.size, source }, { attempts: 1 });
    await reachedPause;
    await waitFor("8 MiB committed", async () => Number((await client1.queryUpload({ digest: blob.digest })).committedOffset) >= 8 * MIB);
    first.proc.child.kill("SIGKILL");
    expect(await first.proc.exited).toBe("SIGKILL");
    expect(await codeOf(upload)).not.toBe("ok");
    t1.close();

    const second = await startChild(dataDir);
    try {
      const t2 = imageStoreTransport(second.url, { token: writeToken });
      const client2 = imageStoreClient(t2);
      const state = await client2.queryUpload({ digest: blob.digest });
      expect(state.exists).toBe(false);
      expect(Number(state.committedOffset)).toBeGreaterThanOrEqual(8 * MIB);
      expect(Number(state.committedOffset)).toBeLessThan(blob.size);
      expect(await readdir(join(dataDir, "blobs", "sha256"))).toEqual([]);
      let resumedFrom = -1;
      const res = await uploadBlob(client2, {
        digest: blob.digest,
        size: blob.size,
        source: (offset) => {
          resumedFrom = offset;
          return pausingSource(blob.data, Infinity).source(offset);
        },
      });
      expect(resumedFrom).toBe(Number(state.committedOffset));
      expect(res.bytesSent).toBe(blob.size - resumedFrom);
      expect((await readFile(join(dataDir, "blobs", "sha256", blob.digest.slice(7)))).equals(blob.data)).toBe(true);
      expect(await readdir(join(dataDir, "uploads"))).toEqual([]);
      t2.close();
    } finally {
      second.proc.child.kill("SIGTERM");
      await second.proc.exited;
    }
  }, 90_000);

  it("keeps what a client sent before its connection died and resumes from there", async () => {
    const store = await startStore(signer, { dir: join(dir, "client-killed") });
    try {
      const blob = randomBlob(6 * MIB);
      const t1 = imageStoreTransport(store.url, { token: writeToken });
      const client1 = imageStoreClient(t1);
      const { source, reachedPause } = pausingSource(blob.data, 3 * MIB);
      const upload = uploadBlob(client1, { digest: blob.digest, size: blob.size, source }, { attempts: 1 });
      await reachedPause;
      await waitFor("3 MiB committed", async () => Number((await client1.queryUpload({ digest: blob.digest })).committedOffset) >= 3 * MIB);
      t1.close(); // the client's connection dies
      expect(await codeOf(upload)).not.toBe("ok");
      const client2 = store.client(writeToken);
      // The store notices the stream is gone and releases the upload.
      let from = -1;
      await uploadBlob(
        client2,
        { digest: blob.digest, size: blob.size, source: (o) => ((from = o), pausingSource(blob.data, Infinity).source(o)) },
        { attempts: 20 },
      );
      expect(from).toBe(3 * MIB);
      expect((await readFile(join(store.dir, "blobs", "sha256", blob.digest.slice(7)))).equals(blob.data)).toBe(true);
    } finally {
      await store.stop();
    }
  });

  it("answers ResourceExhausted over the size cap before writing and keeps serving", async () => {
    const store = await startStore(signer, { dir: join(dir, "capped"), config: { capBytes: 5 * MIB } });
    try {
      const writer = store.client(writeToken);
      const small = randomBlob(3 * MIB);
      const big = randomBlob(3 * MIB);
      await uploadBlob(writer, { digest: small.digest, size: small.size, source: pausingSource(small.data, Infinity).source });
      expect(await codeOf(uploadBlob(writer, { digest: big.digest, size: big.size, source: pausingSource(big.data, Infinity).source }))).toBe(
        Code.ResourceExhausted,
      );
      expect(await readdir(join(store.dir, "uploads"))).toEqual([]);
      const fits = randomBlob(MIB);
      await uploadBlob(writer, { digest: fits.digest, size: fits.size, source: pausingSource(fits.data, Infinity).source });
    } finally {
      await store.stop();
    }
  });

  describe("on a full disk (8 MiB tmpfs)", () => {
    const mount = () => join(dir, "tmpfs");
    beforeAll(async () => {
      await mkdir(mount(), { recursive: true });
      await run("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", mount()]);
    });
    afterAll(async () => {
      await run("umount", [mount()]).catch(() => undefined);
    });

    it("answers ResourceExhausted before writing a blob that cannot fit, and keeps serving", async () => {
      const store = await startStore(signer, { dir: join(mount(), "a") });
      try {
        const writer = store.client(writeToken);
        const big = randomBlob(12 * MIB);
        expect(await codeOf(uploadBlob(writer, { digest: big.digest, size: big.size, source: pausingSource(big.data, Infinity).source }))).toBe(
          Code.ResourceExhausted,
        );
        expect(await readdir(join(store.dir, "uploads"))).toEqual([]);
        const fits = randomBlob(2 * MIB);
        await uploadBlob(writer, { digest: fits.digest, size: fits.size, source: pausingSource(fits.data, Infinity).source });
        expect((await readFile(join(store.dir, "blobs", "sha256", fits.digest.slice(7)))).equals(fits.data)).toBe(true);
      } finally {
        await store.stop();
        await removeDir(join(mount(), "a"));
      }
    });

    it("answers ResourceExhausted when the disk fills during a write, keeps the committed prefix and keeps serving", async () => {
      // The free-space check is told the disk is large, so the write itself hits ENOSPC.
      const store = await startStore(signer, { dir: join(mount(), "b"), deps: { freeBytes: async () => 2 ** 40 } });
      try {
        const writer = store.client(writeToken);
        const big = randomBlob(12 * MIB);
        expect(await codeOf(uploadBlob(writer, { digest: big.digest, size: big.size, source: pausingSource(big.data, Infinity).source }, { attempts: 1 }))).toBe(
          Code.ResourceExhausted,
        );
        const state = await writer.queryUpload({ digest: big.digest });
        expect(state.exists).toBe(false);
        expect(Number(state.committedOffset)).toBeGreaterThan(0);
        expect(Number(state.committedOffset) % MIB).toBe(0);
        // An admin frees the space; the store serves on.
        const admin = store.client(await signer.token({ scope: "image:admin" }));
        const gc = await admin.collectGarbage({ gracePeriod: {} });
        expect(Number(gc.tempFilesDeleted)).toBe(1);
        const fits = randomBlob(2 * MIB);
        await uploadBlob(writer, { digest: fits.digest, size: fits.size, source: pausingSource(fits.data, Infinity).source });
      } finally {
        await store.stop();
      }
    });
  });
});
