/**
 * The client side of `treadmill.image.v1.ImageStoreService` for bulk bytes,
 * used by site caches, supervisors and `tml image push/pull`:
 *
 * - `imageStoreTransport(url)`: a gRPC transport tuned for blobs (no
 *   compression, large HTTP/2 receive windows on both the stream and the
 *   connection, FACTS.md "Bulk bytes over gRPC").
 * - `uploadBlob(...)`: resumable upload (QueryUpload, then PutBlob from the
 *   committed offset; retries transient failures), with progress.
 * - `downloadBlob(...)`: GetBlob into a file, resuming and retrying, and
 *   verifying the digest of what it received.
 * - `readBlobChunks(...)`: the raw chunk stream of one GetBlob call.
 *
 * Nothing here trusts a store: every whole blob read is hashed.
 */
import { createHash, type Hash } from "node:crypto";
import { createReadStream } from "node:fs";
import { open, rename, rm, stat } from "node:fs/promises";
import type http2 from "node:http2";
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import { ImageStoreService } from "../gen/treadmill/image/v1/image_store_service_pb.js";
import { bearerInterceptor } from "./coordinator-client.js";
import { backoff, sleep } from "./retry.js";

/** The only digest form Treadmill accepts. */
export const DIGEST_PATTERN = /^sha256:[0-9a-f]{64}$/;

/** Bytes per PutBlob/GetBlob message: FACTS.md, 256 KiB-1 MiB is best. */
export const BLOB_CHUNK_BYTES = 1024 * 1024;

/** Receive windows the client raises (both are needed, FACTS.md). */
const STREAM_WINDOW = 4 * 1024 * 1024;
const SESSION_WINDOW = 16 * 1024 * 1024;

export type ImageStoreClient = Client<typeof ImageStoreService>;

/**
 * An Http2SessionManager that raises the connection-level receive window of
 * each session it opens: connect-node has no option for it, and without it a
 * download is held to 64 KiB per round trip whatever the stream window says.
 */
class WideWindowSessionManager extends Http2SessionManager {
  readonly #widened = new WeakSet<http2.Http2Session>();

  override async request(
    method: string,
    path: string,
    headers: http2.OutgoingHttpHeaders,
    options: Omit<http2.ClientSessionRequestOptions, "signal">,
  ): Promise<http2.ClientHttp2Stream> {
    const stream = await super.request(method, path, headers, options);
    const session = stream.session;
    if (session && !this.#widened.has(session)) {
      this.#widened.add(session);
      session.setLocalWindowSize(SESSION_WINDOW);
    }
    return stream;
  }
}

export interface ImageTransport extends Transport {
  /** Closes the transport's connection (open calls fail). */
  close(): void;
}

/**
 * A gRPC transport to an image store or cache, tuned for bulk bytes. `token`
 * (an `image:read`/`image:write` capability) goes in `authorization: Bearer`
 * on every call when non-empty.
 */
export function imageStoreTransport(baseUrl: string, options: { token?: string | (() => string) } = {}): ImageTransport {
  const token = options.token;
  const sessionManager = new WideWindowSessionManager(
    baseUrl,
    { idleConnectionTimeoutMs: 60_000 },
    { settings: { initialWindowSize: STREAM_WINDOW } },
  );
  const transport = createGrpcTransport({
    baseUrl,
    sessionManager,
    acceptCompression: [],
    // A message is at most 3 MiB of data plus a few bytes of framing.
    readMaxBytes: 4 * 1024 * 1024,
    interceptors: [bearerInterceptor(typeof token === "function" ? token : () => token ?? "")],
  });
  return Object.assign(transport, { close: () => sessionManager.abort() });
}

/** A client of ImageStoreService over `imageStoreTransport`. */
export function imageStoreClient(transport: Transport): ImageStoreClient {
  return createClient(ImageStoreService, transport);
}

/** Progress of one blob transfer. */
export interface BlobProgress {
  digest: string;
  /** Bytes of the blob present at the receiver (including a resumed prefix). */
  bytesDone: number;
  size: number;
}

/** Where an upload reads its bytes: `read(offset)` yields the blob from `offset` on. */
export type BlobSource = (offset: number) => AsyncIterable<Uint8Array>;

/** A BlobSource reading a file in chunks of `chunkBytes`. */
export function fileSource(path: string, chunkBytes = BLOB_CHUNK_BYTES): BlobSource {
  return (offset) => createReadStream(path, { start: offset, highWaterMark: chunkBytes }) as AsyncIterable<Buffer>;
}

/** Codes after which a transfer is tried again (from where it stopped). */
const RETRYABLE = new Set([Code.Unavailable, Code.Aborted, Code.DeadlineExceeded, Code.Unknown, Code.Internal, Code.Canceled]);

export interface TransferOptions {
  /** Attempts in all (a resume counts as one); default 5. */
  attempts?: number;
  signal?: AbortSignal;
  /** Called as bytes arrive, at most once per chunk. */
  onProgress?: (progress: BlobProgress) => void;
  /** Deadline of each call, ms; default none. */
  timeoutMs?: number;
}

/**
 * Uploads one blob resumably: asks the store what it has (QueryUpload), then
 * sends the rest with PutBlob from the committed offset. A broken call or an
 * Aborted (another upload of the same blob in progress) is retried with
 * backoff, resuming each time. Resolves when the store holds the whole,
 * verified blob. Errors: the store's InvalidArgument (digest or size
 * mismatch), ResourceExhausted, PermissionDenied..., or the last transient
 * error once the attempts are spent.
 */
export async function uploadBlob(
  client: ImageStoreClient,
  blob: { digest: string; size: number; source: BlobSource },
  options: TransferOptions = {},
): Promise<{ alreadyExisted: boolean; bytesSent: number }> {
  const { digest, size } = blob;
  if (!DIGEST_PATTERN.test(digest)) throw new ConnectError("digest must be sha256:<64 hex>", Code.InvalidArgument);
  const attempts = options.attempts ?? 5;
  const delays = backoff({ initialMs: 100, maxMs: 5000 });
  let bytesSent = 0;
  for (let attempt = 1; ; attempt++) {
    try {
      const query = await client.queryUpload({ digest }, { signal: options.signal, timeoutMs: options.timeoutMs });
      if (query.exists) {
        options.onProgress?.({ digest, bytesDone: size, size });
        return { alreadyExisted: bytesSent === 0, bytesSent };
      }
      const from = Number(query.committedOffset);
      let at = from;
      const requests = async function* () {
        let first = true;
        for await (const data of blob.source(from)) {
          // Split what the source gives into messages of at most one chunk.
          for (let i = 0; i < data.length || (first && data.length === 0); i += BLOB_CHUNK_BYTES) {
            const piece = data.subarray(i, i + BLOB_CHUNK_BYTES);
            yield first ? { digest, size: BigInt(size), offset: BigInt(at), data: piece } : { offset: BigInt(at), data: piece };
            first = false;
            at += piece.length;
            bytesSent += piece.length;
            options.onProgress?.({ digest, bytesDone: at, size });
          }
        }
        if (first) yield { digest, size: BigInt(size), offset: BigInt(at), data: new Uint8Array(0) };
      };
      const response = await client.putBlob(requests(), { signal: options.signal, timeoutMs: options.timeoutMs });
      if (response.complete) return { alreadyExisted: response.alreadyExisted, bytesSent };
      throw new ConnectError(`upload of ${digest} ended at ${response.committedSize} of ${size}`, Code.Aborted);
    } catch (err) {
      const error = ConnectError.from(err);
      if (options.signal?.aborted || attempt >= attempts || !RETRYABLE.has(error.code)) throw error;
      await sleep(delays.next().value, options.signal);
    }
  }
}

/**
 * The chunks of one GetBlob call, as they arrive (no verification: a range
 * cannot be verified; the caller hashes whole blobs). The first response
 * tells the blob's size through `onSize`.
 */
export async function* readBlobChunks(
  client: ImageStoreClient,
  request: { digest: string; offset?: number; length?: number },
  options: { signal?: AbortSignal; timeoutMs?: number; onSize?: (size: number) => void } = {},
): AsyncGenerator<Uint8Array> {
  let expected = request.offset ?? 0;
  let first = true;
  for await (const chunk of client.getBlob(
    {
      digest: request.digest,
      offset: BigInt(request.offset ?? 0),
      length: request.length === undefined ? undefined : BigInt(request.length),
    },
    { signal: options.signal, timeoutMs: options.timeoutMs },
  )) {
    if (first) options.onSize?.(Number(chunk.size));
    first = false;
    if (Number(chunk.offset) !== expected) {
      throw new ConnectError(`store sent offset ${chunk.offset}, expected ${expected}`, Code.DataLoss);
    }
    expected += chunk.data.length;
    yield chunk.data;
  }
}

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

/**
 * Downloads a whole blob into `path`, verifying its digest. Bytes go to
 * `<path>.partial` first; a later call resumes from that file (its prefix is
 * hashed again), and the file is renamed to `path` only once verified. A
 * broken call is retried from the last byte received. A digest mismatch
 * removes the partial file and throws DigestMismatchError (DataLoss).
 */
export async function downloadBlob(
  client: ImageStoreClient,
  blob: { digest: string; size?: number },
  path: string,
  options: TransferOptions = {},
): Promise<{ size: number }> {
  const { digest } = blob;
  if (!DIGEST_PATTERN.test(digest)) throw new ConnectError("digest must be sha256:<64 hex>", Code.InvalidArgument);
  const partial = `${path}.partial`;
  const hash = createHash("sha256");
  let offset = 0;
  const existing = await stat(partial).catch(() => undefined);
  if (existing) {
    for await (const chunk of createReadStream(partial, { highWaterMark: BLOB_CHUNK_BYTES }) as AsyncIterable<Buffer>) {
      hash.update(chunk);
      offset += chunk.length;
    }
  }
  const file = await open(partial, existing ? "r+" : "w");
  const attempts = options.attempts ?? 5;
  const delays = backoff({ initialMs: 100, maxMs: 5000 });
  let size = blob.size ?? -1;
  try {
    for (let attempt = 1; ; attempt++) {
      try {
        for await (const data of readBlobChunks(
          client,
          { digest, offset },
          { signal: options.signal, timeoutMs: options.timeoutMs, onSize: (s) => (size = s) },
        )) {
          hash.update(data);
          await file.write(data, 0, data.length, offset);
          offset += data.length;
          options.onProgress?.({ digest, bytesDone: offset, size });
        }
        break;
      } catch (err) {
        const error = ConnectError.from(err);
        if (options.signal?.aborted || attempt >= attempts || !RETRYABLE.has(error.code)) throw error;
        await sleep(delays.next().value, options.signal);
      }
    }
    if (blob.size !== undefined && offset !== blob.size) {
      throw new ConnectError(`received ${offset} bytes of ${digest}, expected ${blob.size}`, Code.DataLoss);
    }
    const actual = digestOf(hash);
    if (actual !== digest) {
      await file.close();
      await rm(partial, { force: true });
      throw new DigestMismatchError(digest, actual);
    }
    await file.datasync();
    await file.close();
    await rename(partial, path);
    return { size: offset };
  } finally {
    await file.close().catch(() => undefined);
  }
}
