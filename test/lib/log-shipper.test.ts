import { randomBytes } from "node:crypto";
import { createServer as createNetServer } from "node:net";
import { readdir } from "node:fs/promises";
import { Readable } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { ReadEndReason } from "../../gen/treadmill/log/v1/log_service_pb.js";
import type { ServingComponent } from "../../lib/component.js";
import { LogShipper } from "../../lib/log-shipper.js";
import { silentLogger } from "../../lib/logger.js";
import { logClient, makeKeys, readAll, startLogServer, tempDir, type Keys, type TestClient } from "../stores/log/helpers.js";

let keys: Keys;
let dirs: { path: string; remove(): Promise<void> }[];
let servers: ServingComponent[];
let clients: TestClient[];

/** A port nothing listens on (bound, read, released). */
async function deadPort(): Promise<number> {
  const s = createNetServer();
  await new Promise<void>((resolve) => s.listen(0, "127.0.0.1", resolve));
  const port = (s.address() as { port: number }).port;
  await new Promise((resolve) => s.close(resolve));
  return port;
}

beforeAll(async () => {
  keys = await makeKeys();
  dirs = await Promise.all([tempDir(), tempDir(), tempDir("treadmill-spill-")]);
  servers = await Promise.all([startLogServer(dirs[0].path, keys), startLogServer(dirs[1].path, keys)]);
  clients = servers.map((s) => logClient(s.address().url));
});

afterAll(async () => {
  clients.forEach((c) => c.close());
  await Promise.all(servers.map((s) => s.stop()));
  await Promise.all(dirs.map((d) => d.remove()));
});

describe("LogShipper", () => {
  it("replicates every channel byte for byte to every server and closes them", async () => {
    const jobId = "ship-both";
    const shipper = new LogShipper({
      jobId,
      attempt: 1,
      servers: servers.map((s) => ({ url: s.address().url })),
      token: await keys.token({ scope: "log:write", job: jobId }),
      spillDir: dirs[2].path,
      logger: silentLogger(),
      windowFrames: 4,
      spillFileBytes: 64 * 1024,
    });
    const binary = randomBytes(400_000);
    const console = shipper.channel("console");
    for (let off = 0; off < binary.length; off += 3001) console.write(binary.subarray(off, off + 3001));
    const lines = Array.from({ length: 2000 }, (_, i) => `stdout line ${i}\n`);
    await shipper.channel("stdout").pipeFrom(Readable.from(lines));
    shipper.channel("stderr").write("one line on stderr\n");
    const report = await shipper.finish();
    expect(report.complete).toBe(true);
    expect(report.servers.map((s) => s.complete)).toEqual([true, true]);
    const token = await keys.token({ scope: "log:read", job: jobId });
    for (const { client } of clients) {
      const c = await readAll(client, token, { jobId, channel: "console" });
      expect(c.data.equals(binary)).toBe(true);
      expect(c.end?.reason).toBe(ReadEndReason.CHANNEL_CLOSED);
      // Frames close at 16 KiB.
      expect(Math.max(...c.frames.map((f) => f.data.length))).toBe(16384);
      expect((await readAll(client, token, { jobId, channel: "stdout" })).data.toString()).toBe(lines.join(""));
      expect((await readAll(client, token, { jobId, channel: "stderr" })).data.toString()).toBe("one line on stderr\n");
    }
    expect(report.servers[0].ackedSeq.console).toBe(Math.ceil(binary.length / 16384));
    // Nothing is left in the spill.
    expect((await readdir(dirs[2].path)).filter((f) => f.startsWith(jobId))).toEqual([]);
  });

  it("keeps working with one server down for the whole job and reports the degraded copy", async () => {
    const jobId = "ship-degraded";
    const down = `http://127.0.0.1:${await deadPort()}`;
    const shipper = new LogShipper({
      jobId,
      attempt: 1,
      servers: [{ url: servers[0].address().url }, { url: down }],
      token: await keys.token({ scope: "log:write", job: jobId }),
      spillDir: dirs[2].path,
      logger: silentLogger(),
      reconnect: { initialMs: 20, maxMs: 200 },
      finishTimeoutMs: 1500,
      memoryBytes: 32 * 1024,
      spillFileBytes: 32 * 1024,
    });
    const produced = randomBytes(300_000);
    for (let off = 0; off < produced.length; off += 10_000) shipper.channel("console").write(produced.subarray(off, off + 10_000));
    const report = await shipper.finish();
    expect(report.complete).toBe(false);
    expect(report.servers[0]).toMatchObject({ url: servers[0].address().url, complete: true });
    expect(report.servers[1]).toMatchObject({ url: down, complete: false, ackedSeq: { console: 0 } });
    expect(report.servers[1].problem).toMatch(/ECONNREFUSED|unavailable/i);
    const c = await readAll(clients[0].client, await keys.token({ scope: "log:read", job: jobId }), { jobId, channel: "console" });
    expect(c.data.equals(produced)).toBe(true);
    expect(c.end?.reason).toBe(ReadEndReason.CHANNEL_CLOSED);
    expect((await readdir(dirs[2].path)).filter((f) => f.startsWith(jobId))).toEqual([]);
  });

  it("refuses bad channel names and writes after finish", async () => {
    const shipper = new LogShipper({
      jobId: "ship-names",
      attempt: 1,
      servers: [{ url: servers[0].address().url }],
      token: await keys.token({ scope: "log:write", job: "ship-names" }),
      spillDir: dirs[2].path,
      logger: silentLogger(),
    });
    expect(() => shipper.channel("Bad/Name")).toThrow(/channel name/);
    const ch = shipper.channel("stdout");
    ch.write("x");
    const report = await shipper.finish();
    expect(report.complete).toBe(true);
    expect(() => ch.write("late")).toThrow(/finished/);
  });
});
