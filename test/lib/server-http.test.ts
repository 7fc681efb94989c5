import http from "node:http";
import http2 from "node:http2";
import { once } from "node:events";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { Http2SessionManager, createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { EchoService } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import type { Server } from "../../lib/server.js";
import { startEchoServer } from "../support/echo-service.js";

/** One HTTP/1.1 request without keep-alive; the status, headers and body. */
async function request(url: string, options: http.RequestOptions = {}, body?: string) {
  const req = http.request(url, { agent: false, ...options });
  req.end(body);
  const [res] = (await once(req, "response")) as [http.IncomingMessage];
  let text = "";
  for await (const chunk of res) text += String(chunk);
  return { status: res.statusCode, headers: res.headers, body: text };
}

/** One HTTP/2 (prior knowledge) GET; the status and body. */
async function requestH2(baseUrl: string, path: string) {
  const session = http2.connect(baseUrl);
  try {
    const stream = session.request({ ":path": path });
    const [headers] = (await once(stream, "response")) as [http2.IncomingHttpHeaders];
    let body = "";
    for await (const chunk of stream) body += String(chunk);
    return { status: headers[":status"], body };
  } finally {
    session.close();
  }
}

describe("plain HTTP on the RPC port", () => {
  let server: Server;

  beforeAll(async () => {
    server = await startEchoServer({
      corsOrigins: ["https://console.example"],
      http: (req, res) => {
        if (req.url !== "/hello") return false;
        res.setHeader("Content-Type", "text/plain");
        res.end(`hello over HTTP/${req.httpVersion}`);
        return true;
      },
    });
  });
  afterAll(() => server.stop());

  it("serves /metrics over HTTP/1.1 and over HTTP/2 prior knowledge", async () => {
    const h1 = await request(`${server.address().url}/metrics`);
    const h2 = await requestH2(server.address().url, "/metrics");
    expect([h1.status, h2.status]).toEqual([200, 200]);
    expect(h1.body).toContain("# TYPE treadmill_rpc_requests_total counter");
    expect(h2.body).toContain("# TYPE treadmill_rpc_requests_total counter");
  });

  it("raises the HTTP/2 stream and connection receive windows", async () => {
    const session = http2.connect(server.address().url);
    try {
      const [settings] = (await once(session, "remoteSettings")) as [http2.Settings];
      expect(settings.initialWindowSize).toBe(4 * 1024 * 1024);
      // The server sends its connection WINDOW_UPDATE before any response.
      const stream = session.request({ ":path": "/metrics" });
      stream.resume();
      await once(stream, "end");
      expect(session.state.remoteWindowSize).toBeGreaterThanOrEqual(15 * 1024 * 1024);
    } finally {
      session.close();
    }
  });

  it("passes other paths to the component's HTTP handler first", async () => {
    expect((await request(`${server.address().url}/hello`)).body).toBe("hello over HTTP/1.1");
    expect((await requestH2(server.address().url, "/hello")).body).toBe("hello over HTTP/2.0");
  });

  it("answers an unknown path with 404", async () => {
    expect((await request(`${server.address().url}/nothing/here`)).status).toBe(404);
  });

  it("answers a CORS preflight from an allowed origin with what connect-web and grpc-web need", async () => {
    const { status, headers } = await request(`${server.address().url}/treadmill.testing.v1.EchoService/Echo`, {
      method: "OPTIONS",
      headers: {
        Origin: "https://console.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,connect-protocol-version,x-grpc-web,authorization",
      },
    });
    expect(status).toBe(204);
    expect(headers["access-control-allow-origin"]).toBe("https://console.example");
    expect(headers["access-control-allow-methods"]).toContain("POST");
    const allowed = String(headers["access-control-allow-headers"]).toLowerCase().split(/,\s*/);
    expect(allowed).toEqual(
      expect.arrayContaining(["content-type", "connect-protocol-version", "x-grpc-web", "authorization"]),
    );
  });

  it("refuses a CORS preflight from another origin without Access-Control-Allow-Origin", async () => {
    const { status, headers } = await request(`${server.address().url}/treadmill.testing.v1.EchoService/Echo`, {
      method: "OPTIONS",
      headers: { Origin: "https://evil.example", "Access-Control-Request-Method": "POST" },
    });
    expect(status).toBe(403);
    expect(headers["access-control-allow-origin"]).toBeUndefined();
  });

  it("allows an allowed origin to read the response and the status headers of a call", async () => {
    const { status, headers, body } = await request(`${server.address().url}/treadmill.testing.v1.EchoService/Echo`, {
      method: "POST",
      headers: {
        Origin: "https://console.example",
        "Content-Type": "application/json",
        "Connect-Protocol-Version": "1",
      },
    }, JSON.stringify({ text: "from a browser" }));
    expect(status).toBe(200);
    expect(JSON.parse(body)).toEqual({ text: "from a browser" });
    expect(headers["access-control-allow-origin"]).toBe("https://console.example");
    expect(String(headers["access-control-expose-headers"])).toContain("Grpc-Status");
  });
});

describe("request size limit", () => {
  let server: Server;
  let sessions: Http2SessionManager;
  let agent: http.Agent;

  beforeAll(async () => {
    server = await startEchoServer({ readMaxBytes: 1024 });
    sessions = new Http2SessionManager(server.address().url);
    agent = new http.Agent({ keepAlive: true });
  });
  afterAll(async () => {
    sessions.abort();
    agent.destroy();
    await server.stop();
  });

  it("rejects a too-large message with ResourceExhausted over gRPC and Connect and accepts a small one", async () => {
    const baseUrl = server.address().url;
    const clients = [
      createClient(EchoService, createGrpcTransport({ baseUrl, sessionManager: sessions })),
      createClient(EchoService, createConnectTransport({ baseUrl, httpVersion: "1.1", nodeOptions: { agent } })),
    ];
    for (const client of clients) {
      expect((await client.echo({ text: "x".repeat(900) })).text).toHaveLength(900);
      const failure = await client.echo({ text: "x".repeat(2000) }).catch((e: unknown) => e);
      expect(ConnectError.from(failure).code).toBe(Code.ResourceExhausted);
    }
  });

  it("rejects a too-large message inside a client stream", async () => {
    const client = createClient(
      EchoService,
      createGrpcTransport({ baseUrl: server.address().url, sessionManager: sessions }),
    );
    async function* requests() {
      yield { text: "small" };
      yield { text: "x".repeat(2000) };
    }
    const failure = await client.echoClientStream(requests()).catch((e: unknown) => e);
    expect(ConnectError.from(failure).code).toBe(Code.ResourceExhausted);
  });
});

describe("bulk procedures", () => {
  let server: Server;
  let sessions: Http2SessionManager;

  beforeAll(async () => {
    server = await startEchoServer({ bulkProcedures: ["/treadmill.testing.v1.EchoService/EchoServerStream"] });
    sessions = new Http2SessionManager(server.address().url);
  });
  afterAll(async () => {
    sessions.abort();
    await server.stop();
  });

  it("are answered uncompressed to a client that accepts gzip, while other procedures are compressed", async () => {
    // The default gRPC transport advertises gzip; 64 KiB of one letter compresses well.
    const client = createClient(
      EchoService,
      createGrpcTransport({ baseUrl: server.address().url, sessionManager: sessions }),
    );
    const text = "a".repeat(64 * 1024);
    let unaryEncoding: string | null = null;
    let streamEncoding: string | null = "unset";
    await client.echo({ text }, { onHeader: (h) => (unaryEncoding = h.get("grpc-encoding")) });
    for await (const r of client.echoServerStream(
      { text, count: 1 },
      { onHeader: (h) => (streamEncoding = h.get("grpc-encoding")) },
    )) {
      expect(r.text).toBe(text);
    }
    expect(unaryEncoding).toBe("gzip");
    expect(streamEncoding).toBeNull();
  });
});
