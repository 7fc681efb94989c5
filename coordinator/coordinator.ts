import { createServingComponent, type ServingComponent } from "../lib/component.js";
import type { Logger } from "../lib/logger.js";
import type { CoordinatorConfig } from "./config.js";
import { openDatabase, type Database } from "./db/database.js";
import { coordinatorRoutes } from "./routes.js";

export interface CoordinatorDeps {
  config: CoordinatorConfig;
  logger: Logger;
}

/**
 * The coordinator: PostgreSQL (embedded unless DATABASE_URL names one, with
 * migrations applied at start) and one server for `treadmill.coordinator.v1`.
 */
export function createCoordinator({ config, logger }: CoordinatorDeps): ServingComponent {
  let db: Database | undefined;
  return createServingComponent({
    name: "coordinator",
    config,
    logger,
    routes: coordinatorRoutes,
    async open() {
      db = await openDatabase({
        url: config.databaseUrl === "" ? undefined : config.databaseUrl,
        dataDir: config.dataDir,
        logger: logger.child({ subsystem: "database" }),
      });
    },
    async close() {
      await db?.close();
    },
  });
}
