/**
 * Every RPC authenticates first (issue #17): every procedure of every server
 * (an image store, a site cache, a log server, a proxy, and the coordinator
 * with its hand-framed Attach), driven from the service descriptors so that
 * new RPCs are covered, called with an empty request by a stranger holding
 * (a) no token, (b) a malformed token, (c) an authentic credential of the
 * wrong kind, answers Unauthenticated, Unauthenticated and PermissionDenied:
 * never InvalidArgument or NotFound, which would show that a handler looked
 * at the request first. Over Connect, gRPC-Web and gRPC (connect-node, whose
 * gRPC calls of the hot procedures reach the hand-framed handlers) and over
 * @grpc/grpc-js, an independent gRPC peer.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { create, toBinary, type DescMethod, type DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { Http2SessionManager, createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { ImageCacheService } from "../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { ImageStoreService } from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { LogService } from "../../gen/treadmill/log/v1/log_service_pb.js";
import { RendezvousService } from "../../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import { TunnelService } from "../../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { coordinatorServices } from "../../coordinator/routes.js";
import type { ServingComponent } from "../../lib/component.js";
import { silentLogger } from "../../lib/logger.js";
import type { Capability } from "../../lib/tokens.js";
import { loadProxyConfig } from "../../proxy/config.js";
import { createProxy } from "../../proxy/proxy.js";
import { loadImageStoreConfig } from "../../stores/image/config.js";
import { createImageStore } from "../../stores/image/image-store.js";
import { loadLogServerConfig } from "../../stores/log/config.js";
import { createLogServer } from "../../stores/log/log-server.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { makeKeys, type Keys } from "../support/keys.js";

const JOB = "01900000-0000-7000-8000-000000000042";
const DIGEST = `sha256:${"ab".repeat(32)}`;
const MALFORMED = "not-a-token";

/** How a call presents itself. */
type Protocol = "connect" | "grpc-web" | "grpc" | "grpc-js";
const PROTOCOLS: Protocol[] = ["connect", "grpc-web", "grpc", "grpc-js"];

/** A server under test and the credentials a stranger might hold for it. */
interface Target {
  name: string;
  url: string;
  services: readonly DescService[];
  /** Procedures anyone may call (no credential needed). */
  open: ReadonlySet<string>;
  /** An authentic credential of a kind `procedure` does not take (undefined: every kind is taken). */
  wrongKind(procedure: string): string | undefined;
}

/** A request stream of one message. */
async function* once<T>(message: T): AsyncGenerator<T> {
  yield message;
}

/** The code `method` ends with, called with an empty request and `token`, over `protocol`. */
async function callEmpty(target: Target, method: DescMethod, protocol: Protocol, token: string | undefined, sessions: Http2SessionManager): Promise<Code | "ok"> {
  if (protocol === "grpc-js") return callGrpcJs(target.url, method, token);
  const baseUrl = target.url;
  const transport: Transport =
    protocol === "connect"
      ? createConnectTransport({ baseUrl, httpVersion: "2", sessionManager: sessions })
      : protocol === "grpc-web"
        ? createGrpcWebTransport({ baseUrl, httpVersion: "2", sessionManager: sessions })
        : createGrpcTransport({ baseUrl, sessionManager: sessions });
  const client = createClient(method.parent, transport) as unknown as Record<string, (request: unknown, options: unknown) => unknown>;
  const request = create(method.input);
  const options = { timeoutMs: 10_000, headers: token === undefined ? {} : { authorization: `Bearer ${token}` } };
  try {
    switch (method.methodKind) {
      case "unary":
        await client[method.localName](request, options);
        break;
      case "server_streaming":
        for await (const _ of client[method.localName](request, options) as AsyncIterable<unknown>) break;
        break;
      case "client_streaming":
        await client[method.localName](once(request), options);
        break;
      case "bidi_streaming":
        for await (const _ of client[method.localName](once(request), options) as AsyncIterable<unknown>) break;
        break;
    }
    return "ok";
  } catch (err) {
    return ConnectError.from(err).code;
  }
}

/** The same call through @grpc/grpc-js. */
function callGrpcJs(url: string, method: DescMethod, token: string | undefined): Promise<Code | "ok"> {
  const client = new grpc.Client(new URL(url).host, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (token !== undefined) metadata.set("authorization", `Bearer ${token}`);
  const path = `/${method.parent.typeName}/${method.name}`;
  const serialize = (m: unknown) => Buffer.from(toBinary(method.input, m as never));
  const deserialize = (b: Buffer) => b;
  const request = create(method.input);
  const options = { deadline: Date.now() + 10_000 };
  return new Promise<Code | "ok">((resolve) => {
    const settle = (err: grpc.ServiceError | null) => {
      client.close();
      resolve(err ? (err.code as number as Code) : "ok");
    };
    switch (method.methodKind) {
      case "unary":
        client.makeUnaryRequest(path, serialize, deserialize, request, metadata, options, settle);
        break;
      case "client_streaming": {
        const call = client.makeClientStreamRequest(path, serialize, deserialize, metadata, options, settle);
        call.write(request);
        call.end();
        break;
      }
      case "server_streaming":
      case "bidi_streaming": {
        const call =
          method.methodKind === "server_streaming"
            ? client.makeServerStreamRequest(path, serialize, deserialize, request, metadata, options)
            : client.makeBidiStreamRequest(path, serialize, deserialize, metadata, options);
        if (method.methodKind === "bidi_streaming") {
          (call as grpc.ClientDuplexStream<unknown, Buffer>).write(request);
          (call as grpc.ClientDuplexStream<unknown, Buffer>).end();
        }
        call.once("data", () => {
          call.cancel();
          settle(null);
        });
        call.once("error", (err: grpc.ServiceError) => settle(err));
        call.once("end", () => settle(null));
        break;
      }
    }
  });
}

describe("every rpc of every server authenticates first", () => {
  let dir: string;
  let keys: Keys;
  let coordinator: TestCoordinator;
  const components: ServingComponent[] = [];
  const targets: Target[] = [];
  let sessions: Http2SessionManager[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "treadmill-auth-first-"));
    keys = await makeKeys();
    const jwks = async () => keys.jwks;
    const common = { port: 0, logLevel: "silent", graceMs: 500 } as const;
    const store = createImageStore({
      config: { ...loadImageStoreConfig({ env: {}, argv: [] }), ...common, dataDir: join(dir, "store"), coordinatorUrl: [] },
      logger: silentLogger(),
      keys: jwks,
    });
    const cache = createImageStore({
      config: { ...loadImageStoreConfig({ env: {}, argv: [] }), ...common, mode: "cache", dataDir: join(dir, "cache"), coordinatorUrl: [] },
      logger: silentLogger(),
      keys: jwks,
    });
    const logs = createLogServer({
      config: { ...loadLogServerConfig({ env: {}, argv: [] }), ...common, dataDir: join(dir, "logs"), coordinatorUrl: [], retentionMaxAgeMs: 0 },
      logger: silentLogger(),
      keys: jwks,
    });
    const proxy = createProxy({ config: { ...loadProxyConfig({ env: {}, argv: [] }), ...common, coordinatorUrl: [] }, logger: silentLogger(), keys: jwks });
    for (const c of [store, cache, logs, proxy]) {
      await c.start();
      components.push(c);
    }
    // Authentic tokens of a scope the server never takes.
    const logRead = await keys.token({ scope: "log:read", job: JOB });
    const imageRead = await keys.token({ scope: "image:read", digest: DIGEST, holder: JOB });
    const logWrite = await keys.token({ scope: "log:write", job: JOB } satisfies Capability);
    const none = new Set<string>();
    targets.push(
      { name: "image store", url: store.address().url, services: [ImageStoreService], open: none, wrongKind: () => logRead },
      { name: "image cache", url: cache.address().url, services: [ImageStoreService, ImageCacheService], open: none, wrongKind: () => logRead },
      { name: "log server", url: logs.address().url, services: [LogService], open: none, wrongKind: () => imageRead },
      { name: "proxy", url: proxy.address().url, services: [RendezvousService, TunnelService], open: none, wrongKind: () => logWrite },
    );

    coordinator = await startTestCoordinator();
    const user = await coordinator.createUser();
    const host = await coordinator.createHost();
    const byService: Record<string, string | undefined> = {
      "treadmill.coordinator.v1.SupervisorService": user.token,
      "treadmill.coordinator.v1.RegistryService": user.token,
      // Users (admins) and services list the registry.
      "/treadmill.coordinator.v1.RegistryService/ListServices": host.credential,
    };
    targets.push({
      name: "coordinator",
      url: coordinator.url,
      services: coordinatorServices,
      open: new Set(["/treadmill.coordinator.v1.AuthService/Login", "/treadmill.coordinator.v1.AuthService/GetSigningKeys"]),
      wrongKind: (procedure) =>
        // WhoAmI takes every kind of credential.
        procedure.endsWith("/WhoAmI") ? undefined : (byService[procedure] ?? byService[procedure.split("/")[1]] ?? host.credential),
    });
  }, 60_000);

  afterAll(async () => {
    for (const s of sessions) s.abort();
    await Promise.all(components.map((c) => c.stop()));
    await coordinator?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  /** Runs `call` for every procedure of every target and protocol; returns the calls that answered otherwise than `expected`. */
  async function sweep(credential: (target: Target, procedure: string) => string | undefined | null, expected: Code): Promise<string[]> {
    const wrong: string[] = [];
    let calls = 0;
    for (const target of targets) {
      const session = new Http2SessionManager(target.url);
      sessions.push(session);
      for (const service of target.services) {
        for (const method of service.methods) {
          const procedure = `/${service.typeName}/${method.name}`;
          if (target.open.has(procedure)) continue;
          const token = credential(target, procedure);
          if (token === null) continue;
          for (const protocol of PROTOCOLS) {
            calls++;
            const code = await callEmpty(target, method, protocol, token, session);
            if (code !== expected) wrong.push(`${target.name} ${procedure} over ${protocol}: ${code === "ok" ? "OK" : Code[code]}`);
          }
        }
      }
      session.abort();
    }
    sessions = [];
    expect(calls).toBeGreaterThan(200);
    return wrong;
  }

  it("answers Unauthenticated to a call without a token", async () => {
    expect(await sweep(() => undefined, Code.Unauthenticated)).toEqual([]);
  }, 120_000);

  it("answers Unauthenticated to a call with a malformed token", async () => {
    expect(await sweep(() => MALFORMED, Code.Unauthenticated)).toEqual([]);
  }, 120_000);

  it("answers PermissionDenied to a call with an authentic credential of the wrong kind", async () => {
    expect(await sweep((target, procedure) => target.wrongKind(procedure) ?? null, Code.PermissionDenied)).toEqual([]);
  }, 120_000);

  it("tells a caller holding an api token which capability token to ask for, and where", async () => {
    const apiToken = await coordinator.createUser().then((u) => u.token);
    const message = async (target: Target, service: DescService, name: string, protocol: "grpc" | "connect") => {
      const method = service.methods.find((m) => m.name === name)!;
      const session = new Http2SessionManager(target.url);
      try {
        const transport =
          protocol === "grpc"
            ? createGrpcTransport({ baseUrl: target.url, sessionManager: session })
            : createConnectTransport({ baseUrl: target.url, httpVersion: "2", sessionManager: session });
        const client = createClient(service, transport) as unknown as Record<string, (r: unknown, o: unknown) => AsyncIterable<unknown>>;
        const request = method.methodKind === "bidi_streaming" ? once(create(method.input)) : create(method.input);
        for await (const _ of client[method.localName](request, { headers: { authorization: `Bearer ${apiToken}` } })) break;
        return "OK";
      } catch (err) {
        const e = ConnectError.from(err);
        return `${Code[e.code]}: ${e.rawMessage}`;
      } finally {
        session.abort();
      }
    };
    const [, , logs, proxy] = targets;
    const store = targets[0];
    for (const protocol of ["grpc", "connect"] as const) {
      expect(await message(logs, LogService, "Read", protocol)).toBe(
        "Unauthenticated: malformed token: this call takes a capability token of scope log:read (from JobService.GetJobLogAccess) or log:admin (from AuthService.CreateAdminCapability)",
      );
      expect(await message(store, ImageStoreService, "GetBlob", protocol)).toContain("image:read (from ImageService.ResolveImage)");
      expect(await message(proxy, TunnelService, "Dial", protocol)).toContain("tunnel:dial (from JobService.OpenJobSession)");
    }
  });
});
