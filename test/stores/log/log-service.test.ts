import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { AppendRejectionCode, ChannelState, ReadEndReason } from "../../../gen/treadmill/log/v1/log_service_pb.js";
import type { ServingComponent } from "../../../lib/component.js";
import { AppendStream, auth, logClient, makeKeys, readAll, startLogServer, tempDir, within, type Keys, type TestClient } from "./helpers.js";

let keys: Keys;
let dir: { path: string; remove(): Promise<void> };
let server: ServingComponent;
let grpc: TestClient;
let jobCounter = 0;
const newJob = () => `job-${process.pid}-${++jobCounter}`;
const writeToken = (job: string) => keys.token({ scope: "log:write", job });
const readToken = (job: string) => keys.token({ scope: "log:read", job });

async function codeOf(promise: Promise<unknown>): Promise<Code | undefined> {
  try {
    await promise;
    return undefined;
  } catch (err) {
    return ConnectError.from(err).code;
  }
}

async function drain(iterable: AsyncIterable<unknown>): Promise<void> {
  for await (const _ of iterable) {
    // nothing
  }
}

beforeAll(async () => {
  keys = await makeKeys();
  dir = await tempDir();
  server = await startLogServer(dir.path, keys, { jobSizeCapBytes: 300_000 });
  grpc = logClient(server.address().url);
});

afterAll(async () => {
  grpc.close();
  await server.stop();
  await dir.remove();
});

describe("append and read", () => {
  it("round-trips random binary and text logs byte for byte", async () => {
    const job = newJob();
    const binary = randomBytes(200_000);
    const text = Buffer.from(Array.from({ length: 3000 }, (_, i) => `line ${i}: héllo wörld ✓\n`).join(""));
    const stream = new AppendStream(grpc.client, await writeToken(job), { jobId: job });
    const welcome = await stream.next();
    expect(welcome.case).toBe("welcome");
    const frames = (buf: Buffer, size: number) => Array.from({ length: Math.ceil(buf.length / size) }, (_, i) => buf.subarray(i * size, (i + 1) * size));
    const bin = frames(binary, 16384);
    const txt = frames(text, 1000);
    bin.forEach((f, i) => stream.frame("console", i + 1, f));
    txt.forEach((f, i) => stream.frame("stdout", i + 1, f));
    const seen = await stream.finish();
    const acks = seen.filter((p) => p.case === "ack");
    expect(seen.filter((p) => p.case !== "ack")).toEqual([]);
    const last = (ch: string) => Math.max(...acks.filter((a) => a.value.channel === ch).map((a) => Number(a.value.seq)));
    expect(last("console")).toBe(bin.length);
    expect(last("stdout")).toBe(txt.length);

    const token = await readToken(job);
    const console = await readAll(grpc.client, token, { jobId: job, channel: "console" });
    expect(console.data.equals(binary)).toBe(true);
    expect(console.end?.reason).toBe(ReadEndReason.END_OF_DATA);
    expect(Number(console.end?.nextSeq)).toBe(bin.length + 1);
    expect(Number(console.end?.nextOffset)).toBe(binary.length);
    const stdout = await readAll(grpc.client, token, { jobId: job, channel: "stdout" });
    expect(stdout.data.equals(text)).toBe(true);

    // From a seq, from an offset (the first frame cut there), and the tail.
    const fromSeq = await readAll(grpc.client, token, { jobId: job, channel: "console", fromSeq: 3 });
    expect(fromSeq.frames[0].seq).toBe(3);
    expect(fromSeq.data.equals(binary.subarray(2 * 16384))).toBe(true);
    const fromOffset = await readAll(grpc.client, token, { jobId: job, channel: "console", fromOffset: 50_001 });
    expect(fromOffset.frames[0].offset).toBe(50_001);
    expect(fromOffset.data.equals(binary.subarray(50_001))).toBe(true);
    const tail = await readAll(grpc.client, token, { jobId: job, channel: "stdout", lastBytes: 2500 });
    expect(tail.data.equals(text.subarray(text.length - 2500))).toBe(true);
    expect(tail.frames[0].offset).toBe(text.length - 2500);

    const list = await grpc.client.listChannels({ jobId: job }, auth(token));
    expect(list.channels.map((c) => [c.channel, Number(c.sizeBytes), Number(c.frameCount), c.state])).toEqual([
      ["console", binary.length, bin.length, ChannelState.OPEN],
      ["stdout", text.length, txt.length, ChannelState.OPEN],
    ]);
  });

  it("acknowledges a resent frame again without storing it twice", async () => {
    const job = newJob();
    const token = await writeToken(job);
    const first = new AppendStream(grpc.client, token, { jobId: job });
    await first.next();
    for (let seq = 1; seq <= 5; seq++) first.frame("stdout", seq, `frame ${seq}\n`);
    await first.untilAck("stdout", 5);
    await first.finish();

    // A reconnecting writer resends 3..7: 3..5 are duplicates.
    const second = new AppendStream(grpc.client, token, { jobId: job });
    const welcome = await second.next();
    expect(welcome.case === "welcome" && welcome.value.channels.map((c) => [c.channel, Number(c.durableSeq)])).toEqual([["stdout", 5]]);
    for (let seq = 3; seq <= 7; seq++) second.frame("stdout", seq, `frame ${seq}\n`);
    const others = await second.untilAck("stdout", 7);
    expect(others).toEqual([]);
    // The same frame once more after everything: acknowledged again.
    second.frame("stdout", 2, "frame 2\n");
    expect(await second.next()).toMatchObject({ case: "ack", value: { channel: "stdout", seq: 7n } });
    await second.finish();

    const { data, frames } = await readAll(grpc.client, await readToken(job), { jobId: job, channel: "stdout" });
    expect(frames.map((f) => f.seq)).toEqual([1, 2, 3, 4, 5, 6, 7]);
    expect(data.toString()).toBe([1, 2, 3, 4, 5, 6, 7].map((n) => `frame ${n}\n`).join(""));
  });

  it("answers a gap with the expected seq and drops the frame", async () => {
    const job = newJob();
    const stream = new AppendStream(grpc.client, await writeToken(job), { jobId: job });
    await stream.next();
    stream.frame("stderr", 2, "too early");
    expect(await stream.next()).toMatchObject({ case: "expect", value: { channel: "stderr", expectedSeq: 1n } });
    stream.frame("stderr", 1, "a");
    stream.frame("stderr", 2, "b");
    await stream.untilAck("stderr", 2);
    stream.frame("stderr", 5, "gap");
    stream.frame("stderr", 6, "gap");
    expect(await stream.next()).toMatchObject({ case: "expect", value: { channel: "stderr", expectedSeq: 3n } });
    stream.frame("stderr", 3, "c");
    await stream.untilAck("stderr", 3);
    await stream.finish();
    const { data } = await readAll(grpc.client, await readToken(job), { jobId: job, channel: "stderr" });
    expect(data.toString()).toBe("abc");
  });

  it("rejects oversized, empty and misnamed frames and keeps the stream", async () => {
    const job = newJob();
    const stream = new AppendStream(grpc.client, await writeToken(job), { jobId: job });
    await stream.next();
    stream.frame("stdout", 1, Buffer.alloc(65537, 1));
    expect(await stream.next()).toMatchObject({
      case: "rejection",
      value: { channel: "stdout", seq: 1n, code: AppendRejectionCode.FRAME_TOO_LARGE },
    });
    stream.frame("stdout", 1, Buffer.alloc(0));
    expect(await stream.next()).toMatchObject({ case: "rejection", value: { code: AppendRejectionCode.INVALID_FRAME } });
    stream.frame("Bad Name", 1, "x");
    const bad = await stream.next();
    expect(bad).toMatchObject({ case: "rejection", value: { code: AppendRejectionCode.INVALID_FRAME } });
    expect(bad.case === "rejection" && bad.value.message).toMatch(/frame\.channel/);
    stream.frame("stdout", 1, Buffer.alloc(65536, 7));
    await stream.untilAck("stdout", 1);
    await stream.finish();
    const { data } = await readAll(grpc.client, await readToken(job), { jobId: job, channel: "stdout" });
    expect(data.equals(Buffer.alloc(65536, 7))).toBe(true);
  });

  it("refuses a stream that does not start with a valid hello", async () => {
    const job = newJob();
    const token = await writeToken(job);
    // A stream whose first message is a frame.
    const raw = grpc.client.append(
      (async function* () {
        yield { payload: { case: "frame" as const, value: { channel: "stdout", seq: 1n, data: Buffer.from("x") } } };
      })(),
      auth(token),
    );
    expect(await codeOf(drain(raw))).toBe(Code.InvalidArgument);
    const v2 = new AppendStream(grpc.client, token, { jobId: job, major: 2 });
    expect(await codeOf(v2.next())).toBe(Code.FailedPrecondition);
    const badAttempt = new AppendStream(grpc.client, token, { jobId: job, attempt: 0 });
    expect(await codeOf(badAttempt.next())).toBe(Code.InvalidArgument);
  });

  it("lets a newer stream of the same attempt take over (the older ends aborted)", async () => {
    const job = newJob();
    const token = await writeToken(job);
    const older = new AppendStream(grpc.client, token, { jobId: job });
    await older.next();
    older.frame("stdout", 1, "one");
    await older.untilAck("stdout", 1);
    const newer = new AppendStream(grpc.client, token, { jobId: job });
    await newer.next();
    expect(await codeOf(older.next())).toBe(Code.Aborted);
    newer.frame("stdout", 2, "two");
    await newer.untilAck("stdout", 2);
    await newer.finish();
  });

  it("closes channels: further frames are refused, readers see the end", async () => {
    const job = newJob();
    const token = await writeToken(job);
    const stream = new AppendStream(grpc.client, token, { jobId: job });
    await stream.next();
    stream.frame("console", 1, "boot\n");
    stream.frame("stdout", 1, "hi\n");
    await stream.untilAck("stdout", 1);
    const closed = await grpc.client.closeChannel({ jobId: job, attempt: 1, channel: "" }, auth(token));
    expect(closed.channels.map((c) => [c.channel, Number(c.durableSeq), c.closed])).toEqual([
      ["console", 1, true],
      ["stdout", 1, true],
    ]);
    // Idempotent.
    await grpc.client.closeChannel({ jobId: job, attempt: 1, channel: "stdout" }, auth(token));
    stream.frame("stdout", 2, "late");
    expect(await stream.next()).toMatchObject({ case: "rejection", value: { code: AppendRejectionCode.CHANNEL_CLOSED } });
    await stream.finish();
    const read = await readAll(grpc.client, await readToken(job), { jobId: job, channel: "console" });
    expect(read.end?.reason).toBe(ReadEndReason.CHANNEL_CLOSED);
    expect(read.data.toString()).toBe("boot\n");
    expect(await codeOf(grpc.client.closeChannel({ jobId: job, attempt: 1, channel: "nope" }, auth(token)))).toBe(Code.NotFound);
  });

  it("stops a job at its size cap and says so to readers", async () => {
    const job = newJob();
    const stream = new AppendStream(grpc.client, await writeToken(job), { jobId: job });
    const welcome = await stream.next();
    expect(welcome.case === "welcome" && Number(welcome.value.remainingBytes)).toBe(300_000);
    const frame = Buffer.alloc(60_000, 0x61);
    for (let seq = 1; seq <= 6; seq++) stream.frame("stdout", seq, frame);
    const others = await stream.untilAck("stdout", 5);
    const rejection = others.length > 0 ? others[0] : await stream.next();
    expect(rejection).toMatchObject({ case: "rejection", value: { seq: 6n, code: AppendRejectionCode.SIZE_CAP } });
    stream.frame("stderr", 1, "more");
    expect(await stream.next()).toMatchObject({ case: "rejection", value: { channel: "stderr", code: AppendRejectionCode.SIZE_CAP } });
    await stream.finish();
    const read = await readAll(grpc.client, await readToken(job), { jobId: job, channel: "stdout" });
    expect(read.data.length).toBe(300_000);
    expect(read.end?.reason).toBe(ReadEndReason.SIZE_CAP);
    expect(read.end?.message).toMatch(/size cap of 300000 bytes/);
    const list = await grpc.client.listChannels({ jobId: job }, auth(await readToken(job)));
    expect(list.channels[0].state).toBe(ChannelState.TRUNCATED);
  });
});

describe("read", () => {
  it("follows a channel over Connect on HTTP/1.1 until it is closed", async () => {
    const job = newJob();
    const h1 = logClient(server.address().url, "connect-h1");
    try {
      const reader = h1.client.read({ jobId: job, channel: "console", follow: true }, auth(await readToken(job)));
      const received: string[] = [];
      let endReason: ReadEndReason | undefined;
      const reading = (async () => {
        for await (const res of reader) {
          if (res.payload.case === "frame") received.push(Buffer.from(res.payload.value.data).toString());
          else if (res.payload.case === "end") endReason = res.payload.value.reason;
        }
      })();
      // The channel does not exist yet: the reader waits for it.
      const token = await writeToken(job);
      const stream = new AppendStream(grpc.client, token, { jobId: job });
      await stream.next();
      for (let seq = 1; seq <= 3; seq++) {
        stream.frame("console", seq, `line ${seq}\n`);
        await stream.untilAck("console", seq);
        const want = seq;
        await within(
          (async () => {
            while (received.length < want) await new Promise((r) => setTimeout(r, 10));
          })(),
          `frame ${seq} at the follower`,
        );
      }
      await grpc.client.closeChannel({ jobId: job, attempt: 1, channel: "console" }, auth(token));
      await within(reading, "the follower's end");
      expect(received).toEqual(["line 1\n", "line 2\n", "line 3\n"]);
      expect(endReason).toBe(ReadEndReason.CHANNEL_CLOSED);
      await stream.finish();
    } finally {
      h1.close();
    }
  });

  it("answers bad requests with the right codes", async () => {
    const job = newJob();
    const token = await readToken(job);
    const read = (req: Parameters<typeof grpc.client.read>[0]) => drain(grpc.client.read(req, auth(token)));
    expect(await codeOf(read({ jobId: job, channel: "stdout" }))).toBe(Code.NotFound);
    expect(await codeOf(read({ jobId: job, channel: "Std Out" }))).toBe(Code.InvalidArgument);
    expect(await codeOf(read({ jobId: "", channel: "stdout" }))).toBe(Code.InvalidArgument);
    expect(await codeOf(read({ jobId: job, channel: "stdout", start: { case: "fromSeq", value: 0n } }))).toBe(Code.InvalidArgument);
    const w = new AppendStream(grpc.client, await writeToken(job), { jobId: job });
    await w.next();
    w.frame("stdout", 1, "x");
    await w.untilAck("stdout", 1);
    await w.finish();
    expect(await codeOf(read({ jobId: job, channel: "stdout", start: { case: "fromSeq", value: 5n } }))).toBe(Code.OutOfRange);
    expect(await codeOf(read({ jobId: job, channel: "stdout", start: { case: "fromOffset", value: 2n } }))).toBe(Code.OutOfRange);
  });
});

describe("authorization", () => {
  it("refuses readers and writers whose token is for another job or scope", async () => {
    const job = newJob();
    const w = new AppendStream(grpc.client, await writeToken(job), { jobId: job });
    await w.next();
    w.frame("stdout", 1, "secret output");
    await w.untilAck("stdout", 1);
    await w.finish();

    const other = await readToken("another-job");
    expect(await codeOf(drain(grpc.client.read({ jobId: job, channel: "stdout" }, auth(other))))).toBe(Code.PermissionDenied);
    expect(await codeOf(grpc.client.listChannels({ jobId: job }, auth(other)))).toBe(Code.PermissionDenied);
    expect(await codeOf(drain(grpc.client.read({ jobId: job, channel: "stdout" })))).toBe(Code.Unauthenticated);
    expect(await codeOf(drain(grpc.client.read({ jobId: job, channel: "stdout" }, auth("not.a.token"))))).toBe(Code.Unauthenticated);
    // A read token does not write; a write token for another job does not either.
    const withRead = new AppendStream(grpc.client, await readToken(job), { jobId: job });
    expect(await codeOf(withRead.next())).toBe(Code.PermissionDenied);
    const otherWrite = new AppendStream(grpc.client, await writeToken("another-job"), { jobId: job });
    expect(await codeOf(otherWrite.next())).toBe(Code.PermissionDenied);
    expect(await codeOf(grpc.client.closeChannel({ jobId: job, attempt: 1 }, auth(await readToken(job))))).toBe(Code.PermissionDenied);
    // Deleting needs log:admin.
    expect(await codeOf(grpc.client.deleteJobLogs({ jobId: job }, auth(await writeToken(job))))).toBe(Code.PermissionDenied);
    // An admin token reads any job.
    const admin = await keys.token({ scope: "log:admin" });
    const { data } = await readAll(grpc.client, admin, { jobId: job, channel: "stdout" });
    expect(data.toString()).toBe("secret output");
  });
});

describe("deletion", () => {
  it("deletes a job's logs and ends its followers", async () => {
    const job = newJob();
    const w = new AppendStream(grpc.client, await writeToken(job), { jobId: job });
    await w.next();
    w.frame("stdout", 1, Buffer.alloc(1000, 1));
    await w.untilAck("stdout", 1);
    const follower = grpc.client.read({ jobId: job, channel: "stdout", follow: true }, auth(await readToken(job)));
    const reasons: ReadEndReason[] = [];
    let frames = 0;
    const following = (async () => {
      for await (const r of follower) {
        if (r.payload.case === "frame") frames++;
        if (r.payload.case === "end") reasons.push(r.payload.value.reason);
      }
    })();
    await within(
      (async () => {
        while (frames < 1) await new Promise((r) => setTimeout(r, 10));
      })(),
      "the first frame",
    );
    const admin = await keys.token({ scope: "log:admin" });
    const { bytesFreed } = await grpc.client.deleteJobLogs({ jobId: job }, auth(admin));
    expect(Number(bytesFreed)).toBeGreaterThanOrEqual(1000);
    await within(following, "the follower's end");
    expect(reasons).toEqual([ReadEndReason.DELETED]);
    expect(await codeOf(w.next())).toBe(Code.Aborted);
    const list = await grpc.client.listChannels({ jobId: job }, auth(admin));
    expect(list.channels).toEqual([]);
    // Deleting nothing succeeds.
    expect(Number((await grpc.client.deleteJobLogs({ jobId: job }, auth(admin))).bytesFreed)).toBe(0);
  });
});
