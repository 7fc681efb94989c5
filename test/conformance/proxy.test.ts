// Dial and Tunnel answer the same over Connect, gRPC-Web and the raw gRPC
// path (proxy/rpc-side.ts): answers, errors, auth refusals.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { RendezvousService } from "../../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import { TunnelService, type DialRequestSchema, type DialResponse } from "../../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import type { TunnelRequestSchema } from "../../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import type { Proxy } from "../../proxy/proxy.js";
import type { Exposer } from "../../supervisor/exposer.js";
import { dialToken, exposeJob, makeKeys, startEchoServer, startProxy, type Keys } from "../proxy/helpers.js";
import { bearer, collect, outcome, refusals, sameOnAllPaths, stream, threePaths, type Clients, type Paths } from "./paths.js";
import { waitUntil } from "../support/wait.js";

type DialInit = MessageInitShape<typeof DialRequestSchema>;
type TunnelInit = MessageInitShape<typeof TunnelRequestSchema>;

const open = (jobId: string, portName: string): DialInit => ({
  payload: { case: "open", value: { protocolVersion: { major: 1, minor: 0 }, jobId, portName } },
});

/** A Dial's responses, data joined (its batching is timing). */
function summary(responses: DialResponse[]) {
  let data = "";
  const others = [];
  for (const { payload } of responses) {
    if (payload.case === "data") data += Buffer.from(payload.value).toString();
    else if (payload.case === "opened") others.push({ case: "opened", exposure: payload.value.exposure?.name });
    else others.push(payload);
  }
  return { data, others };
}

describe("the proxy's Dial and Tunnel on every path", () => {
  let keys: Keys;
  let proxy: Proxy;
  let echo: Awaited<ReturnType<typeof startEchoServer>>;
  let exposer: Exposer;
  let paths: Paths;
  let dial: Clients<typeof TunnelService>;
  let rendezvous: Clients<typeof RendezvousService>;

  beforeAll(async () => {
    keys = await makeKeys();
    proxy = await startProxy(keys);
    echo = await startEchoServer();
    exposer = await exposeJob(proxy.address().url, keys, "conformance", [{ name: "echo", host: "127.0.0.1", port: echo.port, kind: "tcp" }]);
    await waitUntil(() => exposer.connected() && proxy.sessionCount() === 1, "the exposer connected");
    paths = threePaths(proxy.address().url);
    dial = paths.clients(TunnelService);
    rendezvous = paths.clients(RendezvousService);
  });

  afterAll(async () => {
    paths?.close();
    await exposer?.stop();
    await proxy?.stop();
    await echo?.close();
  });

  it("carries a Dial alike: opened, the bytes echoed, the close", async () => {
    const token = bearer(await dialToken(keys, "conformance", "echo"));
    const requests = (): AsyncIterable<DialInit> =>
      stream(open("conformance", "echo"), { payload: { case: "data", value: Buffer.from("ping") } }, { payload: { case: "halfClose", value: {} } });
    // The exposure's announcement may trail the exposer's connection.
    for (let i = 0; i < 100 && "code" in (await outcome(() => collect(dial.grpc.dial(requests(), token)))); i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const answer = await sameOnAllPaths(async (path) => summary(await collect(dial[path].dial(requests(), token))));
    expect(answer).toMatchObject({
      answer: {
        data: "ping",
        others: [{ case: "opened", exposure: "echo" }, { case: "halfClose" }, { case: "closed", value: { message: "both sides finished" } }],
      },
    });
  });

  it("fails bad Dial and Tunnel requests with the same codes and messages", async () => {
    const token = bearer(await dialToken(keys, "conformance", "echo"));
    expect(await sameOnAllPaths((path) => collect(dial[path].dial(stream<DialInit>({ payload: { case: "data", value: Buffer.from("x") } }), token)))).toEqual({
      code: "InvalidArgument",
      message: "the first message must be open",
    });
    expect(await sameOnAllPaths((path) => collect(dial[path].dial(stream(open("conformance", "Not A Port")), token)))).toMatchObject({
      code: "InvalidArgument",
    });
    const nowhere = bearer(await dialToken(keys, "no-such-job", "echo"));
    expect(await sameOnAllPaths((path) => collect(dial[path].dial(stream(open("no-such-job", "echo")), nowhere)))).toMatchObject({
      code: "Unavailable",
    });
    const expose = bearer(await keys.token({ scope: "tunnel:expose", job: "conformance" }));
    const tunnelOpen = (connectionId: string): TunnelInit => ({
      payload: { case: "open", value: { protocolVersion: { major: 1, minor: 0 }, connectionId, jobId: "conformance" } },
    });
    expect(await sameOnAllPaths((path) => collect(rendezvous[path].tunnel(stream(tunnelOpen("")), expose)))).toEqual({
      code: "InvalidArgument",
      message: "open.connection_id is required",
    });
    expect(await sameOnAllPaths((path) => collect(rendezvous[path].tunnel(stream<TunnelInit>({ payload: { case: "halfClose", value: {} } }), expose)))).toEqual({
      code: "InvalidArgument",
      message: "the first message must be open",
    });
  });

  it("refuses callers without a token, with a malformed one, or with a token of another kind, alike", async () => {
    const logToken = await keys.token({ scope: "log:read", job: "conformance" });
    for (const { name, options } of refusals(logToken)) {
      const dialOutcome = await sameOnAllPaths((path) => collect(dial[path].dial(stream(open("conformance", "echo")), options)));
      const tunnelOutcome = await sameOnAllPaths((path) => collect(rendezvous[path].tunnel(stream<TunnelInit>(), options)));
      const expected = name === "wrong kind" ? "PermissionDenied" : "Unauthenticated";
      expect([name, dialOutcome]).toEqual([name, expect.objectContaining({ code: expected })]);
      expect([name, tunnelOutcome]).toEqual([name, expect.objectContaining({ code: expected })]);
    }
  });
});
