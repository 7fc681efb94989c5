import { randomUUID } from "node:crypto";
import type { Http2ServerRequest } from "node:http2";
import type { ConnectRouter } from "@connectrpc/connect";
import { ServiceKind } from "../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { RendezvousService } from "../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import { TunnelService } from "../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { createServingComponent, type ServingComponent } from "../lib/component.js";
import { verifierKeySource } from "../lib/coordinator-client.js";
import { loadClientTls } from "../lib/grpc/trust.js";
import type { Logger } from "../lib/logger.js";
import type { HttpRequest, ServerOptions } from "../lib/server.js";
import { createRawGrpcHandler, rawProcedure } from "../lib/grpc/server.js";
import { DIAL_PATH, DIAL_REQUEST, DIAL_RESPONSE, MAX_TUNNEL_MESSAGE, TUNNEL_PATH, TUNNEL_REQUEST, TUNNEL_RESPONSE } from "../lib/tunnel/wire.js";
import { TokenVerifier, type JSONWebKeySet } from "../lib/tokens.js";
import { ProxyAuth, proxyAuthorizer } from "./auth.js";
import { parsePortRange, type ProxyConfig } from "./config.js";
import { Hub } from "./hub.js";
import { RendezvousServiceImpl } from "./rendezvous-service.js";
import { STREAM_HEADER, StreamTable, rawByteStream } from "./rpc-side.js";
import { TcpEntrances } from "./tcp-entrance.js";
import { TunnelServiceImpl } from "./tunnel-service.js";
import { WebSocketEntrance } from "./websocket-entrance.js";

/**
 * The byte-stream RPCs: served by hand-written gRPC procedures, and on the
 * Connect adapter (Connect, gRPC-Web) without compression (bytes through a
 * tunnel rarely compress and gzip costs most of the throughput).
 */
const STREAM_PROCEDURES = [TUNNEL_PATH, DIAL_PATH];

/** A proxy component, plus what tests look at. */
export interface Proxy extends ServingComponent {
  /** Open and opening tunnels. */
  tunnelCount(): number;
  /** Job hosts holding a control stream. */
  sessionCount(): number;
}

/**
 * A rendezvous proxy (DESIGN.md §8, docs/proxy.md): `RendezvousService` for
 * supervisors, `TunnelService` for clients, a WebSocket entrance at
 * `/ws/<job>/<exposure>` and per-session TCP entrances from a port range;
 * registers with the coordinator when a service credential is configured.
 * `keys` overrides the verifier's key source (tests).
 */
export function createProxy({
  config,
  logger,
  keys,
}: {
  config: ProxyConfig;
  logger: Logger;
  keys?: () => Promise<JSONWebKeySet>;
}): Proxy {
  const tls = loadClientTls(config.caFile);
  const keySource = keys ?? verifierKeySource(config, tls, logger.child({ subsystem: "tokens" }));
  const verifier = new TokenVerifier({ keys: keySource, audience: "proxy", logger: logger.child({ subsystem: "tokens" }) });
  const auth = new ProxyAuth(verifier);
  const proxyId = randomUUID();
  const hub = new Hub({
    proxyId,
    maxTunnels: config.maxTunnels,
    maxTunnelsPerJob: config.maxTunnelsPerJob,
    maxExposuresPerHost: config.maxExposuresPerHost,
    openTimeoutMs: config.openTimeoutMs,
    idleTimeoutMs: config.idleTimeoutMs,
    pingIntervalMs: config.pingIntervalMs,
    forceAfterMs: Math.max(1000, config.graceMs),
    logger: logger.child({ subsystem: "hub" }),
  });
  const range = parsePortRange(config.tcpPortRange);
  const streams = new StreamTable();
  const websocket = new WebSocketEntrance({ hub, auth, logger: logger.child({ subsystem: "websocket" }) });
  const bindHost = config.tcpHost !== "" ? config.tcpHost : config.host;
  const publicHost =
    config.tcpPublicHost !== "" ? config.tcpPublicHost : config.publicUrl !== "" ? new URL(config.publicUrl).hostname : config.host;
  const tcp = range ? new TcpEntrances({ hub, bindHost, publicHost, range, logger: logger.child({ subsystem: "tcp" }) }) : undefined;
  const rendezvous = new RendezvousServiceImpl({
    hub,
    auth,
    streams,
    pingIntervalMs: config.pingIntervalMs,
    proxyId,
    logger: logger.child({ subsystem: "rendezvous" }),
  });
  const tunnels = new TunnelServiceImpl({ hub, auth, streams, tcp, logger: logger.child({ subsystem: "tunnels" }) });

  const component = createServingComponent({
    name: "proxy",
    config,
    logger,
    routes: (router: ConnectRouter) => {
      router.service(RendezvousService, rendezvous);
      router.service(TunnelService, tunnels);
    },
    server(): Partial<ServerOptions> {
      // Plain gRPC byte streams (our clients, any gRPC client) skip the
      // Connect adapter; Connect and gRPC-Web calls fall through to it.
      const rawGrpc = createRawGrpcHandler({
        routes: [
          rawProcedure(TunnelService.method.dial, (call) => tunnels.serveDial(rawByteStream(call, DIAL_REQUEST, DIAL_RESPONSE), call.context)),
          rawProcedure(RendezvousService.method.tunnel, (call) =>
            rendezvous.serveTunnel(rawByteStream(call, TUNNEL_REQUEST, TUNNEL_RESPONSE), call.context),
          ),
        ],
        maxMessageBytes: MAX_TUNNEL_MESSAGE,
      });
      return {
        bulkProcedures: STREAM_PROCEDURES,
        authorize: proxyAuthorizer(verifier),
        http: (req, res, shared) => {
          if (rawGrpc(req, res, shared)) return true;
          tagStream(req, streams);
          return false;
        },
        upgrade: (req, socket, head) => websocket.upgrade(req, socket, head),
      };
    },
    registration: {
      config,
      tls,
      describe: () => ({
        kind: ServiceKind.PROXY,
        tcpAddress: range && tcp ? `${publicHost}:${range.low}-${range.high}` : "",
        status: (draining: boolean) => ({ activeStreams: hub.tunnelCount, draining }),
      }),
    },
    // Deregister, then tell every tunnel and supervisor why they end,
    // so that supervisors reconnect (elsewhere or later) at once.
    drain() {
      hub.stop();
      websocket.stop();
      tcp?.stop();
    },
  });

  return {
    ...component,
    tunnelCount: () => hub.tunnelCount,
    sessionCount: () => hub.sessionCount,
  };
}

/**
 * Marks an HTTP/2 request with an id of its raw stream (overwriting any such
 * header a client sent), so that a byte-stream call whose client never reads
 * can be reset (rpc-side.ts).
 */
function tagStream(req: HttpRequest, streams: StreamTable): void {
  if (req.httpVersionMajor !== 2) {
    delete req.headers[STREAM_HEADER];
    return;
  }
  const h2 = req as Http2ServerRequest;

  (h2.headers as Record<string, string>)[STREAM_HEADER] = streams.add(h2.stream);
}
