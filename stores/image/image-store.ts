import { statfs } from "node:fs/promises";
import type { ConnectRouter } from "@connectrpc/connect";
import { createClient } from "@connectrpc/connect";
import { RegistryService, ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { ImageCacheService } from "../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { ImageStoreService } from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { createServingComponent, type ServingComponent } from "../../lib/component.js";
import { coordinatorTransport, verifierKeySource } from "../../lib/coordinator-client.js";
import { loadClientTls, type ClientTls } from "../../lib/grpc/trust.js";
import type { Logger } from "../../lib/logger.js";
import { TokenVerifier, type JSONWebKeySet } from "../../lib/tokens.js";
import { Authorizer } from "./auth.js";
import { imageAuthorizer } from "./authorize.js";
import { createBulkGrpcHandler } from "./bulk-grpc.js";
import { ImageCache } from "./cache.js";
import { ImageCacheServiceImpl } from "./cache-service.js";
import type { ImageStoreConfig } from "./config.js";
import { ImageStoreServiceImpl } from "./store-service.js";
import { BlobStore } from "./store.js";
import { Upstreams } from "./upstreams.js";

/** The blob RPCs that move disk images: served without compression (FACTS.md). */
export const imageBulkProcedures = [
  `/${ImageStoreService.typeName}/PutBlob`,
  `/${ImageStoreService.typeName}/GetBlob`,
];

export interface ImageStoreDeps {
  config: ImageStoreConfig;
  logger: Logger;
  /**
   * The token signing keys; default: the coordinator's (coordinator-url), or
   * the JWKS file (signing-keys-file), or none (every call is refused).
   */
  keys?: () => Promise<JSONWebKeySet>;
  clock?: () => number;
  /** Free bytes of the data directory's file system; default statfs. */
  freeBytes?: () => Promise<number>;
}

/** An image store or site cache, plus what tests and the testbed may inspect. */
export interface ImageStoreComponent extends ServingComponent {
  /** The blob store (valid after start()). */
  readonly blobs: BlobStore;
  /** The cache (cache mode, after start()). */
  readonly cache: ImageCache | undefined;
}

/**
 * An image store (`mode: store`) or a site image cache (`mode: cache`, which
 * serves `ImageCacheService` as well), DESIGN.md §6. PutBlob and GetBlob over
 * gRPC go through a hand-written handler (bulk-grpc.ts); every other protocol
 * and RPC through Connect.
 */
export function createImageStore(deps: ImageStoreDeps): ImageStoreComponent {
  const { config, logger } = deps;
  const name = config.mode === "cache" ? "image-cache" : "image-store";
  const log = logger.child({ subsystem: name });
  const tls = loadClientTls(config.caFile);
  const store = new BlobStore({
    root: config.dataDir,
    logger: log,
    capBytes: config.capBytes,
    verifyReads: config.verifyReads,
    clock: deps.clock,
    freeBytes: deps.freeBytes,
  });
  const verifier = new TokenVerifier({ keys: deps.keys ?? verifierKeySource(deps.config, tls, log.child({ subsystem: "tokens" })), audience: "image", clock: deps.clock, logger: log });
  const auth = new Authorizer(verifier, store);
  const cache =
    config.mode === "cache"
      ? new ImageCache({
          store,
          logger: log.child({ subsystem: "cache" }),
          dataDir: config.dataDir,
          capBytes: config.capBytes,
          freeFloorBytes: config.freeFloorBytes,
          sharedPath: config.sharedPath,
          evictIntervalMs: config.evictIntervalMs,
          clock: deps.clock,
          tls,
        })
      : undefined;
  const upstreams = new Upstreams({
    static: config.upstreamUrls,
    registered: config.coordinatorUrl.length > 0 && config.serviceCredential !== "" ? registeredStores(config, tls, log.child({ subsystem: "upstreams" })) : undefined,
    refreshMs: config.upstreamRefreshMs,
    missRefreshMs: 1000, // a store that just registered is found within a second; an unknown url costs at most one ListServices a second
    logger: log.child({ subsystem: "upstreams" }),
    clock: deps.clock,
  });
  const storeService = new ImageStoreServiceImpl(store, auth, { gcGraceMs: config.gcGraceMs, logger: log, cache });
  const routes = (router: ConnectRouter) => {
    router.service(ImageStoreService, storeService);
    if (cache) {
      router.service(
        ImageCacheService,
        new ImageCacheServiceImpl(cache, store, auth, upstreams, { capBytes: config.capBytes, freeFloorBytes: config.freeFloorBytes }),
      );
    }
  };

  const status = async () => {
    const fs = await statfs(config.dataDir);
    const free = fs.bavail * fs.bsize;
    const capacity = config.capBytes > 0 ? config.capBytes : fs.blocks * fs.bsize;
    const room = config.capBytes > 0 ? Math.max(0, Math.min(free, config.capBytes - store.usedBytes)) : free;
    return { capacityBytes: BigInt(capacity), freeBytes: BigInt(room) };
  };

  const component = createServingComponent({
    name,
    config,
    logger,
    routes,
    async open() {
      await store.open();
      if (cache) {
        store.onCorrupt = (digest) => log.warn({ digest }, "corrupt blob removed; the next fetch of its images refetches it");
        await cache.open();
      }
      if (!deps.keys && config.coordinatorUrl.length === 0 && config.signingKeysFile === "") {
        log.warn("no coordinator-url and no signing-keys-file: every call will be refused");
      }
    },
    server: () => ({
      bulkProcedures: imageBulkProcedures,
      authorize: imageAuthorizer(verifier),
      http: createBulkGrpcHandler(storeService),
    }),
    background(signal) {
      if (!cache) return [];
      if (config.upstreamUrls.length === 0 && (config.coordinatorUrl.length === 0 || config.serviceCredential === "")) {
        log.warn("cache mode without upstream-urls and without a coordinator to list the stores: every fetch will be refused");
      }
      return [upstreams.run(signal)];
    },
    registration: {
      config,
      tls,
      describe: () => ({ kind: cache ? ServiceKind.IMAGE_CACHE : ServiceKind.IMAGE_STORE, version: "0.1.0", status, logger: log }),
    },
    close: async () => {
      await cache?.close();
    },
  });

  return {
    ...component,
    blobs: store,
    get cache() {
      return cache;
    },
  };
}

/** Lists the base URLs of every image store and cache registered with the coordinator (live or not). */
function registeredStores(config: ImageStoreConfig, tls: ClientTls, logger: Logger): () => Promise<string[]> {
  // One client for every listing: it keeps to the coordinator replica that answers.
  const registry = createClient(RegistryService, coordinatorTransport(config.coordinatorUrl, config.serviceCredential, tls, { logger }));
  return async () => {
    const urls: string[] = [];
    let pageToken = "";
    do {
      const page = await registry.listServices({ pageSize: 1000, pageToken }, { timeoutMs: 10_000 });
      for (const s of page.services) if (s.kind === ServiceKind.IMAGE_STORE || s.kind === ServiceKind.IMAGE_CACHE) urls.push(s.url);
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    return urls;
  };
}
