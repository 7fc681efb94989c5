import { loadConfig } from "../../lib/config.js";
import { serverConfigFields } from "../../lib/component.js";

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
} as const;

export type ImageStoreConfig = ReturnType<typeof loadImageStoreConfig>;

/** Reads the image store's config from the environment and flags. */
export function loadImageStoreConfig(source: { env: Record<string, string | undefined>; argv: string[] }) {
  return loadConfig("image_store", imageStoreSchema, source);
}
