import { runMain } from "../../lib/main.js";
import { loadLogServerConfig, logServerSchema } from "./config.js";
import { createLogServer } from "./log-server.js";

await runMain({
  component: "log-server",
  summary: "treadmill-log-server: receives job logs from supervisors and serves them back.",
  schema: logServerSchema,
  proc: process,
  load: loadLogServerConfig,
  create: (config, logger) => createLogServer({ config, logger }),
  ready: (server, logger) => logger.info({ url: server.address().url }, "log server ready"),
});
