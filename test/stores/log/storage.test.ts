import { appendFile, cp, open, readFile, readdir, rm, stat, truncate, utimes, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { silentLogger } from "../../../lib/logger.js";
import { LogStore } from "../../../stores/log/log-store.js";
import { sweepRetention } from "../../../stores/log/retention.js";
import { HEADER_BYTES, encodeRecord } from "../../../stores/log/segment.js";
import { decodeEntries } from "../../../stores/log/wal.js";
import { AppendStream, auth, logClient, makeKeys, readAll, startLogServer, tempDir, type Keys } from "./helpers.js";

let keys: Keys;
let dir: { path: string; remove(): Promise<void> };

beforeAll(async () => {
  keys = await makeKeys();
  dir = await tempDir();
});
afterAll(async () => {
  await dir.remove();
});

const frame = (seq: number) => Buffer.from(`frame ${seq} `.repeat(seq * 3));

/** Writes frames 1..n of `stdout` through a fresh server, then stops it. */
async function writeFrames(dataDir: string, job: string, n: number): Promise<void> {
  const server = await startLogServer(dataDir, keys);
  const { client, close } = logClient(server.address().url);
  try {
    const stream = new AppendStream(client, await keys.token({ scope: "log:write", job }), { jobId: job });
    await stream.next();
    for (let seq = 1; seq <= n; seq++) stream.frame("stdout", seq, frame(seq));
    await stream.untilAck("stdout", n);
    await stream.finish();
  } finally {
    close();
    await server.stop();
  }
}

/** Restarts a server on `dataDir` and reports what it holds for the job, then resends frames up to `upTo`. */
async function restartAndCheck(dataDir: string, job: string, expectDurable: number, upTo: number): Promise<Buffer> {
  const server = await startLogServer(dataDir, keys);
  const { client, close } = logClient(server.address().url);
  try {
    const stream = new AppendStream(client, await keys.token({ scope: "log:write", job }), { jobId: job });
    const welcome = await stream.next();
    expect(welcome.case === "welcome" && welcome.value.channels.map((c) => Number(c.durableSeq))).toEqual([expectDurable]);
    const before = await readAll(client, await keys.token({ scope: "log:read", job }), { jobId: job, channel: "stdout" });
    expect(before.frames.map((f) => f.seq)).toEqual(Array.from({ length: expectDurable }, (_, i) => i + 1));
    for (let seq = expectDurable + 1; seq <= upTo; seq++) stream.frame("stdout", seq, frame(seq));
    await stream.untilAck("stdout", upTo);
    await stream.finish();
    const after = await readAll(client, await keys.token({ scope: "log:read", job }), { jobId: job, channel: "stdout" });
    return after.data;
  } finally {
    close();
    await server.stop();
  }
}

const expected = (n: number) => Buffer.concat(Array.from({ length: n }, (_, i) => frame(i + 1)));

describe("recovery on restart", () => {
  it("cuts a record torn by a crash mid-write back to the last acknowledged frame", async () => {
    const job = "torn-write";
    await writeFrames(dir.path, job, 10);
    const seg = join(dir.path, "jobs", job, "1", "stdout.seg");
    // A crash while frame 11 was being written: its header and half its data.
    const torn = encodeRecord(11, Date.now() * 1000, frame(11));
    await appendFile(seg, torn.subarray(0, HEADER_BYTES + 7));
    const data = await restartAndCheck(dir.path, job, 10, 12);
    expect(data.equals(expected(12))).toBe(true);
    // The torn bytes are gone: the file holds exactly 12 records.
    expect((await stat(seg)).size).toBe(expected(12).length + 12 * HEADER_BYTES);
  });

  it("drops index entries whose records were cut off and rebuilds a lost index", async () => {
    const job = "cut-segment";
    await writeFrames(dir.path, job, 8);
    const seg = join(dir.path, "jobs", job, "1", "stdout.seg");
    // The segment lost the second half of frame 8 (the index still names it).
    await truncate(seg, (await stat(seg)).size - 5);
    expect(await restartAndCheck(dir.path, job, 7, 9).then((d) => d.equals(expected(9)))).toBe(true);

    // The index file lost entirely: rebuilt from the segment.
    await rm(join(dir.path, "jobs", job, "1", "stdout.idx"));
    expect(await restartAndCheck(dir.path, job, 9, 10).then((d) => d.equals(expected(10)))).toBe(true);
    expect((await readFile(join(dir.path, "jobs", job, "1", "stdout.idx"))).length).toBe(10 * 8);
  });

  it("keeps closed and truncated states across a restart", async () => {
    const job = "closed-state";
    await writeFrames(dir.path, job, 2);
    const server = await startLogServer(dir.path, keys);
    const { client, close } = logClient(server.address().url);
    try {
      await client.closeChannel({ jobId: job, attempt: 1 }, auth(await keys.token({ scope: "log:write", job })));
    } finally {
      close();
      await server.stop();
    }
    const again = await startLogServer(dir.path, keys);
    const c2 = logClient(again.address().url);
    try {
      const read = await readAll(c2.client, await keys.token({ scope: "log:read", job }), { jobId: job, channel: "stdout" });
      expect(read.end?.reason).toBe(2); // CHANNEL_CLOSED
      expect(read.data.equals(expected(2))).toBe(true);
    } finally {
      c2.close();
      await again.stop();
    }
  });
});

describe("write-ahead log", () => {
  /** Offers frames 1..n (one commit round each when `rounds`), waits until durable. */
  async function writeThrough(store: LogStore, jobId: string, n: number, size: (seq: number) => Buffer, rounds = false) {
    const job = await store.job(jobId);
    const channel = await job.createChannel(1, "stdout");
    for (let seq = channel.durableSeq + 1; seq <= n; seq++) {
      expect(channel.offer(seq, Date.now() * 1000, size(seq)).kind).toBe("accepted");
      if (rounds) await channel.settle();
    }
    await channel.settle();
    expect(channel.durableSeq).toBe(n);
  }

  /** What a fresh store on `dataDir` holds for the job's stdout. */
  async function contents(dataDir: string, jobId: string): Promise<{ frames: number; data: Buffer; walFiles: string[] }> {
    const store = new LogStore({ dataDir, jobSizeCapBytes: 0, logger: silentLogger() });
    await store.open();
    try {
      const walFiles = await readdir(join(dataDir, "wal"));
      const channel = (await store.job(jobId)).channel(1, "stdout")!;
      const parts: Uint8Array[] = [];
      for (let seq = 1; seq <= channel.durableSeq; ) {
        const frames = await channel.read(seq, 1 << 20);
        parts.push(...frames.map((f) => f.data));
        seq = frames.at(-1)!.seq + 1;
      }
      return { frames: channel.durableSeq, data: Buffer.concat(parts), walFiles };
    } finally {
      await store.close();
    }
  }

  const big = (seq: number) => Buffer.alloc(10_000, seq);
  const bigs = (n: number) => Buffer.concat(Array.from({ length: n }, (_, i) => big(i + 1)));

  /**
   * A store on a fresh directory, for `test(store, dir, crash)`; `crash()`
   * copies the directory as a crash now would leave it and returns the copy.
   */
  async function withStore(
    walFileBytes: number | undefined,
    test: (store: LogStore, dir: string, crash: () => Promise<string>) => Promise<void>,
    walZeroFill = false,
  ): Promise<void> {
    const data = await tempDir();
    const copy = `${data.path}-crash`;
    // Zero-filled spares (on by default) roll the log early, at a moment of
    // their own: the tests that count on where files roll leave them out.
    const store = new LogStore({ dataDir: data.path, jobSizeCapBytes: 0, logger: silentLogger(), walFileBytes, walZeroFill });
    await store.open();
    let stopped = false;
    try {
      await test(store, data.path, async () => {
        await cp(data.path, copy, { recursive: true });
        return copy;
      });
      await store.close();
      stopped = true;
      // A clean stop fsyncs the segments and leaves no log behind.
      expect(await readdir(join(data.path, "wal"))).toEqual([]);
    } finally {
      if (!stopped) await store.close();
      await rm(copy, { recursive: true, force: true });
      await data.remove();
    }
  }

  it("brings back acknowledged frames a crash kept out of the segment", async () => {
    await withStore(undefined, async (store, _dir, crash) => {
      await writeThrough(store, "crashed", 3, frame);
      // The segment is written without an fsync: a crash may lose its last
      // pages, which only the write-ahead log holds durably.
      const copy = await crash();
      const seg = join(copy, "jobs", "crashed", "1", "stdout.seg");
      await truncate(seg, expected(1).length + HEADER_BYTES);
      const after = await contents(copy, "crashed");
      expect(after.frames).toBe(3);
      expect(after.data.equals(expected(3))).toBe(true);
      // Replayed into the segment, fsynced, and the old log file deleted.
      expect(after.walFiles).toHaveLength(1);
      expect((await stat(seg)).size).toBe(expected(3).length + 3 * HEADER_BYTES);
    });
  });

  it("repairs segment bytes lost in the middle, and rolls and checkpoints its files", async () => {
    await withStore(30_000, async (store, dir, crash) => {
      await writeThrough(store, "rolled", 12, big, true);
      await store.wal.checkpointed();
      // The log rolled every ~3 frames; checkpointed files are written over
      // again: the current one, and at most three spares, are left.
      const files = await readdir(join(dir, "wal"));
      expect(files.filter((f) => /^\d{16}\.wal$/.test(f))).toEqual(["0000000000000005.wal"]);
      expect(files.filter((f) => f.startsWith("spare-")).length).toBeLessThanOrEqual(3);
      await writeThrough(store, "rolled", 14, big, true);
      const copy = await crash();
      // Pages of frame 13 never reached the disk, later ones did.
      const seg = await open(join(copy, "jobs", "rolled", "1", "stdout.seg"), "r+");
      await seg.write(Buffer.alloc(5000), 0, 5000, 12 * (10_000 + HEADER_BYTES) + 100);
      await seg.close();
      const after = await contents(copy, "rolled");
      expect(after.frames).toBe(14);
      expect(after.data.equals(bigs(14))).toBe(true);
    });
  });

  it("replays only what a recycled file got in its current use", async () => {
    await withStore(30_000, async (store, dir, crash) => {
      await writeThrough(store, "early", 12, big, true);
      // Checkpoints done, there are spares: the next roll takes one.
      await store.wal.checkpointed();
      // The highest number: a rolled file keeps its own until its checkpoint ends.
      const currentFile = async () => (await readdir(join(dir, "wal"))).filter((f) => /^\d{16}\.wal$/.test(f)).sort().at(-1);
      const before = await currentFile();
      let early = 12;
      while ((await currentFile()) === before) await writeThrough(store, "early", ++early, big, true);
      // The new current file is written over from its start: a few small
      // frames of another job, then entries of "early" left from its earlier use.
      await writeThrough(store, "late", 3, frame);
      await store.wal.checkpointed();
      const copy = await crash();
      const current = (await readdir(join(copy, "wal"))).filter((f) => /^\d{16}\.wal$/.test(f));
      expect(current).toHaveLength(1);
      const generation = Number(current[0].slice(0, 16));
      const file = await readFile(join(copy, "wal", current[0]));
      const entries = [...decodeEntries(file, generation)];
      expect(entries.map((e) => e.jobId)).toEqual(["late"]);
      // Past them, well-formed entries of "early" from an earlier generation.
      const end = entries[0].records.byteOffset - file.byteOffset + entries[0].records.length;
      const at = file.indexOf("TMLX", end);
      const leftOver = Array.from({ length: generation - 1 }, (_, g) => [...decodeEntries(file.subarray(at), g + 1)]).flat();
      expect(leftOver.length).toBeGreaterThan(0);
      expect(new Set(leftOver.map((e) => e.jobId))).toEqual(new Set(["early"]));
      expect((await contents(copy, "late")).data.equals(expected(3))).toBe(true);
      expect((await contents(copy, "early")).data.equals(bigs(early))).toBe(true);
    });
  });

  it("ends a replay at an entry whose records are not its own (torn, with other records left in its place)", async () => {
    await withStore(undefined, async (store, _dir, crash) => {
      await writeThrough(store, "x", 1, big);
      await writeThrough(store, "y", 1, big);
      const copy = await crash();
      const walPath = join(copy, "wal", "0000000000000001.wal");
      const wal = await readFile(walPath);
      const [x, y] = [...decodeEntries(wal, 1)];
      expect([x.jobId, y.jobId]).toEqual(["x", "y"]);
      // y's entry header reached the disk, its records did not, and the
      // blocks hold x's record (well-formed, seq 1, the same length) instead.
      x.records.copy(wal, y.records.byteOffset - wal.byteOffset);
      await writeFile(walPath, wal);
      await rm(join(copy, "jobs", "y", "1", "stdout.seg"));
      await rm(join(copy, "jobs", "y", "1", "stdout.idx"));
      await writeFile(join(copy, "jobs", "y", "1", "stdout.seg"), "");
      expect([...decodeEntries(wal, 1)].map((e) => e.jobId)).toEqual(["x"]);
      const after = await contents(copy, "y");
      expect(after.frames).toBe(0);
      expect((await contents(copy, "x")).data.equals(big(1))).toBe(true);
    });
  });

  it("rolls a log in steady use to a zero-filled file, written over rather than grown", async () => {
    await withStore(
      160_000,
      async (store, dir, crash) => {
        // Past an eighth of the first file, a zero-filled spare is made; the
        // log rolls to it at the next pause between rounds.
        await writeThrough(store, "steady", 3, big, true);
        await store.wal.checkpointed();
        await writeThrough(store, "steady", 4, big, true);
        await store.wal.checkpointed();
        const files = (await readdir(join(dir, "wal"))).filter((f) => /^\d{16}\.wal$/.test(f));
        expect(files).toEqual(["0000000000000002.wal"]);
        // Its full size is there from the start: zeros past what it got.
        expect((await stat(join(dir, "wal", files[0]))).size).toBe(160_000);
        await writeThrough(store, "steady", 6, big, true);
        const copy = await crash();
        // Frames 5 and 6 are in the zero-filled file only; the checkpoint of
        // the first file made frames 1 to 4 durable in the segment.
        await truncate(join(copy, "jobs", "steady", "1", "stdout.seg"), 4 * (10_000 + HEADER_BYTES));
        const after = await contents(copy, "steady");
        expect(after.frames).toBe(6);
        expect(after.data.equals(bigs(6))).toBe(true);
      },
      true,
    );
  });

  it("replays nothing of a deleted job", async () => {
    await withStore(undefined, async (store, _dir, crash) => {
      await writeThrough(store, "kept", 2, frame);
      await writeThrough(store, "gone", 2, frame);
      await store.deleteJob("gone", "test");
      const copy = await crash();
      const again = new LogStore({ dataDir: copy, jobSizeCapBytes: 0, logger: silentLogger() });
      await again.open();
      try {
        expect((await again.job("gone")).allChannels()).toHaveLength(0);
        expect((await again.jobsOnDisk()).map((j) => j.jobId)).toEqual(["kept"]);
      } finally {
        await again.close();
      }
      expect((await contents(copy, "kept")).data.equals(expected(2))).toBe(true);
    });
  });
});

describe("retention", () => {
  it("deletes only finalized jobs, oldest first, by age and by total size", async () => {
    const data = await tempDir();
    const store = new LogStore({ dataDir: data.path, jobSizeCapBytes: 0, logger: silentLogger() });
    await store.open();
    try {
      const write = async (jobId: string, bytes: number, close: boolean) => {
        const job = await store.job(jobId);
        const channel = await job.createChannel(1, "stdout");
        expect(channel.offer(1, Date.now() * 1000, Buffer.alloc(bytes, 1)).kind).toBe("accepted");
        await channel.settle();
        if (close) await channel.close();
      };
      await write("running-old", 4000, false);
      await write("done-old", 4000, true);
      await write("done-mid", 4000, true);
      await write("done-new", 4000, true);
      // Make the order of age unambiguous.
      const age = async (jobId: string, secondsAgo: number) => {
        const t = new Date(Date.now() - secondsAgo * 1000);
        for (const f of ["stdout.seg", "stdout.idx", "stdout.closed"]) {
          await utimes(join(data.path, "jobs", jobId, "1", f), t, t).catch(() => undefined);
        }
      };
      await age("running-old", 400);
      await age("done-old", 300);
      await age("done-mid", 200);
      await age("done-new", 100);

      // Size: ~16 KB on disk, cap 10 KB: the two oldest finalized jobs go,
      // the running one stays however old and big.
      const bySize = await sweepRetention(store, { maxAgeMs: 0, maxTotalBytes: 10_000 });
      expect(bySize.deleted).toEqual(["done-old", "done-mid"]);
      expect(bySize.bytesFreed).toBeGreaterThan(8000);

      // Age: everything finalized older than 50 s goes; the running job stays.
      const byAge = await sweepRetention(store, { maxAgeMs: 50_000, maxTotalBytes: 0 });
      expect(byAge.deleted).toEqual(["done-new"]);
      const left = (await store.jobsOnDisk()).map((j) => j.jobId);
      expect(left).toEqual(["running-old"]);
    } finally {
      await store.close();
      await data.remove();
    }
  });
});
