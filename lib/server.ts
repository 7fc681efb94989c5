import { setMaxListeners } from "node:events";
import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, type Interceptor } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { Registry } from "prom-client";
import type { Logger } from "./logger.js";
import { withUncompressedProcedures } from "./server/bulk.js";
import { HealthStatus, ServingStatus, registerHealthService } from "./server/health.js";
import { createRequestPipeline, type ExtraHttpHandler } from "./server/http.js";
import { createAuthorizeInterceptor, createRpcFinisher, createRpcInterceptor, type Authorize } from "./server/interceptors.js";
import { OnePortListener } from "./server/listener.js";
import { createMetricsRegistry } from "./server/metrics.js";
import { registerReflectionServices } from "./server/reflection.js";

export { HealthStatus, ServingStatus } from "./server/health.js";
export type { ExtraHttpHandler, HttpRequest, HttpResponse, ServerShared } from "./server/http.js";
export type { Authorize } from "./server/interceptors.js";

export const DEFAULT_READ_MAX_BYTES = 4 * 1024 * 1024;
export const DEFAULT_GRACE_MS = 5000;
/**
 * Two minutes: long enough that a client between calls keeps its connection
 * (and clients reopen one after a GOAWAY anyway), short enough that abandoned
 * connections do not pile up. Streams in progress are never cut by it.
 */
export const DEFAULT_IDLE_TIMEOUT_MS = 120_000;
/**
 * 512: room for a lab of a few hundred supervisors behind one NAT address
 * (each holds about one connection per server, plus one per open tunnel at a
 * proxy) and its users; a larger site raises it (docs: connection limits).
 */
export const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 512;

export interface ServerOptions {
  /** Component name, e.g. "coordinator": on every log line and metric. */
  name: string;
  /** Address to bind; default 127.0.0.1. */
  host?: string;
  /** Port to bind; default 0 (a free one, see address()). */
  port?: number;
  /** PEM certificate and key: serve TLS, HTTP/2 or HTTP/1.1 chosen by ALPN. */
  tls?: { cert: string | Buffer; key: string | Buffer };
  logger: Logger;
  /** The component registers its services here. */
  routes: (router: ConnectRouter) => void;
  /**
   * The component's own interceptors (input checks, say). They run after the
   * authorization hook and inside the logging interceptor, so what they
   * refuse is logged and counted.
   */
  interceptors?: Interceptor[];
  /** Browser origins allowed by CORS; "*" only if listed explicitly. */
  corsOrigins?: string[];
  /** Largest request message accepted; default 4 MiB. Larger: ResourceExhausted. */
  readMaxBytes?: number;
  /** How long stop() waits for open calls before closing them; default 5000. */
  graceMs?: number;
  /** A connection without an open stream or request is closed after this long; 0: never. Default 120000. */
  idleTimeoutMs?: number;
  /** Connections one client address may hold at once (more are refused); 0: any. Default 512. */
  maxConnectionsPerAddress?: number;
  /**
   * The one authorization hook of this server: runs before any handler looks
   * at a request, for every protocol and for the hand-framed procedures
   * (`http` handlers built with createRawGrpcHandler), on every service the
   * component registers (health and reflection stay open). Without it, the
   * handlers authorize each call themselves.
   */
  authorize?: Authorize;
  /**
   * Procedures ("/pkg.Service/Method") served without compression: bulk
   * bytes that do not compress, where gzip costs most of the throughput.
   */
  bulkProcedures?: string[];
  /**
   * Plain-HTTP handler tried before the RPCs (e.g. static files); returns
   * true when it answered the request.
   */
  http?: ExtraHttpHandler;
  /**
   * HTTP/1.1 `Upgrade` requests (WebSocket): the handler owns the socket; see
   * ListenerOptions.upgrade.
   */
  upgrade?: (req: IncomingMessage, socket: Duplex, head: Buffer) => void;
}

export interface Server {
  /** Binds and serves; rejects if the address is taken. */
  start(): Promise<void>;
  /**
   * Idempotent. Reports NOT_SERVING, stops accepting connections, lets calls
   * in progress finish for graceMs, then aborts handlers' signals and closes
   * what is left.
   */
  stop(): Promise<void>;
  /** Where the server listens; valid after start(). */
  address(): { host: string; port: number; url: string };
  /** Serving status reported by grpc.health.v1.Health. */
  health: HealthStatus;
  /** This server's metrics (served on /metrics); components may add their own. */
  metrics: Registry;
}

/**
 * The server every component runs: one port for gRPC, Connect and gRPC-Web
 * over HTTP/1.1 and HTTP/2, with health, reflection, metrics, CORS and one
 * logging interceptor. See DESIGN.md §1.
 */
export function createServer(options: ServerOptions): Server {
  const baseLogger = options.logger.child({ server: options.name });
  const logger = baseLogger.child({ subsystem: "server" });
  const graceMs = options.graceMs ?? DEFAULT_GRACE_MS;
  const { registry, rpc: rpcMetrics, connections } = createMetricsRegistry(options.name);
  const health = new HealthStatus();
  // Aborted when the grace period is over: handlers that watch their
  // context's signal end their calls with Unavailable before connections close.
  const shutdown = new AbortController();
  // connect links every call in progress to it and unlinks it when the call
  // ends: many concurrent calls, not a leak.
  setMaxListeners(0, shutdown.signal);
  let services: DescService[] = [];
  // The component's services, which the authorization hook guards.
  let guarded: ReadonlySet<string> = new Set();
  const authorize: Authorize = options.authorize ?? (() => Promise.resolve());
  const finishRpc = createRpcFinisher(baseLogger.child({ subsystem: "rpc" }), rpcMetrics);

  const rpc = connectNodeAdapter({
    grpc: true,
    grpcWeb: true,
    connect: true,
    readMaxBytes: options.readMaxBytes ?? DEFAULT_READ_MAX_BYTES,
    interceptors: [
      createRpcInterceptor(finishRpc),
      createAuthorizeInterceptor(authorize, () => guarded),
      ...(options.interceptors ?? []),
    ],
    shutdownSignal: shutdown.signal,
    // Called once, synchronously, by connectNodeAdapter.
    routes(router) {
      options.routes(withUncompressedProcedures(router, options.bulkProcedures ?? []));
      guarded = new Set(uniqueServices(router).map((service) => service.typeName));
      registerHealthService(router, health);
      registerReflectionServices(router, () => services);
      services = uniqueServices(router);
      // Every service starts SERVING; a component reports otherwise itself.
      for (const service of services) health.setStatus(service.typeName, ServingStatus.SERVING);
    },
  });

  const listener = new OnePortListener({
    logger,
    tls: options.tls,
    upgrade: options.upgrade,
    limits: {
      idleTimeoutMs: options.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS,
      maxConnectionsPerAddress: options.maxConnectionsPerAddress ?? DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    },
    metrics: connections,
    handler: createRequestPipeline({
      logger,
      corsOrigins: options.corsOrigins ?? [],
      registry,
      http: options.http,
      shared: { finishRpc, authorize, shutdownSignal: shutdown.signal },
      rpc,
    }),
  });

  let starting: Promise<void> | undefined;
  let stopping: Promise<void> | undefined;
  let bound: { host: string; port: number; url: string } | undefined;

  const start = async (): Promise<void> => {
    const { address, port } = await listener.listen(options.host ?? "127.0.0.1", options.port ?? 0);
    const host = address.includes(":") ? `[${address}]` : address;
    bound = { host: address, port, url: `${options.tls ? "https" : "http"}://${host}:${port}` };
    logger.info({ url: bound.url }, "server listening");
    if (!options.tls && !isLoopback(address)) {
      logger.warn(
        { url: bound.url },
        "serving plain TCP on a non-loopback address: tokens and job data cross the network readable by anyone on it; give --tls-cert-file and --tls-key-file",
      );
    }
  };

  const stop = async (): Promise<void> => {
    health.shutdown();
    // A stop during start waits for the bind, so that nothing is left bound.
    const wasStarted = await starting?.then(
      () => true,
      () => false,
    );
    if (!wasStarted) return;
    const began = performance.now();
    await listener.close(graceMs, () => shutdown.abort(new ConnectError("server is shutting down", Code.Unavailable)));
    logger.info({ durationMs: Math.round(performance.now() - began) }, "server stopped");
  };

  return {
    health,
    metrics: registry,

    start() {
      if (stopping) return Promise.reject(new Error(`server ${options.name} is stopped`));
      starting ??= start();
      return starting;
    },

    stop() {
      stopping ??= stop();
      return stopping;
    },

    address() {
      if (!bound) throw new Error(`server ${options.name} not started`);
      return bound;
    },
  };
}

/** The services registered on a router, each once. */
function uniqueServices(router: ConnectRouter): DescService[] {
  const byName = new Map<string, DescService>();
  for (const handler of router.handlers) byName.set(handler.service.typeName, handler.service);
  return [...byName.values()];
}

/** Whether a bound address is a loopback one (127.0.0.0/8, ::1, or 127.x mapped into IPv6). */
export function isLoopback(address: string): boolean {
  return /^127\./.test(address) || address === "::1" || /^::ffff:127\./i.test(address);
}
