import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import type { ClientHttp2Session } from "node:http2";
import { connectHttp2, openRawCall } from "../../lib/grpc/client.js";
import type { Server } from "../../lib/server.js";
import { EchoService } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import { protobufCodec } from "../../lib/grpc/codec.js";
import { clientStreamingRoute, createRawGrpcHandler, procedureOf, rawProcedure } from "../../lib/grpc/server.js";
import { frame } from "../../lib/grpc/wire.js";
import { EchoServiceImpl, startEchoServer } from "../support/echo-service.js";
import { createLogger } from "../../lib/logger.js";

// Hand-framed procedures on the paths of EchoService's methods.
const ECHO = procedureOf(EchoService.method.echoBidiStream);
const FAIL = procedureOf(EchoService.method.echo);
const HANG = procedureOf(EchoService.method.echoServerStream);

/** The call's messages, or the ConnectError it ended with. */
async function outcome(session: ClientHttp2Session, path: string, messages: Uint8Array[], headers: Record<string, string> = {}) {
  const call = openRawCall(session, path, headers, { maxMessageBytes: 1 << 20 });
  for (const m of messages) call.write(m);
  call.end();
  const received: string[] = [];
  try {
    for await (const m of call.messages()) received.push(Buffer.from(m).toString());
    return { received, error: undefined };
  } catch (err) {
    return { received, error: ConnectError.from(err) };
  }
}

describe("hand-written gRPC procedures (lib/grpc/server.ts)", () => {
  let server: Server;
  let session: ClientHttp2Session;

  beforeAll(async () => {
    const logger = createLogger({ level: "silent" });
    server = await startEchoServer({
      logger,
      http: createRawGrpcHandler({
        routes: [
          rawProcedure(EchoService.method.echoBidiStream, async (call) => {
            for await (const m of call.messages()) await call.write(frame(Buffer.from(`echo:${Buffer.from(m).toString()}`)));
          }),
          rawProcedure(EchoService.method.echo, () => Promise.reject(new ConnectError("no such thing: 100% gone", Code.NotFound))),
          rawProcedure(
            EchoService.method.echoServerStream,
            ({ context: { signal } }) => new Promise((_resolve, reject) => signal.addEventListener("abort", () => reject(signal.reason))),
          ),
        ],
        maxMessageBytes: 64,
      }),
    });
    session = connectHttp2(server.address().url);
  });

  afterAll(async () => {
    session?.close();
    await server?.stop();
  });

  it("answers a stream of messages in order and ends with OK", async () => {
    const r = await outcome(session, ECHO, [frame(Buffer.from("a")), frame(Buffer.from("")), frame(Buffer.from("ccc"))]);
    expect(r.error).toBeUndefined();
    expect(r.received).toEqual(["echo:a", "echo:", "echo:ccc"]);
  });

  it("sends a procedure's ConnectError as grpc-status and a percent-encoded grpc-message", async () => {
    const r = await outcome(session, FAIL, []);
    expect(r.error?.code).toBe(Code.NotFound);
    expect(r.error?.rawMessage).toBe("no such thing: 100% gone");
  });

  it("refuses oversized and compressed messages, and a malformed grpc-timeout", async () => {
    expect((await outcome(session, ECHO, [frame(Buffer.alloc(65))])).error?.code).toBe(Code.ResourceExhausted);
    const compressed = frame(Buffer.from("x"));
    compressed[0] = 1;
    expect((await outcome(session, ECHO, [compressed])).error?.code).toBe(Code.InvalidArgument);
    expect((await outcome(session, ECHO, [], { "grpc-timeout": "soon" })).error?.code).toBe(Code.InvalidArgument);
  });

  it("ends a call at its grpc-timeout with DeadlineExceeded", async () => {
    const r = await outcome(session, HANG, [], { "grpc-timeout": "200m" });
    expect(r.error?.code).toBe(Code.DeadlineExceeded);
  });

  it("counts every call in the server's RPC metrics, as Connect-served calls are", async () => {
    const text = await (await fetch(`${server.address().url}/metrics`)).text();
    const count = (procedure: string, code: string) => {
      const line = text.split("\n").find((l) => l.startsWith("treadmill_rpc_requests_total{") && l.includes(`procedure="${procedure}"`) && l.includes(`code="${code}"`));
      return line === undefined ? 0 : Number(line.split(" ").pop());
    };
    expect(count(ECHO, "OK")).toBe(1);
    expect(count(FAIL, "NotFound")).toBe(1);
    expect(count(ECHO, "ResourceExhausted")).toBe(1);
    expect(count(HANG, "DeadlineExceeded")).toBe(1);
  });
});

describe("raw routes (lib/grpc/server.ts calling a ServiceImpl method)", () => {
  const SECRET = "connection to db-7 refused, password hunter2";
  const lines: { level: number; msg: string; procedure?: string; code?: string; err?: { message: string } }[] = [];
  let server: Server;
  let sessions: Http2SessionManager;
  let client: Client<typeof EchoService>;

  beforeAll(async () => {
    const logger = createLogger({ level: "info", destination: { write: (line: string) => void lines.push(JSON.parse(line)) } });
    const echo = new EchoServiceImpl();
    server = await startEchoServer({
      logger,
      bulkProcedures: [procedureOf(EchoService.method.echoClientStream)],
      http: createRawGrpcHandler({
        routes: [
          clientStreamingRoute(
            EchoService.method.echoClientStream,
            protobufCodec(EchoService.method.echoClientStream.input, EchoService.method.echoClientStream.output),
            async (requests, context) => {
              if (context.requestHeader.get("x-fail") !== null) throw new Error(SECRET);
              return echo.echoClientStream(requests);
            },
          ),
        ],
        maxMessageBytes: 1024,
      }),
    });
    sessions = new Http2SessionManager(server.address().url);
    client = createClient(EchoService, createGrpcTransport({ baseUrl: server.address().url, sessionManager: sessions }));
  });

  afterAll(async () => {
    sessions?.abort();
    await server?.stop();
  });

  it("answers with what the method returns", async () => {
    const answer = await client.echoClientStream(
      (async function* () {
        yield { text: "a" };
        yield { text: "bc" };
      })(),
    );
    expect({ text: answer.text, count: answer.count }).toEqual({ text: "abc", count: 2 });
  });

  it("sends a failure that is not a ConnectError as Internal and logs its cause, as the Connect interceptor does", async () => {
    const failure = await client.echoClientStream((async function* () {})(), { headers: { "x-fail": "1" } }).then(
      () => undefined,
      (err: unknown) => ConnectError.from(err),
    );
    expect(failure?.code).toBe(Code.Internal);
    expect(failure?.rawMessage).toBe("internal error");
    const line = lines.find((l) => l.msg === "rpc failed" && l.procedure === procedureOf(EchoService.method.echoClientStream));
    expect(line).toMatchObject({ level: 50, code: "Internal", err: { message: SECRET } });
  });
});
