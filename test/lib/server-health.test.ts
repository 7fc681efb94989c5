import { afterEach, beforeEach, describe, expect, it } from "@jest/globals";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";
import { EchoService } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import { ServingStatus, type Server } from "../../lib/server.js";
import { startEchoServer, within } from "../support/echo-service.js";

describe("grpc.health.v1.Health", () => {
  let server: Server;
  let sessions: Http2SessionManager;
  let health: Client<typeof Health>;

  beforeEach(async () => {
    server = await startEchoServer({ graceMs: 10_000 });
    sessions = new Http2SessionManager(server.address().url);
    health = createClient(Health, createGrpcTransport({ baseUrl: server.address().url, sessionManager: sessions }));
  });
  afterEach(async () => {
    sessions.abort();
    await server.stop();
  });

  it("reports the server and each registered service SERVING", async () => {
    expect((await health.check({ service: "" })).status).toBe(Status.SERVING);
    expect((await health.check({ service: EchoService.typeName })).status).toBe(Status.SERVING);
    const { statuses } = await health.list({});
    expect(Object.keys(statuses)).toEqual(
      expect.arrayContaining(["", EchoService.typeName, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"]),
    );
  });

  it("answers NotFound for an unknown service", async () => {
    const failure = await health.check({ service: "no.such.Service" }).catch((e: unknown) => e);
    expect(ConnectError.from(failure).code).toBe(Code.NotFound);
  });

  it("reports a status a component sets", async () => {
    server.health.setStatus(EchoService.typeName, ServingStatus.NOT_SERVING);
    expect((await health.check({ service: EchoService.typeName })).status).toBe(Status.NOT_SERVING);
  });

  it("watches: the current status at once, then each change", async () => {
    const abort = new AbortController();
    const watch = health.watch({ service: EchoService.typeName }, { signal: abort.signal })[Symbol.asyncIterator]();
    expect((await watch.next()).value?.status).toBe(Status.SERVING);
    server.health.setStatus(EchoService.typeName, ServingStatus.NOT_SERVING);
    expect((await watch.next()).value?.status).toBe(Status.NOT_SERVING);
    server.health.setStatus(EchoService.typeName, ServingStatus.SERVING);
    expect((await watch.next()).value?.status).toBe(Status.SERVING);
    abort.abort();
  });

  it("watches an unknown service as SERVICE_UNKNOWN until it is reported", async () => {
    const abort = new AbortController();
    const watch = health.watch({ service: "later.Service" }, { signal: abort.signal })[Symbol.asyncIterator]();
    expect((await watch.next()).value?.status).toBe(Status.SERVICE_UNKNOWN);
    server.health.setStatus("later.Service", ServingStatus.SERVING);
    expect((await watch.next()).value?.status).toBe(Status.SERVING);
    abort.abort();
  });

  it("goes NOT_SERVING when stop begins, and a watch neither misses it nor holds stop() for the grace period", async () => {
    const watch = health.watch({ service: "" })[Symbol.asyncIterator]();
    expect((await watch.next()).value?.status).toBe(Status.SERVING);
    const stopped = server.stop();
    expect(server.health.get("")).toBe(ServingStatus.NOT_SERVING);
    expect((await watch.next()).value?.status).toBe(Status.NOT_SERVING);
    const end = await watch.next().catch((e: unknown) => e);
    expect(ConnectError.from(end).code).toBe(Code.Unavailable);
    // graceMs is 10 s: finishing well within it shows the watch did not hold the drain.
    await within(3000, stopped, "stop with a health watch open");
  });

  it("ignores a status set after stop began", async () => {
    await server.stop();
    server.health.setStatus("", ServingStatus.SERVING);
    expect(server.health.get("")).toBe(ServingStatus.NOT_SERVING);
  });
});
