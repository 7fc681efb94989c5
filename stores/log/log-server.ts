import { mkdir } from "node:fs/promises";
import type { ConnectRouter } from "@connectrpc/connect";
import { LogService } from "../../gen/treadmill/log/v1/log_service_pb.js";
import { createServingComponent, type ServingComponent } from "../../lib/component.js";
import type { Logger } from "../../lib/logger.js";
import type { LogServerConfig } from "./config.js";

/**
 * A log server. `LogService` answers `Unimplemented` until the log server
 * issue gives it behaviour.
 */
export function createLogServer({
  config,
  logger,
}: {
  config: LogServerConfig;
  logger: Logger;
}): ServingComponent {
  return createServingComponent({
    name: "log-server",
    config,
    logger,
    routes: (router: ConnectRouter) => {
      router.service(LogService, {});
    },
    async open() {
      await mkdir(config.dataDir, { recursive: true });
    },
  });
}
