// `npm run bench -- proxy`: the rendezvous proxy (bin/treadmill-proxy.js) in its
// own process, the supervisor's exposer and a TCP echo server (the job's
// host-local port) in another, the client here.
//
// (a) throughput of one tunnel and of 16 concurrent tunnels (bytes sent
//     through the user-facing TunnelService.Dial, as `tml console` and
//     `tml port-forward` do, and echoed back), and of one connection through
//     a TCP entrance (OpenTcpEntrance, as ssh uses it) and through the
//     WebSocket entrance (as the web console uses it), against direct
//     loopback TCP to the same echo server, and against the ceiling of any
//     relay with this topology: two plain TCP relays written in Node (socket
//     pipes, nothing else) in the proxy's and the supervisor's places;
// (b) round trip of 64-byte echoes (p50, p99) through a Dial tunnel, a
//     TCP entrance and the WebSocket entrance, against a direct TCP
//     connection to the same echo server;
// (c) resident memory of the proxy per open (idle) tunnel.
//
// Sizes: PROXY_BENCH_MB (default 256 MB per throughput case), PROXY_BENCH_RTTS
// (default 5000 round trips), PROXY_BENCH_TUNNELS (default 500 idle tunnels).
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { Duplex } from "node:stream";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { WebSocket, createWebSocketStream } from "ws";
import { TunnelService } from "../../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { TokenSigner, generateSigningKey } from "../../lib/tokens.js";
import { dialTunnel } from "../../lib/tunnel/client.js";
import { percentile, report } from "./report.js";

const PROXY_BIN = new URL("../../bin/treadmill-proxy.js", import.meta.url).pathname;
const SUPERVISOR = new URL("./children/proxy-supervisor.ts", import.meta.url).pathname;
const RELAY = new URL("./children/tcp-relay.ts", import.meta.url).pathname;
const TOTAL = Number(process.env.PROXY_BENCH_MB ?? 256) * 1e6;
const RTTS = Number(process.env.PROXY_BENCH_RTTS ?? 5000);
const IDLE_TUNNELS = Number(process.env.PROXY_BENCH_TUNNELS ?? 500);
const CHUNK = 256 * 1024;

const printed = new WeakMap<ChildProcess, string[]>();

/**
 * The first line of `child`'s output, printed already or to come, that
 * matches. One reader per child keeps every line: two lines that come in one
 * chunk are both seen.
 */
function waitForLine(child: ChildProcess, pattern: RegExp): Promise<RegExpMatchArray> {
  let lines = printed.get(child);
  if (lines === undefined) {
    const seen: string[] = [];
    lines = seen;
    printed.set(child, seen);
    createInterface({ input: child.stdout! }).on("line", (line) => {
      seen.push(line);
      child.emit("bench-line", line);
    });
  }
  const earlier = lines.map((line) => pattern.exec(line)).find((m) => m !== null);
  if (earlier) return Promise.resolve(earlier);
  return new Promise((resolve, reject) => {
    const onLine = (line: string) => {
      const m = pattern.exec(line);
      if (m) {
        child.off("bench-line", onLine);
        resolve(m);
      }
    };
    child.on("bench-line", onLine);
    child.once("exit", (code) => reject(new Error(`child exited (${code}) before ${pattern}`)));
  });
}

/** Sends `bytes` through `stream` (an echo) in CHUNK writes and resolves when all came back; MB/s of one direction. */
async function echoThroughput(stream: Duplex, bytes: number): Promise<number> {
  const chunk = randomBytes(CHUNK);
  const began = performance.now();
  const done = new Promise<void>((resolve, reject) => {
    let got = 0;
    stream.on("data", (d: Buffer) => {
      got += d.length;
      if (got >= bytes) resolve();
    });
    stream.once("error", reject);
  });
  for (let sent = 0; sent < bytes; sent += CHUNK) {
    if (!stream.write(sent + CHUNK <= bytes ? chunk : chunk.subarray(0, bytes - sent))) {
      await new Promise((r) => stream.once("drain", r));
    }
  }
  await done;
  return bytes / 1e6 / ((performance.now() - began) / 1000);
}

async function roundTrips(stream: Duplex, n: number): Promise<number[]> {
  const message = Buffer.alloc(64, 7);
  const samples: number[] = [];
  let got = 0;
  let wake: (() => void) | undefined;
  stream.on("data", (d: Buffer) => {
    got += d.length;
    if (got >= 64) {
      got -= 64;
      wake?.();
    }
  });
  for (let i = 0; i < n; i++) {
    const began = performance.now();
    await new Promise<void>((resolve) => {
      wake = resolve;
      stream.write(message);
    });
    samples.push((performance.now() - began) * 1000);
  }
  return samples;
}

function directTcp(port: number, host = "127.0.0.1"): Promise<net.Socket> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port }, () => resolve(socket));
    socket.setNoDelay(true);
  });
}

/** A connection through the proxy's WebSocket entrance, as a byte stream once the proxy said "opened". */
async function viaWebSocket(proxyUrl: string, jobId: string, token: string): Promise<Duplex> {
  const ws = new WebSocket(`${proxyUrl.replace(/^http/, "ws")}/ws/${jobId}/echo`, ["treadmill.tunnel.v1", `bearer.${token}`]);
  await new Promise<void>((resolve, reject) => {
    ws.once("message", (_data, isBinary) => (isBinary ? reject(new Error("the proxy sent bytes before opened")) : resolve()));
    ws.once("error", reject);
  });
  return createWebSocketStream(ws);
}

async function rssKiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  return Number(/VmRSS:\s+(\d+)/.exec(status)![1]);
}

export async function run(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-proxy-bench-"));
  const key = await generateSigningKey();
  const signer = await TokenSigner.create(key, { issuer: "bench" });
  await writeFile(join(dir, "jwks.json"), JSON.stringify(signer.publicJwks()));
  const jobId = "bench-job";
  const children: ChildProcess[] = [];
  try {
    const low = 46000 + Math.floor(Math.random() * 1000);
    // Every idle tunnel is a connection of its own from 127.0.0.1: the
    // per-address limit (512 by default) would refuse the 500 idle tunnels.
    const proxyArgs = [PROXY_BIN, "--port", "0", "--signing-keys-file", join(dir, "jwks.json"), "--max-tunnels-per-job", "5000", "--max-tunnels", "5000", "--max-connections-per-address", "0"];
    const proxy = spawn(process.execPath, [...proxyArgs, "--tcp-port-range", `${low}-${low + 999}`], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    children.push(proxy);
    const url = (await waitForLine(proxy, /"url":"(http:[^"]+)".*proxy ready|proxy ready.*"url":"(http:[^"]+)"/)).slice(1).find(Boolean)!;
    const exposeToken = await signer.sign({ scope: "tunnel:expose", job: jobId }, 3_600_000, { subject: "bench" });
    const supervisor = spawn(process.execPath, ["--import", "tsx", SUPERVISOR, url, jobId, exposeToken], { stdio: ["ignore", "pipe", "inherit"] });
    children.push(supervisor);
    const echoPort = Number((await waitForLine(supervisor, /echo port (\d+)/))[1]);
    const innerRelay = Number((await waitForLine(supervisor, /relay port (\d+)/))[1]);
    // The ceiling baseline: a plain relay in the proxy's place, in a process
    // of its own, to the plain relay in the supervisor's process.
    const relay = spawn(process.execPath, ["--import", "tsx", RELAY, String(innerRelay)], { stdio: ["ignore", "pipe", "inherit"] });
    children.push(relay);
    const relayPort = Number((await waitForLine(relay, /relay port (\d+)/))[1]);
    await waitForLine(supervisor, /exposer connected/);
    const token = await signer.sign({ scope: "tunnel:dial", job: jobId, exposure: "echo" }, 3_600_000, { subject: "bench" });
    const dial = () => dialTunnel({ proxyUrl: url, token, jobId, port: "echo" });
    const tunnels = createClient(TunnelService, createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => token)] }));
    const entrance = (await tunnels.openTcpEntrance({ jobId, portName: "echo" })).address;
    const [entranceHost, entrancePort] = [entrance.slice(0, entrance.lastIndexOf(":")), Number(entrance.slice(entrance.lastIndexOf(":") + 1))];
    const viaEntrance = () => directTcp(entrancePort, entranceHost);
    const viaBrowser = () => viaWebSocket(url, jobId, token);

    process.stdout.write(`sizes: ${TOTAL / 1e6} MB per throughput case, ${RTTS} round trips, ${IDLE_TUNNELS} idle tunnels\n`);
    // (c) memory per open tunnel, first: a proxy that has moved gigabytes
    // holds buffers that a later collection may return mid-measurement.
    const before = await rssKiB(proxy.pid!);
    const idle: Duplex[] = [];
    for (let i = 0; i < IDLE_TUNNELS; i += 50) {
      idle.push(...(await Promise.all(Array.from({ length: Math.min(50, IDLE_TUNNELS - i) }, dial))));
    }
    // One echo on each, so every tunnel has carried bytes.
    await Promise.all(idle.map((s) => echoThroughput(s, 64)));
    const after = await rssKiB(proxy.pid!);
    report(`proxy memory per open tunnel (${IDLE_TUNNELS} open)`, (after - before) / IDLE_TUNNELS, "KiB", {
      name: "proxy with none open (total)",
      value: before,
    });
    for (const s of idle) s.destroy();
    // Warm-up of both paths.
    {
      const t = await dial();
      await echoThroughput(t, 16e6);
      t.destroy();
      const d = await directTcp(echoPort);
      await echoThroughput(d, 16e6);
      d.destroy();
    }

    // (a) throughput
    const direct1 = await directTcp(echoPort);
    const directOne = await echoThroughput(direct1, TOTAL);
    direct1.destroy();
    const tunnel1 = await dial();
    const tunnelOne = await echoThroughput(tunnel1, TOTAL);
    tunnel1.destroy();
    report("throughput, 1 tunnel (echo, each way)", tunnelOne, "MB/s", { name: "direct tcp", value: directOne });
    const relay1 = await directTcp(relayPort);
    const relayOne = await echoThroughput(relay1, TOTAL);
    relay1.destroy();
    report("ceiling: 2 plain TCP relays, 1 connection", relayOne, "MB/s", { name: "direct tcp", value: directOne });
    report("  1 tunnel against that ceiling", tunnelOne, "MB/s", { name: "2 plain relays", value: relayOne });
    const entrance1 = await viaEntrance();
    const entranceOne = await echoThroughput(entrance1, TOTAL);
    entrance1.destroy();
    report("throughput, 1 tcp entrance connection", entranceOne, "MB/s", { name: "direct tcp", value: directOne });
    const browser1 = await viaBrowser();
    const browserOne = await echoThroughput(browser1, TOTAL);
    browser1.destroy();
    report("throughput, 1 websocket entrance connection", browserOne, "MB/s", { name: "direct tcp", value: directOne });

    const many = async (open: () => Promise<Duplex>) => {
      const streams = await Promise.all(Array.from({ length: 16 }, open));
      const began = performance.now();
      await Promise.all(streams.map((s) => echoThroughput(s, TOTAL / 16)));
      const mbps = TOTAL / 1e6 / ((performance.now() - began) / 1000);
      for (const s of streams) s.destroy();
      return mbps;
    };
    const direct16 = await many(() => directTcp(echoPort));
    const tunnel16 = await many(dial);
    report("throughput, 16 tunnels (echo, each way)", tunnel16, "MB/s", { name: "direct tcp", value: direct16 });
    const relay16 = await many(() => directTcp(relayPort));
    report("ceiling: 2 plain TCP relays, 16 connections", relay16, "MB/s", { name: "direct tcp", value: direct16 });
    report("  16 tunnels against that ceiling", tunnel16, "MB/s", { name: "2 plain relays", value: relay16 });

    // (b) round trips
    const d = await directTcp(echoPort);
    const directRtt = await roundTrips(d, RTTS);
    d.destroy();
    const t = await dial();
    const tunnelRtt = await roundTrips(t, RTTS);
    t.destroy();
    const e = await viaEntrance();
    const entranceRtt = await roundTrips(e, RTTS);
    e.destroy();
    const w = await viaBrowser();
    const browserRtt = await roundTrips(w, RTTS);
    w.destroy();
    for (const [path, samples] of [["tunnel", tunnelRtt], ["tcp entrance", entranceRtt], ["websocket entrance", browserRtt]] as const) {
      for (const p of [50, 99]) {
        report(`64-byte echo round trip p${p}, ${path}`, percentile(samples, p), "µs", { name: "direct tcp", value: percentile(directRtt, p) });
        report(`  added by the proxy, p${p}`, percentile(samples, p) - percentile(directRtt, p), "µs");
      }
    }

  } finally {
    for (const child of children) child.kill("SIGKILL");
    await rm(dir, { recursive: true, force: true });
  }
}
