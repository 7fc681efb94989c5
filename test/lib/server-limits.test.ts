/**
 * The one-port server's connection limits, with real sockets: connections
 * without an open stream or request are closed after the idle timeout
 * (before and after their protocol is known, HTTP/2 and HTTP/1.1, cleartext
 * and TLS), a stream in progress keeps its connection however quiet, and one
 * client address holds at most max-connections-per-address connections
 * while another address still connects. The metrics count each.
 */
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { once } from "node:events";
import { afterEach, describe, expect, it } from "@jest/globals";
import { create, toBinary } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import { EchoRequestSchema, EchoServerStreamRequestSchema, EchoService } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import { serverOptions } from "../../lib/component.js";
import { createLogger, silentLogger } from "../../lib/logger.js";
import { loadProxyConfig } from "../../proxy/config.js";
import type { Server, ServerOptions } from "../../lib/server.js";
import { frame } from "../../lib/grpc/wire.js";
import { isRefusedStream, refusedStreamRetry } from "../../lib/retry.js";
import { startEchoServer, within } from "../support/echo-service.js";
import { createTestCertificate } from "../support/tls.js";
import { waitUntil } from "../support/wait.js";

const PREFACE = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const IDLE_MS = 300;
/** Generous: a loaded machine may run the timers late. */
const DEADLINE_MS = 10_000;

let servers: Server[] = [];
let sockets: net.Socket[] = [];
afterEach(async () => {
  for (const s of sockets) s.destroy();
  sockets = [];
  await Promise.all(servers.map((s) => s.stop()));
  servers = [];
});

async function start(options: Partial<ServerOptions>): Promise<Server> {
  const server = await startEchoServer({ graceMs: 500, ...options });
  servers.push(server);
  return server;
}

/** A TCP connection to the server from `localAddress`, once connected. */
async function connect(server: Server, localAddress = "127.0.0.1"): Promise<net.Socket> {
  const socket = net.connect({ host: "127.0.0.1", port: server.address().port, localAddress });
  socket.on("error", () => undefined);
  sockets.push(socket);
  await once(socket, "connect");
  return socket;
}

/** Resolves when the server has closed `socket` (read side ended or reset). */
function closedByServer(socket: net.Socket): Promise<void> {
  socket.resume();
  return new Promise((resolve) => {
    if (socket.readableEnded || socket.destroyed) resolve();
    socket.once("end", () => resolve());
    socket.once("close", () => resolve());
  });
}

/** The value of a metric of the server's registry (read in process: no connection of its own). */
async function metric(server: Server, name: string): Promise<number> {
  const value = (await server.metrics.getSingleMetric(name)?.get())?.values[0]?.value;
  return value ?? NaN;
}

/** An HTTP/2 session to the server from `localAddress`. */
function h2Session(server: Server, localAddress = "127.0.0.1"): http2.ClientHttp2Session {
  const { port } = server.address();
  const session = http2.connect(`http://127.0.0.1:${port}`, {
    createConnection: () => net.connect({ host: "127.0.0.1", port, localAddress }),
  });
  session.on("error", () => undefined);
  return session;
}

/** One gRPC call on `session`; resolves with its grpc-status and the response bytes. */
async function grpcCall(session: http2.ClientHttp2Session, path: string, message: Uint8Array): Promise<{ status: string; body: Buffer }> {
  const stream = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers" });
  stream.end(frame(message));
  const chunks: Buffer[] = [];
  stream.on("data", (c: Buffer) => chunks.push(c));
  const [trailers] = (await once(stream, "trailers")) as [http2.IncomingHttpHeaders];
  await once(stream, "close");
  return { status: String(trailers["grpc-status"]), body: Buffer.concat(chunks) };
}

const echo = (text: string) => toBinary(EchoRequestSchema, create(EchoRequestSchema, { text }));

describe("the idle timeout", () => {
  it("closes a connection that sent only the HTTP/2 preface", async () => {
    const server = await start({ idleTimeoutMs: IDLE_MS });
    const socket = await connect(server);
    const began = performance.now();
    socket.write(PREFACE);
    await within(DEADLINE_MS, closedByServer(socket), "the preface-only connection closed");
    expect(performance.now() - began).toBeGreaterThanOrEqual(IDLE_MS - 50);
    expect(await metric(server, "treadmill_server_connections_closed_idle_total")).toBe(1);
  });

  it("closes a connection that never sends a byte, and one that never finishes its TLS handshake", async () => {
    const cleartext = await start({ idleTimeoutMs: IDLE_MS });
    await within(DEADLINE_MS, closedByServer(await connect(cleartext)), "the silent cleartext connection closed");
    expect(await metric(cleartext, "treadmill_server_connections_closed_idle_total")).toBe(1);

    const certificate = await createTestCertificate();
    const secure = await start({ idleTimeoutMs: IDLE_MS, tls: certificate });
    await within(DEADLINE_MS, closedByServer(await connect(secure)), "the silent TLS connection closed");
    expect(await metric(secure, "treadmill_server_connections_closed_idle_total")).toBe(1);
  });

  it("keeps a connection whose stream stays open and quiet longer than the timeout, then closes it once idle", async () => {
    const server = await start({ idleTimeoutMs: IDLE_MS });
    const session = h2Session(server);
    let goaway = false;
    session.once("goaway", () => (goaway = true));
    // Three messages a second apart: the stream is open and silent for
    // more than six idle timeouts.
    const request = toBinary(EchoServerStreamRequestSchema, create(EchoServerStreamRequestSchema, { text: "quiet", count: 3, intervalMs: 1000 }));
    const { status, body } = await within(DEADLINE_MS, grpcCall(session, "/treadmill.testing.v1.EchoService/EchoServerStream", request), "the quiet stream");
    expect(status).toBe("0");
    expect(body.toString("latin1").split("quiet").length - 1).toBe(3);
    expect(goaway).toBe(false);
    expect(await metric(server, "treadmill_server_connections_closed_idle_total")).toBe(0);

    await within(DEADLINE_MS, once(session, "close"), "the idle session closed");
    expect(goaway).toBe(true);
    expect(await metric(server, "treadmill_server_connections_closed_idle_total")).toBe(1);
  });

  it("closes an idle HTTP/1.1 keep-alive connection and tells the client how long it may idle", async () => {
    const server = await start({ idleTimeoutMs: 2000 });
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    try {
      const req = http.request(`${server.address().url}/treadmill.testing.v1.EchoService/Echo`, {
        method: "POST",
        agent,
        headers: { "content-type": "application/json" },
      });
      const [socket] = (await once(req.end(JSON.stringify({ text: "hi" })), "socket")) as [net.Socket];
      const [response] = (await once(req, "response")) as [http.IncomingMessage];
      response.resume();
      await once(response, "end");
      expect(response.statusCode).toBe(200);
      expect(response.headers["keep-alive"]).toBe("timeout=2");
      await within(DEADLINE_MS, once(socket, "close"), "the idle keep-alive connection closed");
      expect(await metric(server, "treadmill_server_connections_closed_idle_total")).toBe(1);
    } finally {
      agent.destroy();
    }
  });

  it("lets a connect-node client call again after its idle connection was closed", async () => {
    const server = await start({ idleTimeoutMs: IDLE_MS });
    const sessionManager = new Http2SessionManager(server.address().url);
    try {
      const client = createClient(EchoService, createGrpcTransport({ baseUrl: server.address().url, sessionManager, interceptors: [refusedStreamRetry] }));
      expect((await client.echo({ text: "before" })).text).toBe("before");
      // The server's side of a close has no event a client sees: poll its metric.
      await waitUntil(async () => (await metric(server, "treadmill_server_connections_closed_idle_total")) === 1, "the idle close", DEADLINE_MS);
      expect((await client.echo({ text: "after" })).text).toBe("after");
    } finally {
      sessionManager.abort();
    }
  });

  it("refuses a call that crosses its GOAWAY unprocessed, and our clients send it again on a new connection", async () => {
    const server = await start({ idleTimeoutMs: IDLE_MS });
    const counter = server.metrics.getSingleMetric("treadmill_server_connections_closed_idle_total") as unknown as { inc: (n?: number) => void };
    /** Calls `call` in the very turn the server decides a session is idle, before the client can have read its GOAWAY. */
    const atIdleClose = <T>(call: () => Promise<T>): Promise<T> =>
      new Promise<T>((resolve, reject) => {
        const inc = counter.inc.bind(counter);
        counter.inc = (n?: number) => {
          inc(n);
          counter.inc = inc;
          queueMicrotask(() => void call().then(resolve, reject));
        };
      });
    for (const retried of [false, true]) {
      const sessionManager = new Http2SessionManager(server.address().url);
      try {
        const client = createClient(EchoService, createGrpcTransport({ baseUrl: server.address().url, sessionManager, interceptors: retried ? [refusedStreamRetry] : [] }));
        expect((await client.echo({ text: "before" })).text).toBe("before");
        const raced = atIdleClose(() => client.echo({ text: "raced" }));
        if (retried) expect((await within(DEADLINE_MS, raced, "the raced call")).text).toBe("raced");
        else {
          const err = await within(DEADLINE_MS, raced.then(() => undefined, (e: unknown) => e), "the raced call");
          expect(isRefusedStream(err)).toBe(true);
        }
      } finally {
        sessionManager.abort();
      }
    }
  });

  it("closes nothing when it is 0", async () => {
    const server = await start({ idleTimeoutMs: 0 });
    const session = h2Session(server);
    expect((await grpcCall(session, "/treadmill.testing.v1.EchoService/Echo", echo("a"))).status).toBe("0");
    // Two calls a few hundred milliseconds apart on one connection: the
    // second would need a new connection had the first been closed.
    await within(DEADLINE_MS, grpcCall(session, "/treadmill.testing.v1.EchoService/EchoServerStream", toBinary(EchoServerStreamRequestSchema, create(EchoServerStreamRequestSchema, { text: "x", count: 2, intervalMs: 500 }))), "a stream");
    expect((await grpcCall(session, "/treadmill.testing.v1.EchoService/Echo", echo("b"))).status).toBe("0");
    expect(session.closed).toBe(false);
    session.close();
    expect(await metric(server, "treadmill_server_connections_closed_idle_total")).toBe(0);
  });
});

describe("the limit of connections per client address", () => {
  it("refuses connections beyond the limit from one address while another address connects, and counts them", async () => {
    const lines: { msg: string; address?: string; limit?: number; refused?: number }[] = [];
    const logger = createLogger({ level: "info", destination: { write: (line: string) => void lines.push(JSON.parse(line)) } });
    const server = await start({ maxConnectionsPerAddress: 3, idleTimeoutMs: 0, logger });

    const held = [await connect(server), await connect(server), await connect(server)];
    for (const socket of held) socket.write(PREFACE);
    const refused = [await connect(server), await connect(server)];
    await within(DEADLINE_MS, Promise.all(refused.map(closedByServer)), "the connections over the limit closed");
    for (const socket of held) expect(socket.destroyed || socket.readableEnded).toBe(false);

    // Another address is not held back by the first one's connections.
    const other = h2Session(server, "127.0.0.2");
    expect((await within(DEADLINE_MS, grpcCall(other, "/treadmill.testing.v1.EchoService/Echo", echo("from elsewhere")), "a call from 127.0.0.2")).status).toBe("0");

    expect(await metric(server, "treadmill_server_connections_refused_total")).toBe(2);
    expect(await metric(server, "treadmill_server_connections")).toBe(4);
    const warnings = lines.filter((l) => l.msg.startsWith("connections refused"));
    expect(warnings).toHaveLength(1); // rate-limited: one line for both refusals
    expect(warnings[0]).toMatchObject({ address: "127.0.0.1", limit: 3, refused: 1 });

    // The metrics are on /metrics too (fetched from the other address).
    const text = await new Promise<string>((resolve, reject) => {
      http
        .get({ host: "127.0.0.1", port: server.address().port, path: "/metrics", localAddress: "127.0.0.2", agent: false }, (res) => {
          let body = "";
          res.setEncoding("utf8");
          res.on("data", (c: string) => (body += c));
          res.on("end", () => resolve(body));
        })
        .on("error", reject);
    });
    expect(text).toMatch(/^treadmill_server_connections_refused_total\{[^}]*\} 2$/m);

    // A connection closed frees its place (once the server has seen it go).
    const open = await metric(server, "treadmill_server_connections");
    held[0].destroy();
    await waitUntil(async () => (await metric(server, "treadmill_server_connections")) < open, "the server saw the close", DEADLINE_MS);
    const again = h2Session(server, "127.0.0.1");
    expect((await within(DEADLINE_MS, grpcCall(again, "/treadmill.testing.v1.EchoService/Echo", echo("again")), "a call from 127.0.0.1")).status).toBe("0");
    again.close();
    other.close();
  });
});

describe("the limits' configuration", () => {
  it("comes from every server's flags, apart from the proxy's own tunnel idle timeout", () => {
    const config = loadProxyConfig({
      env: { TREADMILL_PROXY_MAX_CONNECTIONS_PER_ADDRESS: "9" },
      argv: ["--connection-idle-timeout-ms", "5s", "--idle-timeout-ms", "2h"],
    });
    const options = serverOptions("proxy", config, silentLogger(), () => undefined);
    expect([options.idleTimeoutMs, options.maxConnectionsPerAddress, config.idleTimeoutMs]).toEqual([5000, 9, 7_200_000]);
    const defaults = serverOptions("proxy", loadProxyConfig({ env: {}, argv: [] }), silentLogger(), () => undefined);
    expect([defaults.idleTimeoutMs, defaults.maxConnectionsPerAddress]).toEqual([120_000, 512]);
  });
});
