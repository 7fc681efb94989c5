import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { create, createFileRegistry, fromBinary, type DescMethodUnary, type DescService, type MessageInitShape } from "@bufbuild/protobuf";
import {
  FieldDescriptorProto_Label,
  FieldDescriptorProto_Type,
  FileDescriptorProtoSchema,
  file_google_protobuf_timestamp,
  timestampFromMs,
} from "@bufbuild/protobuf/wkt";
import { Code, createClient, type ConnectRouter } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import {
  ServerReflection,
  type ServerReflectionRequestSchema,
  type ServerReflectionResponse,
} from "../../gen/grpc/reflection/v1/reflection_pb.js";
import { EchoService } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import type { Server } from "../../lib/server.js";
import { EchoServiceImpl, Pushable, startEchoServer } from "../support/echo-service.js";

const BUF = new URL("../../node_modules/.bin/buf", import.meta.url).pathname;
const CLOCK_TIME_MS = Date.UTC(2024, 0, 2, 3, 4, 5);

/**
 * A service built at run time whose file imports google/protobuf/timestamp.proto,
 * so that reflection must send a dependency with it (EchoService imports nothing).
 */
function clockService(): DescService {
  const proto = create(FileDescriptorProtoSchema, {
    name: "test/clock/v1/clock_service.proto",
    package: "test.clock.v1",
    syntax: "proto3",
    dependency: ["google/protobuf/timestamp.proto"],
    messageType: [
      { name: "NowRequest" },
      {
        name: "NowResponse",
        field: [
          {
            name: "time",
            jsonName: "time",
            number: 1,
            label: FieldDescriptorProto_Label.OPTIONAL,
            type: FieldDescriptorProto_Type.MESSAGE,
            typeName: ".google.protobuf.Timestamp",
          },
        ],
      },
    ],
    service: [
      {
        name: "ClockService",
        method: [{ name: "Now", inputType: ".test.clock.v1.NowRequest", outputType: ".test.clock.v1.NowResponse" }],
      },
    ],
  });
  const registry = createFileRegistry(proto, (name) =>
    name === file_google_protobuf_timestamp.proto.name ? file_google_protobuf_timestamp : undefined,
  );
  return registry.getService("test.clock.v1.ClockService")!;
}

function routes(router: ConnectRouter) {
  router.service(EchoService, new EchoServiceImpl());
  const now = clockService().methods[0] as DescMethodUnary;
  router.rpc(now, () => create(now.output, { time: timestampFromMs(CLOCK_TIME_MS) }));
}

describe("gRPC server reflection", () => {
  let server: Server;

  beforeAll(async () => {
    server = await startEchoServer({ routes });
  });
  afterAll(() => server.stop());

  /** Runs `buf curl` over gRPC with HTTP/2 prior knowledge; its standard output. */
  async function bufCurl(...args: string[]): Promise<string> {
    const { stdout } = await promisify(execFile)(
      BUF,
      ["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...args],
      { timeout: 20_000 },
    );
    return stdout;
  }

  const everyService = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "test.clock.v1.ClockService",
    "treadmill.testing.v1.EchoService",
  ];

  for (const version of ["grpc-v1", "grpc-v1alpha"]) {
    it(`lists every service to buf curl (${version})`, async () => {
      const out = await bufCurl("--reflect-protocol", version, "--list-services", server.address().url);
      expect(out.trim().split("\n").sort()).toEqual(everyService);
    });

    it(`lets buf curl call Echo by reflection (${version})`, async () => {
      const out = await bufCurl(
        "--reflect-protocol",
        version,
        "-d",
        '{"text":"hi"}',
        `${server.address().url}/treadmill.testing.v1.EchoService/Echo`,
      );
      expect(JSON.parse(out)).toEqual({ text: "hi" });
    });
  }

  it("lets buf curl call a method whose messages need a well-known dependency", async () => {
    const out = await bufCurl("-d", "{}", `${server.address().url}/test.clock.v1.ClockService/Now`);
    expect(JSON.parse(out)).toEqual({ time: "2024-01-02T03:04:05Z" });
  });

  describe("answered directly", () => {
    let sessionManager: Http2SessionManager;
    let requests: Pushable<MessageInitShape<typeof ServerReflectionRequestSchema>>;
    let ask: (request: MessageInitShape<typeof ServerReflectionRequestSchema>) => Promise<ServerReflectionResponse>;

    beforeAll(() => {
      sessionManager = new Http2SessionManager(server.address().url);
      const client = createClient(
        ServerReflection,
        createGrpcTransport({ baseUrl: server.address().url, sessionManager }),
      );
      // One stream carries every question; each gets one answer, in order.
      requests = new Pushable();
      const responses = client.serverReflectionInfo(requests)[Symbol.asyncIterator]();
      ask = async (request) => {
        requests.push(request);
        const { value, done } = await responses.next();
        if (done) throw new Error("reflection stream ended");
        return value;
      };
    });
    afterAll(() => {
      requests.end();
      sessionManager.abort();
    });

    const fileNames = ({ messageResponse }: ServerReflectionResponse) => {
      if (messageResponse.case !== "fileDescriptorResponse") throw new Error(`got ${messageResponse.case}`);
      return messageResponse.value.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b).name);
    };

    it("returns the file containing a symbol, then its transitive dependencies", async () => {
      const response = await ask({ messageRequest: { case: "fileContainingSymbol", value: "test.clock.v1.ClockService" } });
      expect(fileNames(response)).toEqual(["test/clock/v1/clock_service.proto", "google/protobuf/timestamp.proto"]);
    });

    it("finds messages and methods as symbols, and files by name", async () => {
      expect(
        fileNames(await ask({ messageRequest: { case: "fileContainingSymbol", value: "treadmill.testing.v1.EchoRequest" } })),
      ).toEqual(["treadmill/testing/v1/echo_service.proto"]);
      expect(
        fileNames(
          await ask({ messageRequest: { case: "fileContainingSymbol", value: "treadmill.testing.v1.EchoService.Echo" } }),
        ),
      ).toEqual(["treadmill/testing/v1/echo_service.proto"]);
      expect(
        fileNames(await ask({ messageRequest: { case: "fileByFilename", value: "google/protobuf/timestamp.proto" } })),
      ).toEqual(["google/protobuf/timestamp.proto"]);
    });

    it("answers an unknown symbol or file with an error_response NOT_FOUND, keeping the stream open", async () => {
      for (const messageRequest of [
        { case: "fileContainingSymbol", value: "no.such.Symbol" },
        { case: "fileByFilename", value: "no/such/file.proto" },
      ] as const) {
        const response = await ask({ host: "h", messageRequest });
        expect(response.validHost).toBe("h");
        expect(response.messageResponse).toMatchObject({ case: "errorResponse", value: { errorCode: Code.NotFound } });
      }
    });
  });
});
