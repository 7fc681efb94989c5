import { mkdir } from "node:fs/promises";
import type { ConnectRouter } from "@connectrpc/connect";
import { ImageCacheService } from "../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { ImageStoreService } from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { createServingComponent, type ServingComponent } from "../../lib/component.js";
import type { Logger } from "../../lib/logger.js";
import type { ImageStoreConfig } from "./config.js";

/** The blob RPCs that move disk images: served without compression (FACTS.md). */
export const imageBulkProcedures = [
  `/${ImageStoreService.typeName}/PutBlob`,
  `/${ImageStoreService.typeName}/GetBlob`,
];

/**
 * An image store (`mode: store`) or a site image cache (`mode: cache`, which
 * serves `ImageCacheService` as well). The RPCs answer `Unimplemented` until
 * the image store issue gives them behaviour.
 */
export function createImageStore({
  config,
  logger,
}: {
  config: ImageStoreConfig;
  logger: Logger;
}): ServingComponent {
  const routes = (router: ConnectRouter) => {
    router.service(ImageStoreService, {});
    if (config.mode === "cache") router.service(ImageCacheService, {});
  };
  return createServingComponent({
    name: config.mode === "cache" ? "image-cache" : "image-store",
    config,
    logger,
    routes,
    bulkProcedures: imageBulkProcedures,
    async open() {
      await mkdir(config.dataDir, { recursive: true });
    },
  });
}
