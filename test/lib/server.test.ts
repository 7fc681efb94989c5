import http from "node:http";
import { once } from "node:events";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import {
  Http2SessionManager,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import {
  EchoBidiStreamRequestSchema,
  EchoBidiStreamResponseSchema,
  EchoClientStreamRequestSchema,
  EchoClientStreamResponseSchema,
  EchoRequestSchema,
  EchoResponseSchema,
  EchoServerStreamRequestSchema,
  EchoServerStreamResponseSchema,
  EchoService,
} from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import type { Server } from "../../lib/server.js";
import { Pushable, startEchoServer } from "../support/echo-service.js";

/** A connect-node transport and how to release its connections. */
interface TestTransport {
  name: string;
  /** HTTP/1.1 cannot carry a full-duplex stream. */
  fullDuplex: boolean;
  transport: Transport;
  close(): void;
}

function connectNodeTransports(baseUrl: string): TestTransport[] {
  const h2 = (make: (sessionManager: Http2SessionManager) => Transport, name: string): TestTransport => {
    const sessionManager = new Http2SessionManager(baseUrl);
    return { name, fullDuplex: true, transport: make(sessionManager), close: () => sessionManager.abort() };
  };
  const h1 = (make: (agent: http.Agent) => Transport, name: string): TestTransport => {
    const agent = new http.Agent({ keepAlive: true });
    return { name, fullDuplex: false, transport: make(agent), close: () => agent.destroy() };
  };
  return [
    h2((sessionManager) => createGrpcTransport({ baseUrl, sessionManager }), "gRPC over HTTP/2"),
    h2(
      (sessionManager) => createConnectTransport({ baseUrl, httpVersion: "2", sessionManager }),
      "Connect over HTTP/2",
    ),
    h1((agent) => createConnectTransport({ baseUrl, httpVersion: "1.1", nodeOptions: { agent } }), "Connect over HTTP/1.1"),
    h2(
      (sessionManager) => createGrpcWebTransport({ baseUrl, httpVersion: "2", sessionManager }),
      "gRPC-Web over HTTP/2",
    ),
    h1((agent) => createGrpcWebTransport({ baseUrl, httpVersion: "1.1", nodeOptions: { agent } }), "gRPC-Web over HTTP/1.1"),
  ];
}

describe("one port serves every protocol", () => {
  let server: Server;
  let transports: TestTransport[];

  beforeAll(async () => {
    server = await startEchoServer();
    transports = connectNodeTransports(server.address().url);
  });
  afterAll(async () => {
    transports.forEach((t) => t.close());
    await server.stop();
  });

  // Each case runs against every transport; names are filled in at run time.
  const forEachTransport = (
    what: string,
    test: (t: TestTransport, client: Client<typeof EchoService>) => Promise<void>,
    fullDuplexOnly = false,
  ) => {
    it(`${what} (${fullDuplexOnly ? "every HTTP/2" : "every connect-node"} transport)`, async () => {
      for (const t of transports.filter((t) => t.fullDuplex || !fullDuplexOnly)) {
        try {
          await test(t, createClient(EchoService, t.transport));
        } catch (err) {
          throw new Error(`${t.name}: ${String(err)}`, { cause: err });
        }
      }
    });
  };

  forEachTransport("a unary call returns the text", async (_t, client) => {
    expect((await client.echo({ text: "hello" })).text).toBe("hello");
  });

  forEachTransport("a server stream delivers every message in order", async (_t, client) => {
    const received = [];
    for await (const response of client.echoServerStream({ text: "s", count: 3 })) {
      received.push([response.text, response.index]);
    }
    expect(received).toEqual([
      ["s", 0],
      ["s", 1],
      ["s", 2],
    ]);
  });

  forEachTransport("a client stream is concatenated", async (_t, client) => {
    async function* requests() {
      yield { text: "a" };
      yield { text: "b" };
      yield { text: "c" };
    }
    const response = await client.echoClientStream(requests());
    expect([response.text, response.count]).toEqual(["abc", 3]);
  });

  forEachTransport("a bidi stream answers each message before the next is sent", async (_t, client) => {
    const requests = new Pushable<{ text: string }>();
    const responses = client.echoBidiStream(requests)[Symbol.asyncIterator]();
    for (const text of ["one", "two"]) {
      requests.push({ text });
      expect((await responses.next()).value?.text).toBe(text);
    }
    requests.end();
    expect((await responses.next()).done).toBe(true);
  }, true);

  forEachTransport("a fail_code becomes that status code", async (_t, client) => {
    const failure = await client.echo({ text: "x", failCode: Code.NotFound }).catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(ConnectError);
    expect((failure as ConnectError).code).toBe(Code.NotFound);
    expect((failure as ConnectError).rawMessage).toBe("echo failed as asked: x");
  });
});

describe("a grpc-js client", () => {
  let server: Server;
  let client: grpc.Client;

  beforeAll(async () => {
    server = await startEchoServer();
    client = new grpc.Client(`127.0.0.1:${server.address().port}`, grpc.credentials.createInsecure());
  });
  afterAll(async () => {
    client.close();
    await server.stop();
  });

  const path = (method: string) => `/${EchoService.typeName}/${method}`;
  const codec = <T extends DescMessage>(schema: T) => ({
    serialize: (message: MessageShape<T>) => Buffer.from(toBinary(schema, message)),
    deserialize: (bytes: Buffer) => fromBinary(schema, bytes),
  });
  const req = codec(EchoRequestSchema);
  const res = codec(EchoResponseSchema);

  const unary = (text: string, failCode = 0) =>
    new Promise<string>((resolve, reject) => {
      const message = { $typeName: EchoRequestSchema.typeName, text, failCode } as const;
      client.makeUnaryRequest(path("Echo"), req.serialize, res.deserialize, message, (err, value) =>
        err ? reject(err) : resolve(value!.text),
      );
    });

  it("makes a unary call", async () => {
    expect(await unary("hi")).toBe("hi");
  });

  it("receives a fail_code as the gRPC status", async () => {
    const failure = (await unary("x", Code.PermissionDenied).catch((e: unknown) => e)) as grpc.ServiceError;
    expect(failure.code).toBe(grpc.status.PERMISSION_DENIED);
    // connect-es percent-encodes grpc-message with encodeURIComponent; grpc-js
    // decodes it with decodeURI, which leaves reserved characters (":", "/",
    // "?", ...) encoded. The message is intact once fully decoded.
    expect(decodeURIComponent(failure.details)).toBe("echo failed as asked: x");
  });

  it("reads a server stream", async () => {
    const { serialize } = codec(EchoServerStreamRequestSchema);
    const { deserialize } = codec(EchoServerStreamResponseSchema);
    const call = client.makeServerStreamRequest(path("EchoServerStream"), serialize, deserialize, {
      $typeName: EchoServerStreamRequestSchema.typeName,
      text: "s",
      count: 2,
      intervalMs: 0,
    });
    const indexes = [];
    for await (const message of call) indexes.push((message as MessageShape<typeof EchoServerStreamResponseSchema>).index);
    expect(indexes).toEqual([0, 1]);
  });

  it("sends a client stream", async () => {
    const { serialize } = codec(EchoClientStreamRequestSchema);
    const { deserialize } = codec(EchoClientStreamResponseSchema);
    const result = new Promise<MessageShape<typeof EchoClientStreamResponseSchema>>((resolve, reject) => {
      const call = client.makeClientStreamRequest(path("EchoClientStream"), serialize, deserialize, (err, value) =>
        err ? reject(err) : resolve(value!),
      );
      for (const text of ["x", "y"]) call.write({ $typeName: EchoClientStreamRequestSchema.typeName, text });
      call.end();
    });
    expect(await result).toMatchObject({ text: "xy", count: 2 });
  });

  it("holds a full-duplex bidi stream", async () => {
    const { serialize } = codec(EchoBidiStreamRequestSchema);
    const { deserialize } = codec(EchoBidiStreamResponseSchema);
    const call = client.makeBidiStreamRequest(path("EchoBidiStream"), serialize, deserialize);
    for (const text of ["ping", "pong"]) {
      call.write({ $typeName: EchoBidiStreamRequestSchema.typeName, text });
      const [message] = (await once(call, "data")) as [MessageShape<typeof EchoBidiStreamResponseSchema>];
      expect(message.text).toBe(text);
    }
    call.end();
    await once(call, "status");
  });
});
