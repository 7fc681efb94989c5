/**
 * Content addresses (DESIGN.md §3, §6): the one digest form Treadmill
 * accepts (`sha256:<64 lower-case hex>`), how a hash becomes one, and the
 * error a verifying reader throws when bytes do not hash to their name.
 */
import { createHash, type Hash } from "node:crypto";
import { createReadStream } from "node:fs";
import { Code, ConnectError } from "@connectrpc/connect";
import { BLOB_CHUNK_BYTES } from "./blob-io.js";

/** The only digest form Treadmill accepts. */
export const DIGEST_PATTERN = /^sha256:[0-9a-f]{64}$/;

/** Thrown by a verifying reader when what it received does not hash to the digest. */
export class DigestMismatchError extends ConnectError {
  constructor(digest: string, actual: string) {
    super(`received bytes of ${digest} hash to ${actual}`, Code.DataLoss);
  }
}

/** The sha256 digest (`sha256:<hex>`) of a hash state. */
export function digestOf(hash: Hash): string {
  return `sha256:${hash.digest("hex")}`;
}

/** The digest of some bytes (a manifest's). */
export function digestOfBytes(bytes: Uint8Array): string {
  return digestOf(createHash("sha256").update(bytes));
}

/** The digest and size of a file. */
export async function digestFile(path: string): Promise<{ digest: string; size: number }> {
  const hash = createHash("sha256");
  let size = 0;
  for await (const chunk of createReadStream(path, { highWaterMark: BLOB_CHUNK_BYTES }) as AsyncIterable<Buffer>) {
    hash.update(chunk);
    size += chunk.length;
  }
  return { digest: digestOf(hash), size };
}
