import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import {
  Http2SessionManager,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { EchoService } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import { createLogger } from "../../lib/logger.js";
import { isLoopback, type Server } from "../../lib/server.js";
import { EchoServiceImpl, startEchoServer } from "../support/echo-service.js";

type LogLine = Record<string, unknown> & { level: number; msg: string };

/** A logger whose lines land in `lines`, parsed. */
function captureLogs() {
  const lines: LogLine[] = [];
  const logger = createLogger({
    component: "echo",
    level: "debug",
    destination: { write: (line: string) => void lines.push(JSON.parse(line) as LogLine) },
  });
  return { logger, lines };
}

const ECHO = "/treadmill.testing.v1.EchoService/Echo";
const SERVER_STREAM = "/treadmill.testing.v1.EchoService/EchoServerStream";
const SECRET = "connection to db-7 refused, password hunter2";

/** EchoService, except that Echo and EchoServerStream throw a plain Error (a bug) for the text "bug". */
class BuggyEchoService extends EchoServiceImpl {
  override echo(request: { text: string; failCode: number }) {
    if (request.text === "bug") throw new Error(SECRET);
    return super.echo(request as Parameters<EchoServiceImpl["echo"]>[0]);
  }
  override async *echoServerStream(...args: Parameters<EchoServiceImpl["echoServerStream"]>) {
    if (args[0].text !== "bug") return yield* super.echoServerStream(...args);
    yield { text: "first", index: 0 };
    throw new Error(SECRET);
  }
}

describe("RPC logging, metrics and error masking", () => {
  let server: Server;
  let sessions: Http2SessionManager;
  let transports: [string, Transport][];
  const { logger, lines } = captureLogs();
  const rpcLines = (procedure: string) => lines.filter((l) => l.procedure === procedure);

  beforeAll(async () => {
    server = await startEchoServer({
      logger,
      routes: (router) => router.service(EchoService, new BuggyEchoService()),
    });
    const baseUrl = server.address().url;
    sessions = new Http2SessionManager(baseUrl);
    transports = [
      ["gRPC", createGrpcTransport({ baseUrl, sessionManager: sessions })],
      ["Connect", createConnectTransport({ baseUrl, httpVersion: "2", sessionManager: sessions })],
      ["gRPC-Web", createGrpcWebTransport({ baseUrl, httpVersion: "2", sessionManager: sessions })],
    ];
  });
  afterAll(async () => {
    sessions.abort();
    await server.stop();
  });

  it("logs the server listening with its url", () => {
    expect(lines.find((l) => l.msg === "server listening")?.url).toBe(server.address().url);
  });

  it("logs a successful call at info with procedure, code and durationMs", async () => {
    lines.length = 0;
    await createClient(EchoService, transports[0][1]).echo({ text: "ok" });
    const [line] = rpcLines(ECHO);
    expect(line).toMatchObject({ level: 30, procedure: ECHO, code: "OK", component: "echo" });
    expect(typeof line.durationMs).toBe("number");
  });

  it("logs a client error at info with its code and reason, not as a server fault", async () => {
    lines.length = 0;
    await createClient(EchoService, transports[0][1])
      .echo({ text: "x", failCode: Code.NotFound })
      .catch(() => undefined);
    expect(rpcLines(ECHO)[0]).toMatchObject({ level: 30, code: "NotFound", msg: "rpc failed" });
  });

  it("measures a streaming call until its stream ends, not until the handler returns", async () => {
    lines.length = 0;
    // The server paces the three messages 60 ms apart.
    const stream = createClient(EchoService, transports[0][1]).echoServerStream({ text: "t", count: 3, intervalMs: 60 });
    let received = 0;
    for await (const _ of stream) received++;
    expect(received).toBe(3);
    const [line] = rpcLines(SERVER_STREAM);
    expect(line).toMatchObject({ level: 30, code: "OK" });
    expect(line.durationMs).toBeGreaterThanOrEqual(110);
  });

  it("turns a plain Error into Internal with a generic message on every protocol and logs the cause", async () => {
    for (const [name, transport] of transports) {
      lines.length = 0;
      const failure = await createClient(EchoService, transport)
        .echo({ text: "bug" })
        .catch((e: unknown) => e);
      expect([name, ConnectError.from(failure).code]).toEqual([name, Code.Internal]);
      expect(ConnectError.from(failure).rawMessage).toBe("internal error");
      expect(JSON.stringify(failure)).not.toContain("hunter2");
      const [line] = rpcLines(ECHO);
      expect(line).toMatchObject({ level: 50, code: "Internal" });
      expect((line.err as { message: string }).message).toBe(SECRET);
    }
  });

  it("masks a plain Error thrown in the middle of a stream, after the messages already sent", async () => {
    lines.length = 0;
    const received: string[] = [];
    const failure = await (async () => {
      for await (const r of createClient(EchoService, transports[0][1]).echoServerStream({ text: "bug", count: 2 })) {
        received.push(r.text);
      }
    })().catch((e: unknown) => e);
    expect(received).toEqual(["first"]);
    expect(ConnectError.from(failure)).toMatchObject({ code: Code.Internal, rawMessage: "internal error" });
    expect(rpcLines(SERVER_STREAM)[0]).toMatchObject({ level: 50, code: "Internal" });
  });

  it("serves Prometheus metrics with a counter for the call just made", async () => {
    await createClient(EchoService, transports[1][1]).echo({ text: "counted" });
    const response = await fetch(`${server.address().url}/metrics`);
    expect(response.headers.get("content-type")).toContain("text/plain");
    const text = await response.text();
    // One line per label set; labels in any order.
    const line = text
      .split("\n")
      .find(
        (l) =>
          l.startsWith("treadmill_rpc_requests_total{") &&
          l.includes(`procedure="${ECHO}"`) &&
          l.includes('code="OK"') &&
          l.includes('component="echo"'),
      );
    expect(Number(line?.split(" ").at(-1))).toBeGreaterThanOrEqual(1);
    expect(text).toMatch(/^treadmill_rpc_requests_total\{[^}]*code="Internal"[^}]*\} \d+$/m);
    expect(text).toMatch(/^treadmill_rpc_duration_seconds_count\{[^}]*procedure="\/treadmill.testing.v1.EchoService\/Echo"/m);
    expect(text).toContain("process_cpu_user_seconds_total");
  });
});

describe("two servers in one process", () => {
  it("keep separate metrics registries", async () => {
    const [a, b] = [await startEchoServer({ name: "a" }), await startEchoServer({ name: "b" })];
    try {
      const sessions = new Http2SessionManager(a.address().url);
      await createClient(EchoService, createGrpcTransport({ baseUrl: a.address().url, sessionManager: sessions })).echo({
        text: "only a",
      });
      sessions.abort();
      const metricsA = await (await fetch(`${a.address().url}/metrics`)).text();
      const metricsB = await (await fetch(`${b.address().url}/metrics`)).text();
      expect(metricsA).toMatch(/^treadmill_rpc_requests_total\{[^}]*component="a"[^}]*\} 1$/m);
      expect(metricsB).not.toMatch(/^treadmill_rpc_requests_total\{/m);
      expect(metricsB).toContain('component="b"');
    } finally {
      await Promise.all([a.stop(), b.stop()]);
    }
  });
});

describe("plain TCP beyond loopback", () => {
  it("warns when a server without TLS listens on a non-loopback address, and not on loopback", async () => {
    const { logger, lines } = captureLogs();
    const exposed = await startEchoServer({ host: "0.0.0.0", logger });
    const local = await startEchoServer({ host: "127.0.0.1", logger });
    try {
      const warnings = lines.filter((l) => l.level === 40);
      expect(warnings).toEqual([
        expect.objectContaining({ url: exposed.address().url, msg: expect.stringMatching(/^serving plain TCP on a non-loopback address/) }),
      ]);
    } finally {
      await exposed.stop();
      await local.stop();
    }
    expect([isLoopback("127.0.0.1"), isLoopback("::1"), isLoopback("::ffff:127.0.0.2"), isLoopback("0.0.0.0"), isLoopback("10.0.0.1")]).toEqual([
      true,
      true,
      true,
      false,
      false,
    ]);
  });
});
