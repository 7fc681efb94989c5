import { runMain } from "../../lib/main.js";
import { imageStoreSchema, loadImageStoreConfig } from "./config.js";
import { createImageStore } from "./image-store.js";

await runMain({
  component: "image-store",
  summary: "treadmill-image-store: holds images (--mode store) or caches them near hosts (--mode cache).",
  schema: imageStoreSchema,
  proc: process,
  load: loadImageStoreConfig,
  create: (config, logger) => createImageStore({ config, logger }),
  ready: (store, logger) => logger.info({ url: store.address().url }, "image store ready"),
});
