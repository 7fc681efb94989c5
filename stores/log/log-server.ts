import type { ConnectRouter } from "@connectrpc/connect";
import { ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { LogService } from "../../gen/treadmill/log/v1/log_service_pb.js";
import { createServingComponent, type ServingComponent } from "../../lib/component.js";
import { verifierKeySource } from "../../lib/coordinator-client.js";
import { loadClientTls } from "../../lib/grpc/trust.js";
import type { Logger } from "../../lib/logger.js";
import { TokenVerifier, type JSONWebKeySet } from "../../lib/tokens.js";
import { logAuthorizer } from "./authorize.js";
import type { LogServerConfig } from "./config.js";
import { createLogGrpcHandler } from "./log-grpc.js";
import { LogServiceImpl } from "./log-service.js";
import { LogStore } from "./log-store.js";
import { runRetention } from "./retention.js";

/**
 * A log server (DESIGN.md §7): LogService over segment files in `dataDir`,
 * retention, and registration with the coordinator when a service credential
 * is configured. `keys` overrides the verifier's key source (tests).
 */
export function createLogServer({
  config,
  logger,
  keys,
}: {
  config: LogServerConfig;
  logger: Logger;
  keys?: () => Promise<JSONWebKeySet>;
}): ServingComponent {
  const storeLogger = logger.child({ subsystem: "log-store" });
  const store = new LogStore({ dataDir: config.dataDir, jobSizeCapBytes: config.jobSizeCapBytes, logger: storeLogger });
  const tls = loadClientTls(config.caFile);
  const keySource = keys ?? verifierKeySource(config, tls, logger.child({ subsystem: "tokens" }));
  const verifier = new TokenVerifier({ keys: keySource, audience: "log", logger: logger.child({ subsystem: "tokens" }) });
  const service = new LogServiceImpl({ store, verifier, logger: logger.child({ subsystem: "log-service" }) });
  return createServingComponent({
    name: "log-server",
    config,
    logger,
    routes: (router: ConnectRouter) => {
      router.service(LogService, service);
    },
    open: () => store.open(),
    server: () => ({
      // connect-node compresses on the thread pool, where it queues
      // behind the fdatasyncs: frames go uncompressed, for latency.
      // gRPC Append and Read skip connect-node's per-message pipeline.
      http: createLogGrpcHandler(service, config.readMaxBytes),
      authorize: logAuthorizer(verifier),
      bulkProcedures: [`/${LogService.typeName}/Append`, `/${LogService.typeName}/Read`],
    }),
    background: (signal) => [
      runRetention(
        store,
        {
          maxAgeMs: config.retentionMaxAgeMs,
          maxTotalBytes: config.retentionMaxTotalBytes,
          intervalMs: config.retentionIntervalMs,
        },
        logger.child({ subsystem: "retention" }),
        signal,
      ),
    ],
    registration: {
      config,
      tls,
      describe: () => ({
        kind: ServiceKind.LOG_SERVER,
        status: async (draining) => {
          const { capacityBytes, freeBytes } = await store.diskSpace();
          return {
            capacityBytes: BigInt(capacityBytes),
            freeBytes: BigInt(freeBytes),
            activeStreams: service.activeStreams,
            draining,
          };
        },
      }),
    },
    // Deregister and end streams first: followers and writers get
    // Unavailable at once (they retry elsewhere or later) instead of
    // holding the drain for the whole grace period.
    stopping: () => store.beginStop(),
    close: () => store.close(),
  });
}
