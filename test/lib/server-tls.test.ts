import https from "node:https";
import tls from "node:tls";
import { once } from "node:events";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createClient } from "@connectrpc/connect";
import { Http2SessionManager, createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  EchoRequestSchema,
  EchoResponseSchema,
  EchoService,
} from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import type { Server } from "../../lib/server.js";
import { Pushable, startEchoServer } from "../support/echo-service.js";
import { createTestCertificate, type TestCertificate } from "../support/tls.js";

describe("TLS with ALPN", () => {
  let certificate: TestCertificate;
  let server: Server;

  beforeAll(async () => {
    certificate = await createTestCertificate();
    server = await startEchoServer({ tls: certificate });
  });
  afterAll(() => server.stop());

  it("advertises an https url", () => {
    expect(server.address().url).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
  });

  it("negotiates h2 or http/1.1, whichever the client offers", async () => {
    const negotiate = async (protocols: string[]) => {
      const socket = tls.connect({
        host: "127.0.0.1",
        port: server.address().port,
        ca: certificate.cert,
        ALPNProtocols: protocols,
      });
      await once(socket, "secureConnect");
      socket.destroy();
      return socket.alpnProtocol;
    };
    expect(await negotiate(["h2", "http/1.1"])).toBe("h2");
    expect(await negotiate(["http/1.1"])).toBe("http/1.1");
  });

  it("serves gRPC over h2, including a bidi stream", async () => {
    const sessionManager = new Http2SessionManager(server.address().url, undefined, { ca: certificate.cert });
    try {
      const client = createClient(
        EchoService,
        createGrpcTransport({ baseUrl: server.address().url, sessionManager }),
      );
      expect((await client.echo({ text: "over h2" })).text).toBe("over h2");
      const requests = new Pushable<{ text: string }>();
      const responses = client.echoBidiStream(requests)[Symbol.asyncIterator]();
      requests.push({ text: "duplex" });
      expect((await responses.next()).value?.text).toBe("duplex");
      requests.end();
      expect((await responses.next()).done).toBe(true);
    } finally {
      sessionManager.abort();
    }
  });

  it("serves Connect over HTTP/1.1 on the same port, with or without ALPN", async () => {
    for (const ALPNProtocols of [["http/1.1"], undefined]) {
      const agent = new https.Agent({ keepAlive: true, ca: certificate.cert, ALPNProtocols });
      try {
        const client = createClient(
          EchoService,
          createConnectTransport({ baseUrl: server.address().url, httpVersion: "1.1", nodeOptions: { agent } }),
        );
        expect((await client.echo({ text: "over http/1.1" })).text).toBe("over http/1.1");
        const [socket] = Object.values(agent.freeSockets).flat() as tls.TLSSocket[];
        expect(socket.alpnProtocol).toBe(ALPNProtocols ? "http/1.1" : false);
      } finally {
        agent.destroy();
      }
    }
  });

  it("serves a grpc-js client with TLS credentials", async () => {
    const client = new grpc.Client(
      `127.0.0.1:${server.address().port}`,
      grpc.credentials.createSsl(certificate.cert),
    );
    try {
      const text = await new Promise<string>((resolve, reject) =>
        client.makeUnaryRequest(
          `/${EchoService.typeName}/Echo`,
          (m: { text: string }) => Buffer.from(toBinary(EchoRequestSchema, { $typeName: EchoRequestSchema.typeName, text: m.text, failCode: 0 })),
          (b: Buffer) => fromBinary(EchoResponseSchema, b),
          { text: "grpc-js over tls" },
          (err, value) => (err ? reject(err) : resolve(value!.text)),
        ),
      );
      expect(text).toBe("grpc-js over tls");
    } finally {
      client.close();
    }
  });
});
