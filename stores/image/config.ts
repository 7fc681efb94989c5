import { loadConfig } from "../../lib/config.js";
import { registrationConfigFields, serverConfigFields } from "../../lib/component.js";

/** Everything an image store or site cache can be told, with its defaults. */
export const imageStoreSchema = {
  ...serverConfigFields(7701),
  mode: {
    type: "string",
    default: "store",
    choices: ["store", "cache"],
    description: "store: holds images; cache: a site cache that reads through from stores",
  },
  dataDir: {
    type: "path",
    default: ".treadmill/image-store",
    description: "where blobs and manifests live (OCI image layout)",
  },
  ...registrationConfigFields(""),
  capBytes: {
    type: "int",
    default: 0,
    min: 0,
    description: "size cap of blobs and manifests in bytes; uploads beyond it answer ResourceExhausted (0: none)",
  },
  freeFloorBytes: {
    type: "int",
    default: 0,
    min: 0,
    description: "cache mode: eviction keeps at least this many bytes free on the file system",
  },
  sharedPath: {
    type: "path",
    default: "",
    description: "cache mode: where supervisors of the site mount data-dir (LocalPath answers paths under it; empty: none)",
  },
  gcGraceMs: {
    type: "duration",
    default: 3_600_000,
    min: 0,
    description: "CollectGarbage's default grace period: younger blobs and uploads are kept",
  },
  verifyReads: {
    type: "bool",
    default: true,
    description: "hash every whole-blob read and quarantine a blob whose bytes no longer match its digest",
  },
  upstreamUrls: {
    type: "list",
    default: [],
    description:
      "cache mode: base URLs of stores it may fetch from and push to, besides those registered with the coordinator (comma-separated; stand-alone use)",
  },
  upstreamRefreshMs: {
    type: "duration",
    default: 60_000,
    min: 1000,
    description: "cache mode: how often the registered stores are listed again (also on an unknown location, at most every 5 s)",
  },
  evictIntervalMs: {
    type: "duration",
    default: 30_000,
    min: 100,
    description: "cache mode: how often expired leases are dropped and limits enforced",
  },
} as const;

export type ImageStoreConfig = ReturnType<typeof loadImageStoreConfig>;

/** Reads the image store's config from the environment and flags. */
export function loadImageStoreConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  return loadConfig("image_store", imageStoreSchema, source);
}
