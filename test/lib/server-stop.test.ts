import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { once } from "node:events";
import { describe, expect, it } from "@jest/globals";
import { ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { Http2SessionManager, createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { EchoService } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import { silentLogger } from "../../lib/logger.js";
import { createServer } from "../../lib/server.js";
import { EchoServiceImpl, Pushable, startEchoServer, within } from "../support/echo-service.js";

/** Resolves with the error of a TCP connection attempt to the port (or null if it connected). */
async function connectError(port: number): Promise<NodeJS.ErrnoException | null> {
  const socket = net.connect(port, "127.0.0.1");
  try {
    await once(socket, "connect");
    return null;
  } catch (err) {
    return err as NodeJS.ErrnoException;
  } finally {
    socket.destroy();
  }
}

/**
 * A server whose Echo waits inside the handler until the test releases it, so
 * that a call is surely in flight when stop() begins.
 */
async function startGatedServer(graceMs: number) {
  let entered!: () => void;
  let release!: () => void;
  const inHandler = new Promise<void>((resolve) => (entered = resolve));
  const gate = new Promise<void>((resolve) => (release = resolve));
  const server = await startEchoServer({
    graceMs,
    routes: (router) =>
      router.service(EchoService, {
        ...new EchoServiceImpl(),
        async echo(request) {
          entered();
          await gate;
          return { text: request.text };
        },
      }),
  });
  return { server, inHandler, release };
}

describe("graceful stop", () => {
  const transports: [string, (baseUrl: string) => { transport: Transport; close(): void }][] = [
    [
      "gRPC over HTTP/2",
      (baseUrl) => {
        const sessionManager = new Http2SessionManager(baseUrl);
        return { transport: createGrpcTransport({ baseUrl, sessionManager }), close: () => sessionManager.abort() };
      },
    ],
    [
      "Connect over HTTP/1.1",
      (baseUrl) => {
        const agent = new http.Agent({ keepAlive: true });
        const transport = createConnectTransport({ baseUrl, httpVersion: "1.1", nodeOptions: { agent } });
        return { transport, close: () => agent.destroy() };
      },
    ],
  ];

  for (const [name, makeTransport] of transports) {
    it(`lets an in-flight unary call finish within the grace period, refusing new connections meanwhile (${name})`, async () => {
      const graceMs = 10_000;
      const { server, inHandler, release } = await startGatedServer(graceMs);
      const { port, url } = server.address();
      const { transport, close } = makeTransport(url);
      try {
        const call = createClient(EchoService, transport).echo({ text: "in flight" });
        await inHandler;
        const stopped = server.stop();
        expect((await connectError(port))?.code).toBe("ECONNREFUSED");
        release();
        expect((await call).text).toBe("in flight");
        // Far less than graceMs: stop ends when the last call does.
        await within(3000, stopped, "stop after the last call finished");
      } finally {
        close();
      }
    });
  }

  it("does not wait past graceMs for a bidi stream a client holds open", async () => {
    const graceMs = 300;
    const server = await startEchoServer({ graceMs });
    const sessionManager = new Http2SessionManager(server.address().url);
    try {
      const client = createClient(
        EchoService,
        createGrpcTransport({ baseUrl: server.address().url, sessionManager }),
      );
      const requests = new Pushable<{ text: string }>();
      const responses = client.echoBidiStream(requests)[Symbol.asyncIterator]();
      requests.push({ text: "still here" });
      expect((await responses.next()).value?.text).toBe("still here");

      const began = performance.now();
      await within(graceMs + 2000, server.stop(), "stop with a bidi stream held open");
      expect(performance.now() - began).toBeGreaterThanOrEqual(graceMs - 50);
      // The stream was cut, not left hanging.
      expect(await responses.next().catch((e: unknown) => e)).toBeInstanceOf(ConnectError);
    } finally {
      sessionManager.abort();
    }
  });

  it("sends GOAWAY to an HTTP/2 connection", async () => {
    const server = await startEchoServer();
    const session = http2.connect(server.address().url);
    try {
      await once(session, "remoteSettings");
      const goaway = once(session, "goaway");
      const stopped = server.stop();
      const [code] = (await within(3000, goaway, "GOAWAY")) as [number];
      expect(code).toBe(http2.constants.NGHTTP2_NO_ERROR);
      await within(3000, stopped, "stop with an idle HTTP/2 connection");
    } finally {
      session.destroy();
    }
  });

  it("closes idle HTTP/1.1 keep-alive connections at once", async () => {
    const server = await startEchoServer({ graceMs: 10_000 });
    const agent = new http.Agent({ keepAlive: true });
    try {
      const client = createClient(
        EchoService,
        createConnectTransport({ baseUrl: server.address().url, httpVersion: "1.1", nodeOptions: { agent } }),
      );
      await client.echo({ text: "leaves an idle connection" });
      await within(3000, server.stop(), "stop with an idle HTTP/1.1 connection");
    } finally {
      agent.destroy();
    }
  });

  it("is idempotent, and a stopped server cannot start again", async () => {
    const server = await startEchoServer();
    const first = server.stop();
    expect(server.stop()).toBe(first);
    await first;
    await expect(server.start()).rejects.toThrow("stopped");
  });

  it("resolves for a server that never started", async () => {
    const server = createServer({ name: "idle", logger: silentLogger(), routes: () => {} });
    await within(1000, server.stop(), "stop of a server never started");
    expect(() => server.address()).toThrow("not started");
  });
});

describe("start", () => {
  it("rejects when the port is taken", async () => {
    const first = await startEchoServer();
    const second = createServer({
      name: "second",
      logger: silentLogger(),
      port: first.address().port,
      routes: () => {},
    });
    try {
      await expect(second.start()).rejects.toMatchObject({ code: "EADDRINUSE" });
    } finally {
      await Promise.all([first.stop(), second.stop()]);
    }
  });
});
