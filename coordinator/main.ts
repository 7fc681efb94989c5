import { runMain } from "../lib/main.js";
import { coordinatorSchema, loadCoordinatorConfig } from "./config.js";
import { createCoordinator } from "./coordinator.js";

await runMain({
  component: "coordinator",
  summary: "treadmill-coordinator: authenticates users, keeps the catalog and schedules jobs onto hosts.",
  schema: coordinatorSchema,
  proc: process,
  load: loadCoordinatorConfig,
  create: (config, logger) => createCoordinator({ config, logger, announce: (text) => process.stderr.write(text) }),
  ready: (coordinator, logger) => logger.info({ url: coordinator.address().url }, "coordinator ready"),
});
