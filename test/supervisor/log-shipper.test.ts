import { randomBytes } from "node:crypto";
import { createServer as createNetServer } from "node:net";
import { readdir, readFile, stat } from "node:fs/promises";
import { Readable } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { ReadEndReason } from "../../gen/treadmill/log/v1/log_service_pb.js";
import type { ServingComponent } from "../../lib/component.js";
import { LogShipper, SpillBudget, type LossEvent } from "../../supervisor/log-shipper.js";
import { silentLogger } from "../../lib/logger.js";
import { logClient, makeKeys, readAll, startLogServer, tempDir, type Keys, type TestClient } from "../stores/log/helpers.js";
import { waitUntil } from "../support/wait.js";

let keys: Keys;
let dirs: { path: string; remove(): Promise<void> }[];
let servers: ServingComponent[];
let clients: TestClient[];
/** Servers' directories and clients of single tests, released after all. */
const extra: ({ remove(): Promise<void> } | { close(): void })[] = [];
function tracked<T extends { remove(): Promise<void> } | { close(): void }>(thing: T): T {
  extra.push(thing);
  return thing;
}

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
  for (const x of extra) if ("close" in x) x.close();
  await Promise.all(dirs.map((d) => d.remove()));
  await Promise.all(extra.map((x) => ("remove" in x ? x.remove() : undefined)));
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

  it("keeps the spill while a server stays down past the flush wait, and delivers everything once it is back", async () => {
    const jobId = "ship-outage";
    const port = await deadPort();
    const down = `http://127.0.0.1:${port}`;
    const shipper = new LogShipper({
      jobId,
      attempt: 1,
      servers: [{ url: servers[0].address().url }, { url: down }],
      token: await keys.token({ scope: "log:write", job: jobId }),
      spillDir: dirs[2].path,
      logger: silentLogger(),
      reconnect: { initialMs: 20, maxMs: 200 },
      memoryBytes: 32 * 1024,
      spillFileBytes: 32 * 1024,
    });
    const produced = randomBytes(300_000);
    for (let off = 0; off < produced.length; off += 10_000) shipper.channel("console").write(produced.subarray(off, off + 10_000));
    // Longer than a flush wait: the old shipper gave up here and deleted its spill.
    const waited = await shipper.settle(1500);
    expect(waited).toMatchObject({ status: "shipping", complete: false, settled: false, bytesLost: 0 });
    expect(waited.servers[0]).toMatchObject({ url: servers[0].address().url, complete: true });
    expect(waited.servers[1]).toMatchObject({ url: down, complete: false, ackedSeq: { console: 0 } });
    expect(waited.servers[1].problem).toMatch(/ECONNREFUSED|unavailable/i);
    expect(waited.problem).toContain(down);
    // The server that has it all closed the channel already: its readers see the end.
    const first = await readAll(clients[0].client, await keys.token({ scope: "log:read", job: jobId }), { jobId, channel: "console" });
    expect(first.data.equals(produced)).toBe(true);
    expect(first.end?.reason).toBe(ReadEndReason.CHANNEL_CLOSED);
    expect((await readdir(dirs[2].path)).filter((f) => f.startsWith(jobId)).length).toBeGreaterThan(1);

    const late = await startLogServer(tracked(await tempDir()).path, keys, { port });
    servers.push(late);
    const report = await shipper.finish();
    expect(report).toMatchObject({ status: "complete", complete: true, settled: true, bytesLost: 0 });
    const client = tracked(logClient(late.address().url));
    const second = await readAll(client.client, await keys.token({ scope: "log:read", job: jobId }), { jobId, channel: "console" });
    expect(second.data.equals(produced)).toBe(true);
    expect(second.end?.reason).toBe(ReadEndReason.CHANNEL_CLOSED);
    expect((await readdir(dirs[2].path)).filter((f) => f.startsWith(jobId))).toEqual([]);
  });

  it("resumes the spill a stopped writer left and delivers every frame once, after the ones the server already had", async () => {
    const jobId = "ship-resume";
    const port = await deadPort();
    const dataDir = tracked(await tempDir()).path;
    let server = await startLogServer(dataDir, keys, { port });
    const url = server.address().url;
    const token = await keys.token({ scope: "log:write", job: jobId });
    const common = { spillDir: dirs[2].path, logger: silentLogger(), reconnect: { initialMs: 20, maxMs: 200 }, frameBytes: 64 };
    const writer = new LogShipper({ ...common, jobId, attempt: 1, servers: [{ url }], token, writer: "host-0" });
    const lines = Array.from({ length: 200 }, (_, i) => `line ${i + 1}\n`);
    for (const line of lines.slice(0, 100)) writer.channel("console").write(line);
    const readToken = await keys.token({ scope: "log:read", job: jobId });
    const reader = tracked(logClient(url));
    const stored = () => readAll(reader.client, readToken, { jobId, channel: "console" }).then((r) => r.data.toString(), () => "");
    await waitUntil(async () => (await stored()) === lines.slice(0, 100).join(""), "the first 100 lines stored");
    await server.stop();
    for (const line of lines.slice(100)) writer.channel("supervisor").write(line);
    // The writer goes away with frames the server never saw: they stay spilled.
    await writer.close();
    const [metaPath] = (await LogShipper.findSpills(dirs[2].path)).filter((p) => p.includes(jobId));
    expect(metaPath).toBeDefined();
    const meta = JSON.parse(await readFile(metaPath, "utf8")) as { token: string; ended: boolean; channels: string[] };
    expect(meta).toMatchObject({ token, ended: false, channels: ["console", "supervisor"] });
    expect((await stat(metaPath)).mode & 0o777).toBe(0o600);

    server = await startLogServer(dataDir, keys, { port });
    servers.push(server);
    const resumed = await LogShipper.resume(metaPath, { logger: silentLogger(), reconnect: { initialMs: 20, maxMs: 200 } });
    expect(resumed.writer).toBe("host-0");
    expect(() => resumed.channel("console").write("more")).toThrow(/finished/);
    const report = await resumed.finish();
    expect(report).toMatchObject({ status: "complete", complete: true });
    const console = await readAll(reader.client, readToken, { jobId, channel: "console" });
    expect(console.data.toString()).toBe(lines.slice(0, 100).join(""));
    expect(console.end?.reason).toBe(ReadEndReason.CHANNEL_CLOSED);
    const supervisor = await readAll(reader.client, readToken, { jobId, channel: "supervisor" });
    expect(supervisor.data.toString()).toBe(lines.slice(100).join(""));
    expect(supervisor.frames.map((f) => f.seq)).toEqual(supervisor.frames.map((_, i) => i + 1));
    expect(await LogShipper.findSpills(dirs[2].path).then((p) => p.filter((x) => x.includes(jobId)))).toEqual([]);
  });

  it("drops output past the host's spill cap, says when it starts and stops, and reports the bytes lost", async () => {
    const jobId = "ship-cap";
    const port = await deadPort();
    const budget = new SpillBudget(8 * 1024);
    const events: LossEvent[] = [];
    const shipper = new LogShipper({
      jobId,
      attempt: 1,
      servers: [{ url: `http://127.0.0.1:${port}` }],
      token: await keys.token({ scope: "log:write", job: jobId }),
      spillDir: dirs[2].path,
      logger: silentLogger(),
      reconnect: { initialMs: 20, maxMs: 200 },
      frameBytes: 1024,
      budget,
      capExempt: (channel) => channel === "supervisor",
      onLoss: (e) => {
        events.push(e);
        if (e.kind === "dropping") shipper.channel("supervisor").write(`dropping ${e.channel}\n`);
      },
    });
    const before = randomBytes(20 * 1024);
    shipper.channel("console").write(before);
    await shipper.channel("console").spilled();
    expect(events).toEqual([{ kind: "dropping", channel: "console", bytes: 0, totalLost: 1024 }]);
    expect(budget.usedBytes).toBeLessThanOrEqual(8 * 1024 + 1024);
    const admitted = Math.floor((8 * 1024) / (1024 + 32)) * 1024;
    expect(shipper.report()).toMatchObject({ status: "incomplete", bytesLost: before.length - admitted, problem: "spill cap reached" });

    const server = await startLogServer(tracked(await tempDir()).path, keys, { port });
    servers.push(server);
    await waitUntil(() => budget.usedBytes === 0, "the spill budget freed");
    const after = Buffer.from("room again\n");
    shipper.channel("console").write(after);
    shipper.channel("console").flush();
    expect(events[1]).toEqual({ kind: "resumed", channel: "console", bytes: before.length - admitted, totalLost: before.length - admitted });
    const report = await shipper.finish();
    expect(report).toMatchObject({ status: "incomplete", complete: false, settled: true, bytesLost: before.length - admitted });
    const client = tracked(logClient(server.address().url));
    const readToken = await keys.token({ scope: "log:read", job: jobId });
    const console = await readAll(client.client, readToken, { jobId, channel: "console" });
    expect(console.data.equals(Buffer.concat([before.subarray(0, admitted), after]))).toBe(true);
    expect((await readAll(client.client, readToken, { jobId, channel: "supervisor" })).data.toString()).toBe("dropping console\n");
  });

  it("asks for a fresh token when a server refuses the one it has, and ships with the renewed one", async () => {
    const jobId = "ship-token";
    let asked = 0;
    const shipper: LogShipper = new LogShipper({
      jobId,
      attempt: 1,
      servers: [{ url: servers[0].address().url }],
      token: await keys.token({ scope: "log:write", job: "another-job" }),
      spillDir: dirs[2].path,
      logger: silentLogger(),
      reconnect: { initialMs: 20, maxMs: 200 },
      onTokenRefused: () => {
        asked++;
        void keys.token({ scope: "log:write", job: jobId }).then((t) => shipper.renewToken(t, Date.now() + 600_000));
      },
    });
    shipper.channel("stdout").write("needs a valid token\n");
    const report = await shipper.finish();
    expect(report.complete).toBe(true);
    expect(asked).toBeGreaterThanOrEqual(1);
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
