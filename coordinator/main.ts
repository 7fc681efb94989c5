import { runMain } from "../lib/main.js";
import { coordinatorSchema, loadCoordinatorConfig } from "./config.js";
import { createCoordinator } from "./coordinator.js";

await runMain({
  component: "coordinator",
  summary: "treadmill-coordinator: authenticates users, keeps the catalog and schedules jobs onto hosts.",
  schema: coordinatorSchema,
  proc: process,
  load: loadCoordinatorConfig,
  create: (config, logger) => createCoordinator({ config, logger }),
  ready: (coordinator, logger) => logger.info({ url: coordinator.address().url }, "coordinator ready"),
});
