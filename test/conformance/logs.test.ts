// Append and Read answer the same over Connect, gRPC-Web and the raw gRPC
// path (stores/log/log-grpc.ts): answers, errors, auth refusals.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { LogService, type AppendRequestSchema, type AppendResponse } from "../../gen/treadmill/log/v1/log_service_pb.js";
import type { ServingComponent } from "../../lib/component.js";
import { makeKeys, startLogServer, tempDir, type Keys } from "../stores/log/helpers.js";
import { bearer, collect, refusals, sameOnAllPaths, stream, threePaths, type PathName, type Clients, type Paths } from "./paths.js";

type AppendInit = MessageInitShape<typeof AppendRequestSchema>;

const hello = (jobId: string, major = 1): AppendInit => ({
  payload: { case: "hello", value: { protocolVersion: { major, minor: 0 }, jobId, attempt: 1, writer: "test" } },
});
const frame = (seq: number, data: string): AppendInit => ({
  payload: { case: "frame", value: { channel: "console", seq: BigInt(seq), captureTime: { seconds: 1_700_000_000n, nanos: seq }, data: Buffer.from(data) } },
});

/** An Append stream's responses, acks reduced to the last acknowledged seq (their batching is timing). */
function summary(responses: AppendResponse[]) {
  let acked = 0n;
  const others = [];
  for (const { payload } of responses) {
    if (payload.case === "ack") acked = payload.value.seq > acked ? payload.value.seq : acked;
    else others.push(payload);
  }
  return { acked, others };
}

describe("the log server's Append and Read on every path", () => {
  let dir: Awaited<ReturnType<typeof tempDir>>;
  let keys: Keys;
  let server: ServingComponent;
  let paths: Paths;
  let clients: Clients<typeof LogService>;

  beforeAll(async () => {
    dir = await tempDir();
    keys = await makeKeys({ audience: "log" });
    server = await startLogServer(dir.path, keys);
    paths = threePaths(server.address().url);
    clients = paths.clients(LogService);
  });

  afterAll(async () => {
    paths?.close();
    await server?.stop();
    await dir?.remove();
  });

  const writeToken = async (jobId: string) => bearer(await keys.token({ scope: "log:write", job: jobId }));
  const readToken = async (jobId: string) => bearer(await keys.token({ scope: "log:read", job: jobId }));

  it("answers Append and Read alike: welcome, acknowledgements, rejections, frames and the end", async () => {
    const job = (path: PathName) => `conformance-${path}`;
    const appended = await sameOnAllPaths(async (path) =>
      summary(
        await collect(
          clients[path].append(stream(hello(job(path)), frame(1, "one\n"), frame(2, ""), frame(2, "two\n")), await writeToken(job(path))),
        ),
      ),
    );
    expect(appended).toMatchObject({ answer: { acked: 2n, others: [{ case: "welcome" }, { case: "rejection" }] } });
    // Each path reads what each path wrote.
    for (const writer of ["connect", "grpc-web", "grpc"] as const) {
      const read = await sameOnAllPaths(async (path) =>
        (await collect(clients[path].read({ jobId: job(writer), channel: "console" }, await readToken(job(writer))))).map((r) => r.payload),
      );
      expect(read).toMatchObject({
        answer: [
          { case: "frame", value: { seq: 1n, offset: 0n, data: Buffer.from("one\n") } },
          { case: "frame", value: { seq: 2n, offset: 4n, data: Buffer.from("two\n") } },
          { case: "end", value: { nextSeq: 3n, nextOffset: 8n } },
        ],
      });
    }
  });

  it("fails bad Append and Read requests with the same codes and messages", async () => {
    const token = await writeToken("bad-requests");
    expect(await sameOnAllPaths((path) => collect(clients[path].append(stream(frame(1, "x")), token)))).toEqual({
      code: "InvalidArgument",
      message: "first append message must be a hello",
    });
    expect(await sameOnAllPaths((path) => collect(clients[path].append(stream(hello("bad-requests", 2)), token)))).toMatchObject({
      code: "FailedPrecondition",
    });
    expect(await sameOnAllPaths((path) => collect(clients[path].append(stream(hello("")), token)))).toMatchObject({ code: "InvalidArgument" });
    const read = await readToken("bad-requests");
    expect(await sameOnAllPaths((path) => collect(clients[path].read({ jobId: "bad-requests", channel: "console" }, read)))).toMatchObject({
      code: "NotFound",
    });
    expect(await sameOnAllPaths((path) => collect(clients[path].read({ jobId: "bad-requests", channel: "Console" }, read)))).toMatchObject({
      code: "InvalidArgument",
    });
  });

  it("refuses callers without a token, with a malformed one, or with a token of another kind, alike", async () => {
    const imageToken = await keys.token({ scope: "image:write" });
    for (const { name, options } of refusals(imageToken)) {
      const appendOutcome = await sameOnAllPaths((path) => collect(clients[path].append(stream(hello("refused"), frame(1, "x")), options)));
      const readOutcome = await sameOnAllPaths((path) => collect(clients[path].read({ jobId: "refused", channel: "console" }, options)));
      const expected = name === "wrong kind" ? "PermissionDenied" : "Unauthenticated";
      expect([name, appendOutcome]).toEqual([name, expect.objectContaining({ code: expected })]);
      expect([name, readOutcome]).toEqual([name, expect.objectContaining({ code: expected })]);
    }
  });
});
