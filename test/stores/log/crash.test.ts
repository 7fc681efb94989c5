// A log server as a real child process, killed with SIGKILL in the middle of
// a job and restarted on the same data directory and port: the writer resends
// what was not acknowledged and a follower resumes from its last seq.
import { createHash, randomBytes } from "node:crypto";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { ReadEndReason } from "../../../gen/treadmill/log/v1/log_service_pb.js";
import { LogShipper } from "../../../supervisor/log-shipper.js";
import { silentLogger } from "../../../lib/logger.js";
import { startProcess, type RunningProcess } from "../../support/process.js";
import { auth, logClient, makeKeys, readAll, tempDir, within, type Keys } from "./helpers.js";
import { freePort } from "../../support/net.js";

const BIN = new URL("../../../bin/treadmill-log-server.js", import.meta.url).pathname;

let keys: Keys;
let dir: { path: string; remove(): Promise<void> };
let port: number;
let keysFile: string;
let child: RunningProcess | undefined;


async function startServer(): Promise<RunningProcess> {
  const proc = startProcess(BIN, [
    "--port",
    String(port),
    "--data-dir",
    join(dir.path, "data"),
    "--signing-keys-file",
    keysFile,
    "--log-level",
    "info",
    "--grace-ms",
    "1000",
  ]);
  await proc.waitForLine(/log server ready/, 30000);
  return proc;
}

beforeAll(async () => {
  keys = await makeKeys();
  dir = await tempDir();
  port = await freePort();
  keysFile = join(dir.path, "jwks.json");
  await keys.writeFile(keysFile);
});

afterAll(async () => {
  if (child && child.child.exitCode === null && child.child.signalCode === null) {
    child.child.kill("SIGTERM");
    await child.exited;
  }
  await dir.remove();
});

describe("a log server killed mid-job", () => {
  it("ends with exactly the writer's log; the follower resumes from its last seq", async () => {
    const jobId = "crash-job";
    const url = `http://127.0.0.1:${port}`;
    child = await startServer();

    // A follower that reconnects after errors, from the seq after the last one it got.
    const reader = logClient(url);
    const readToken = await keys.token({ scope: "log:read", job: jobId });
    const followed: Buffer[] = [];
    const seqs: number[] = [];
    let reconnects = 0;
    let endReason: ReadEndReason | undefined;
    const following = (async () => {
      while (endReason === undefined) {
        try {
          const from = seqs.length === 0 ? 1 : seqs[seqs.length - 1] + 1;
          for await (const r of reader.client.read(
            { jobId, channel: "console", follow: true, start: { case: "fromSeq", value: BigInt(from) } },
            auth(readToken),
          )) {
            if (r.payload.case === "frame") {
              seqs.push(Number(r.payload.value.seq));
              followed.push(Buffer.from(r.payload.value.data));
            } else if (r.payload.case === "end") {
              endReason = r.payload.value.reason;
            }
          }
        } catch {
          reconnects++;
          await new Promise((resolve) => setTimeout(resolve, 100)); // retry delay, not a wait for an event
        }
      }
    })();

    const shipper = new LogShipper({
      jobId,
      attempt: 1,
      servers: [{ url }],
      token: await keys.token({ scope: "log:write", job: jobId }),
      spillDir: join(dir.path, "spill"),
      logger: silentLogger(),
      reconnect: { initialMs: 50, maxMs: 500 },
      finishTimeoutMs: 60000,
    });
    const produced: Buffer[] = [];
    const write = (bytes: Buffer) => {
      produced.push(bytes);
      shipper.channel("console").write(bytes);
    };
    const pace = () => new Promise((resolve) => setImmediate(resolve));
    for (let i = 0; i < 200; i++) {
      write(randomBytes(1 + ((i * 7919) % 5000)));
      if (i % 10 === 0) await pace();
    }
    // Wait until the follower has seen something, so the kill interrupts a live job.
    await within(
      (async () => {
        while (followed.length === 0) await new Promise((resolve) => setTimeout(resolve, 20));
      })(),
      "the first followed frame",
      30000,
    );
    for (let i = 0; i < 50; i++) write(randomBytes(3000));
    child.child.kill("SIGKILL");
    expect(await child.exited).toBe("SIGKILL");
    // The job goes on while the server is down.
    for (let i = 0; i < 100; i++) {
      write(randomBytes(1 + ((i * 104729) % 7000)));
      if (i % 10 === 0) await pace();
    }
    child = await startServer();
    for (let i = 0; i < 100; i++) {
      write(randomBytes(2000));
      if (i % 10 === 0) await pace();
    }
    const report = await shipper.finish();
    expect(report.complete).toBe(true);

    const all = Buffer.concat(produced);
    const stored = await readAll(reader.client, readToken, { jobId, channel: "console" });
    expect(stored.data.length).toBe(all.length);
    expect(createHash("sha256").update(stored.data).digest("hex")).toBe(createHash("sha256").update(all).digest("hex"));
    expect(stored.frames.map((f) => f.seq)).toEqual(stored.frames.map((_, i) => i + 1));

    await within(following, "the follower's end", 30000);
    expect(endReason).toBe(ReadEndReason.CHANNEL_CLOSED);
    expect(reconnects).toBeGreaterThan(0);
    expect(seqs).toEqual(seqs.map((_, i) => i + 1));
    expect(Buffer.concat(followed).equals(all)).toBe(true);
    reader.close();

    child.child.kill("SIGTERM");
    expect(await child.exited).toBe(0);
  });
});
