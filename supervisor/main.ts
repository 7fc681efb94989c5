import { runMain } from "../lib/main.js";
import { displayUrl } from "../lib/replicas.js";
import { loadSupervisorConfig, supervisorSchema } from "./config.js";
import { createSupervisor } from "./supervisor.js";

await runMain({
  component: "supervisor",
  summary: "treadmill-supervisor: manages one host, holding a stream to the coordinator.",
  schema: supervisorSchema,
  proc: process,
  load: loadSupervisorConfig,
  create: (config, logger) => createSupervisor({ config, logger }),
  ready: (supervisor, logger) =>
    logger.info({ name: supervisor.name, coordinatorUrls: supervisor.coordinatorUrls.map(displayUrl) }, "supervisor started"),
});
