import { appendFile, readFile, rm, stat, truncate, utimes } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { silentLogger } from "../../../lib/logger.js";
import { LogStore } from "../../../stores/log/log-store.js";
import { sweepRetention } from "../../../stores/log/retention.js";
import { HEADER_BYTES, encodeRecord } from "../../../stores/log/segment.js";
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
