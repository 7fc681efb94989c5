/**
 * Building an image manifest (DESIGN.md §6), the one way the CLI, snapshots
 * and the testbed write one: `schemaVersion`, `mediaType`, the layers bottom
 * first, the image's annotations, in that order, as compact JSON. Its digest
 * names the image, so the same layers and annotations give the same bytes.
 * Parsing and validating a manifest is the store's (stores/image/manifest.ts).
 */
import { digestOfBytes } from "./digest.js";
import { MANIFEST_MEDIA_TYPE } from "./media-types.js";

/** One layer of a manifest. */
export interface LayerDescriptor {
  mediaType: string;
  digest: string;
  size: number;
  /** Written when given, even empty; leave it out to write none. */
  annotations?: Record<string, string>;
}

/** A manifest's bytes and its digest. */
export interface BuiltManifest {
  manifestJson: Buffer;
  manifestDigest: string;
}

/** The manifest of `layers` (bottom first) with the image's `annotations`. */
export function buildManifest(layers: readonly LayerDescriptor[], annotations: Record<string, string>): BuiltManifest {
  const manifestJson = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MANIFEST_MEDIA_TYPE,
      layers: layers.map((l) => ({
        mediaType: l.mediaType,
        digest: l.digest,
        size: l.size,
        ...(l.annotations === undefined ? {} : { annotations: l.annotations }),
      })),
      annotations,
    }),
  );
  return { manifestJson, manifestDigest: digestOfBytes(manifestJson) };
}
