import { runMain } from "../lib/main.js";
import { loadProxyConfig, proxySchema } from "./config.js";
import { createProxy } from "./proxy.js";

await runMain({
  component: "proxy",
  summary: "treadmill-proxy: exposes host-local ports of jobs to users who cannot reach the site.",
  schema: proxySchema,
  proc: process,
  load: loadProxyConfig,
  create: (config, logger) => createProxy({ config, logger }),
  ready: (proxy, logger) => logger.info({ url: proxy.address().url }, "proxy ready"),
});
