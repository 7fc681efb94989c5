import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { TunnelService } from "../../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import type { Proxy } from "../../proxy/proxy.js";
import type { Exposer } from "../../supervisor/exposer.js";
import { dialToken, exposeJob, makeKeys, startEchoServer, startProxy, type Keys } from "./helpers.js";
import { waitUntil } from "../support/wait.js";

const WS_CLIENT = join(fileURLToPath(new URL(".", import.meta.url)), "ws-client.mjs");
const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

let keys: Keys;
let proxy: Proxy;
let echo: Awaited<ReturnType<typeof startEchoServer>>;
let exposer: Exposer;

beforeAll(async () => {
  keys = await makeKeys();
  // A random slice of a high range, so that concurrent test runs rarely collide (a taken port is skipped anyway).
  const low = 45000 + Math.floor(Math.random() * 1000);
  proxy = await startProxy(keys, { tcpPortRange: `${low}-${low + 999}` });
  echo = await startEchoServer();
  exposer = await exposeJob(proxy.address().url, keys, "job-e", [{ name: "echo", host: "127.0.0.1", port: echo.port, kind: "tcp" }]);
  await waitUntil(() => exposer.connected() && proxy.sessionCount() === 1, "exposer connected");
  // The announce follows the welcome: wait until a dial finds the exposure.
  const client = createClient(TunnelService, createGrpcTransport({ baseUrl: proxy.address().url, interceptors: [bearerInterceptor(() => probeToken)] }));
  const probeToken = await dialToken(keys, "job-e", "echo");
  for (let attempt = 0; ; attempt++) {
    try {
      await client.openTcpEntrance({ jobId: "job-e", portName: "echo" });
      break;
    } catch (err) {
      if (ConnectError.from(err).code !== Code.NotFound || attempt > 200) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
});

afterAll(async () => {
  await exposer.stop();
  await proxy.stop();
  await echo.close();
});

/** Runs a child process to its end; resolves with its standard output. */
function run(command: string, args: string[], input?: Buffer): Promise<{ code: number | null; stdout: Buffer }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ["pipe", "pipe", "inherit"] });
    const chunks: Buffer[] = [];
    child.stdout.on("data", (d: Buffer) => chunks.push(d));
    child.once("error", reject);
    child.once("close", (code) => resolve({ code, stdout: Buffer.concat(chunks) }));
    child.stdin.on("error", () => undefined);
    child.stdin.end(input);
  });
}

function wsUrl(job: string, exposure: string): string {
  return `${proxy.address().url.replace(/^http/, "ws")}/ws/${job}/${exposure}`;
}

describe("the websocket entrance", () => {
  it("echoes bytes for a real websocket client that sends its token as a subprotocol", async () => {
    const token = await dialToken(keys, "job-e", "echo");
    const { stdout } = await run(process.execPath, ["--experimental-websocket", "--no-warnings", WS_CLIENT, wsUrl("job-e", "echo"), token, String(3 * 1024 * 1024)]);
    const result = JSON.parse(stdout.toString()) as { opened: { exposure: { name: string } }; protocol: string; echoed: boolean; close: { code: number } };
    expect(result.protocol).toBe("treadmill.tunnel.v1");
    expect(result.opened.exposure.name).toBe("echo");
    expect(result.echoed).toBe(true);
    expect(result.close.code).toBe(1000);
  }, 60_000);

  it("refuses a token for another job, and closes with the reason when the exposure is missing", async () => {
    const wrongJob = await dialToken(keys, "job-x", "echo");
    const refused = JSON.parse((await run(process.execPath, ["--experimental-websocket", "--no-warnings", WS_CLIENT, wsUrl("job-e", "echo"), wrongJob, "10"])).stdout.toString()) as {
      opened: unknown;
      close: { code: number };
    };
    expect(refused.opened).toBeNull();
    expect(refused.close?.code ?? 1006).toBe(1006);
    const missing = await dialToken(keys, "job-e", "nope");
    const closed = JSON.parse((await run(process.execPath, ["--experimental-websocket", "--no-warnings", WS_CLIENT, wsUrl("job-e", "nope"), missing, "10"])).stdout.toString()) as {
      close: { code: number; reason: string };
    };
    expect(closed.close.code).toBe(4100 + Code.NotFound);
    expect(closed.close.reason).toMatch(/does not expose nope/);
  }, 60_000);
});

describe("the websocket entrance with a client that breaks the protocol", () => {
  it("closes the websocket with 1002 on an unmasked frame and releases the tunnel", async () => {
    const token = await dialToken(keys, "job-e", "echo");
    const { hostname, port } = new URL(proxy.address().url);
    const net = await import("node:net");
    const socket = net.connect({ host: hostname, port: Number(port) });
    let received = Buffer.alloc(0);
    socket.on("data", (d: Buffer) => (received = Buffer.concat([received, d])));
    const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    socket.write(
      [
        "GET /ws/job-e/echo HTTP/1.1",
        `Host: ${hostname}:${port}`,
        "Upgrade: websocket",
        "Connection: Upgrade",
        `Sec-WebSocket-Key: ${randomBytes(16).toString("base64")}`,
        "Sec-WebSocket-Version: 13",
        `Sec-WebSocket-Protocol: treadmill.tunnel.v1, bearer.${token}`,
        "",
        "",
      ].join("\r\n"),
    );
    await waitUntil(() => received.includes('"type":"opened"'), "the opened message");
    const opened = received.length;
    // A binary frame without the mask bit: clients must mask (RFC 6455, 5.1).
    socket.write(Buffer.from([0x82, 0x03, 0x61, 0x62, 0x63]));
    await closed;
    const frame = received.subarray(opened);
    expect(frame[0]).toBe(0x88);
    expect(frame.readUInt16BE(2)).toBe(1002);
    await waitUntil(() => proxy.tunnelCount() === 0, "the tunnel released");
  });
});

describe("the tcp entrance", () => {
  it("carries socat's bytes through a port bound for the session", async () => {
    const token = await dialToken(keys, "job-e", "echo");
    const client = createClient(TunnelService, createGrpcTransport({ baseUrl: proxy.address().url, interceptors: [bearerInterceptor(() => token)] }));
    const opened = await client.openTcpEntrance({ jobId: "job-e", portName: "echo" });
    expect(opened.hostId).toBe("host-1");
    const again = await client.openTcpEntrance({ jobId: "job-e", portName: "echo" });
    expect(again.address).toBe(opened.address);
    const data = randomBytes(2 * 1024 * 1024);
    const { code, stdout } = await run("socat", ["-t", "10", "-", `TCP:${opened.address}`], data);
    expect(code).toBe(0);
    expect(stdout.length).toBe(data.length);
    expect(sha(stdout)).toBe(sha(data));
  }, 60_000);

  it("refuses to bind for a token of another job or an exposure not announced", async () => {
    const wrong = await dialToken(keys, "job-x", "echo");
    const client = createClient(TunnelService, createGrpcTransport({ baseUrl: proxy.address().url, interceptors: [bearerInterceptor(() => wrong)] }));
    await expect(client.openTcpEntrance({ jobId: "job-e", portName: "echo" })).rejects.toMatchObject({ code: Code.PermissionDenied });
    const nope = await dialToken(keys, "job-e", "nope");
    const client2 = createClient(TunnelService, createGrpcTransport({ baseUrl: proxy.address().url, interceptors: [bearerInterceptor(() => nope)] }));
    await expect(client2.openTcpEntrance({ jobId: "job-e", portName: "nope" })).rejects.toMatchObject({ code: Code.NotFound });
    await expect(client2.openTcpEntrance({ jobId: "job-e", portName: "Bad Name" })).rejects.toMatchObject({ code: Code.InvalidArgument });
  });

  it("closes the connections of a session at its token's expiry", async () => {
    const token = await dialToken(keys, "job-e", "echo", 2000);
    const client = createClient(TunnelService, createGrpcTransport({ baseUrl: proxy.address().url, interceptors: [bearerInterceptor(() => token)] }));
    const opened = await client.openTcpEntrance({ jobId: "job-e", portName: "echo" });
    const [host, port] = [opened.address.slice(0, opened.address.lastIndexOf(":")), Number(opened.address.slice(opened.address.lastIndexOf(":") + 1))];
    const net = await import("node:net");
    const socket = net.connect({ host, port });
    const echoed = new Promise<string>((resolve) => socket.once("data", (d: Buffer) => resolve(d.toString())));
    socket.write("ping");
    expect(await echoed).toBe("ping");
    socket.resume();
    // The proxy ends the connection (it says TOKEN_EXPIRED to the supervisor; TCP can only end).
    await new Promise<void>((resolve) => socket.once("close", () => resolve()));
    await waitUntil(() => proxy.tunnelCount() === 0, "the tunnel released");
    // A new connection to the expired entrance is refused: the port is closed.
    const refused = await new Promise<boolean>((resolve) => {
      const again = net.connect({ host, port });
      again.once("connect", () => {
        again.destroy();
        resolve(false);
      });
      again.once("error", () => resolve(true));
    });
    expect(refused).toBe(true);
  });
});
