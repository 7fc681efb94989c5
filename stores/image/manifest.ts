import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  DescriptorSchema,
  ManifestSchema,
  type Descriptor,
  type Manifest,
} from "../../gen/treadmill/image/v1/manifest_pb.js";
import { DIGEST_PATTERN } from "../../lib/image/digest.js";
import { MANIFEST_MEDIA_TYPE } from "../../lib/image/media-types.js";

export const MAX_MANIFEST_BYTES = 1024 * 1024;
const MAX_LAYERS = 128;
const MEDIA_TYPE = /^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$/;

function invalid(message: string): ConnectError {
  return new ConnectError(message, Code.InvalidArgument);
}

/** Checks a digest field: `sha256:<64 lower-case hex>`; anything else is InvalidArgument naming the field. */
export function checkDigest(field: string, value: string): string {
  if (!DIGEST_PATTERN.test(value)) throw invalid(`${field} must be sha256:<64 lower-case hex digits>`);
  return value;
}

/** Every blob a manifest references (config first, then layers), each once, with its size. */
export function manifestBlobs(manifest: Manifest): Map<string, number> {
  const blobs = new Map<string, number>();
  const all = manifest.config ? [manifest.config, ...manifest.layers] : manifest.layers;
  for (const d of all) blobs.set(d.digest, Number(d.size));
  return blobs;
}

/**
 * Parses and validates a manifest's JSON (OCI image manifest form, DESIGN.md
 * §6). Throws InvalidArgument naming what is wrong.
 */
export function parseManifest(json: Uint8Array): Manifest {
  if (json.length > MAX_MANIFEST_BYTES) throw invalid(`manifest_json is larger than ${MAX_MANIFEST_BYTES} bytes`);
  let doc: unknown;
  try {
    doc = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(json));
  } catch {
    throw invalid("manifest_json is not valid utf-8 json");
  }
  if (!isObject(doc)) throw invalid("manifest_json must be a json object");
  if (doc.schemaVersion !== 2) throw invalid("manifest schemaVersion must be 2");
  if (doc.mediaType !== MANIFEST_MEDIA_TYPE) throw invalid(`manifest mediaType must be ${MANIFEST_MEDIA_TYPE}`);
  if (!Array.isArray(doc.layers) || doc.layers.length === 0 || doc.layers.length > MAX_LAYERS) {
    throw invalid(`manifest layers must be an array of 1 to ${MAX_LAYERS} descriptors`);
  }
  const layers = doc.layers.map((l, i) => descriptor(`manifest layers[${i}]`, l));
  const config = doc.config === undefined || doc.config === null ? undefined : descriptor("manifest config", doc.config);
  const annotations = annotationMap("manifest annotations", doc.annotations);
  checkLowerChain(layers);
  return create(ManifestSchema, { schemaVersion: 2, mediaType: MANIFEST_MEDIA_TYPE, config, layers, annotations });
}

function descriptor(field: string, value: unknown): Descriptor {
  if (!isObject(value)) throw invalid(`${field} must be an object`);
  const { mediaType, digest, size } = value;
  if (typeof mediaType !== "string" || !MEDIA_TYPE.test(mediaType)) throw invalid(`${field} mediaType is not a media type`);
  if (typeof digest !== "string") throw invalid(`${field} digest must be a string`);
  checkDigest(`${field} digest`, digest);
  if (typeof size !== "number" || !Number.isSafeInteger(size) || size < 0) {
    throw invalid(`${field} size must be a non-negative integer`);
  }
  return create(DescriptorSchema, {
    mediaType,
    digest,
    size: BigInt(size),
    annotations: annotationMap(`${field} annotations`, value.annotations),
  });
}

function annotationMap(field: string, value: unknown): Record<string, string> {
  if (value === undefined || value === null) return {};
  if (!isObject(value)) throw invalid(`${field} must be an object of strings`);
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(value)) {
    if (k === "" || k.length > 256) throw invalid(`${field} keys must be 1 to 256 characters`);
    if (typeof v !== "string" || v.length > 4096) throw invalid(`${field} ${k} must be a string of at most 4096 characters`);
    out[k] = v;
  }
  return out;
}

/** `treadmill.lower` must name another layer of the manifest, without cycles. */
function checkLowerChain(layers: Descriptor[]): void {
  const byDigest = new Map(layers.map((l) => [l.digest, l]));
  for (const [i, layer] of layers.entries()) {
    const seen = new Set<string>([layer.digest]);
    let current: Descriptor | undefined = layer;
    while (current?.annotations["treadmill.lower"] !== undefined) {
      const lower: string = current.annotations["treadmill.lower"];
      if (!byDigest.has(lower)) throw invalid(`manifest layers[${i}] treadmill.lower names a layer not in the manifest`);
      if (seen.has(lower)) throw invalid(`manifest layers[${i}] treadmill.lower chain has a cycle`);
      seen.add(lower);
      current = byDigest.get(lower);
    }
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
