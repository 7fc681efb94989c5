import type { ConnectRouter } from "@connectrpc/connect";
import { ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { LogService } from "../../gen/treadmill/log/v1/log_service_pb.js";
import { serverOptions, type ServingComponent } from "../../lib/component.js";
import { coordinatorTransport, runRegistration, verifierKeySource } from "../../lib/coordinator-client.js";
import type { Logger } from "../../lib/logger.js";
import { createServer, type Server } from "../../lib/server.js";
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
  const keySource = keys ?? verifierKeySource(config);
  const verifier = new TokenVerifier({ keys: keySource, audience: "log", logger: logger.child({ subsystem: "tokens" }) });
  const service = new LogServiceImpl({ store, verifier, logger: logger.child({ subsystem: "log-service" }) });
  const background = new AbortController();
  const tasks: Promise<void>[] = [];
  let server: Server | undefined;
  let stopping: Promise<void> | undefined;

  return {
    async start() {
      await store.open();
      try {
        server = createServer({
          ...serverOptions("log-server", config, logger, (router: ConnectRouter) => {
            router.service(LogService, service);
          }),
          // connect-node compresses on the thread pool, where it queues
          // behind the fdatasyncs: frames go uncompressed, for latency.
          // gRPC Append and Read skip connect-node's per-message pipeline.
          http: createLogGrpcHandler(service, config.readMaxBytes),
          authorize: logAuthorizer(verifier),
          bulkProcedures: [`/${LogService.typeName}/Append`, `/${LogService.typeName}/Read`],
        });
        await server.start();
      } catch (err) {
        await store.close();
        throw err;
      }
      tasks.push(
        runRetention(
          store,
          {
            maxAgeMs: config.retentionMaxAgeMs,
            maxTotalBytes: config.retentionMaxTotalBytes,
            intervalMs: config.retentionIntervalMs,
          },
          logger.child({ subsystem: "retention" }),
          background.signal,
        ),
      );
      if (config.serviceCredential !== "" && config.coordinatorUrl !== "") {
        const url = config.publicUrl !== "" ? config.publicUrl : server.address().url;
        tasks.push(
          runRegistration({
            transport: coordinatorTransport(config.coordinatorUrl, config.serviceCredential),
            kind: ServiceKind.LOG_SERVER,
            url,
            site: config.site,
            status: async () => {
              const { capacityBytes, freeBytes } = await store.diskSpace();
              return {
                capacityBytes: BigInt(capacityBytes),
                freeBytes: BigInt(freeBytes),
                activeStreams: service.activeStreams,
                draining: background.signal.aborted,
              };
            },
            logger: logger.child({ subsystem: "registration" }),
            signal: background.signal,
            health: server.health,
          }),
        );
      }
    },
    stop() {
      stopping ??= (async () => {
        // Deregister and end streams first: followers and writers get
        // Unavailable at once (they retry elsewhere or later) instead of
        // holding the drain for the whole grace period.
        background.abort();
        store.beginStop();
        await Promise.all(tasks);
        await server?.stop();
        await store.close();
      })();
      return stopping;
    },
    address() {
      if (!server) throw new Error("log-server not started");
      return server.address();
    },
  };
}
