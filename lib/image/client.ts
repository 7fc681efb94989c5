/**
 * The client side of `treadmill.image.v1.ImageStoreService` for bulk bytes,
 * used by site caches, supervisors and `tml image push/pull`:
 *
 * - `imageStoreTransport(url)`: a gRPC transport tuned for blobs (no
 *   compression, large HTTP/2 receive windows on both the stream and the
 *   connection, FACTS.md "Bulk bytes over gRPC").
 * - `imageStoreClient(transport)`: a client whose PutBlob and GetBlob, over
 *   such a transport, are a thin hand-framed gRPC client on a connection of
 *   their own (lib/grpc/client.ts): same wire protocol, token, deadlines,
 *   cancellation and status codes, without connect-node's per-message copies.
 * - `uploadBlob(...)`: resumable upload (QueryUpload, then PutBlob from the
 *   committed offset; retries transient failures), with progress.
 * - `uploadBlobHashing(...)`: PutBlob with the digest at the end, hashed
 *   while sent, so the source is read once (retried whole).
 * - `downloadBlob(...)`: GetBlob into a file, resuming and retrying, and
 *   verifying the digest of what it received.
 * - `readBlobChunks(...)`: the raw chunk stream of one GetBlob call
 *   (`readBlobPieces`: the same without joining a chunk's frames).
 *
 * Nothing here trusts a store: every whole blob read is hashed. Digests are
 * lib/image/digest.ts's, local blob files lib/image/blob-io.ts's.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { open, rename, rm, stat } from "node:fs/promises";
import type http2 from "node:http2";
import { Worker } from "node:worker_threads";
import { create, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type CallOptions, type Client, type Transport } from "@connectrpc/connect";
import {
  GetBlobRequestSchema,
  GetBlobResponseSchema,
  ImageStoreService,
  PutBlobRequestSchema,
  PutBlobResponseSchema,
  type GetBlobResponse,
  type PutBlobResponse,
} from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { STREAM_WINDOW, WideSessionManager, connectHttp2, openRawCall, type RawClientCall } from "../grpc/client.js";
import { clientTransport } from "../grpc/transport.js";
import { PUBLIC_ROOTS, http2Trust, type ClientTls } from "../grpc/trust.js";
import { bytesFieldHeader, decodeMessage, frame, splitBulkMessage } from "../grpc/wire.js";
import { retry } from "../retry.js";
import { BLOB_CHUNK_BYTES, BackgroundWriter, type BlobSource } from "./blob-io.js";
import { DIGEST_PATTERN, DigestMismatchError, digestOf } from "./digest.js";

export type ImageStoreClient = Client<typeof ImageStoreService>;

export interface ImageTransport extends Transport {
  /** Closes the transport's connections (open calls fail). */
  close(): void;
}

/** The bulk channel of each transport made by imageStoreTransport, and of its clients. */
const bulkChannels = new WeakMap<object, BulkChannel>();

/**
 * A gRPC transport to an image store or cache, tuned for bulk bytes. `token`
 * (an `image:read`/`image:write` capability) goes in `authorization: Bearer`
 * on every call when non-empty; an https store is verified with `tls`.
 */
export function imageStoreTransport(baseUrl: string, options: { token?: string | (() => string); tls?: ClientTls } = {}): ImageTransport {
  const token = options.token;
  const tokenOf = typeof token === "function" ? token : () => token ?? "";
  const tls = options.tls ?? PUBLIC_ROOTS;
  const sessionManager = new WideSessionManager(
    baseUrl,
    { idleConnectionTimeoutMs: 60_000 },
    { settings: { initialWindowSize: STREAM_WINDOW }, ...http2Trust(baseUrl, tls) },
  );
  const transport = clientTransport({
    baseUrl,
    sessionManager,
    acceptCompression: [],
    // A message is at most 3 MiB of data plus a few bytes of framing.
    readMaxBytes: MAX_MESSAGE_BYTES,
    token: tokenOf,
  });
  const bulk = new BulkChannel(baseUrl, tokenOf, tls);
  const imageTransport = Object.assign(transport, {
    close: () => {
      sessionManager.abort();
      bulk.close();
    },
  });
  bulkChannels.set(imageTransport, bulk);
  return imageTransport;
}

/**
 * A client of ImageStoreService. Over an `imageStoreTransport`, PutBlob and
 * GetBlob go through the transport's bulk channel (a thin gRPC client);
 * over any other transport, everything goes through Connect.
 */
export function imageStoreClient(transport: Transport): ImageStoreClient {
  const client = createClient(ImageStoreService, transport);
  const bulk = bulkChannels.get(transport);
  if (!bulk) return client;
  const thin = Object.assign(Object.create(client) as ImageStoreClient, {
    putBlob: (requests: AsyncIterable<MessageInitShape<typeof PutBlobRequestSchema>>, options?: CallOptions) => bulk.putBlob(requests, options),
    getBlob: (request: MessageInitShape<typeof GetBlobRequestSchema>, options?: CallOptions) => bulk.getBlob(request, options),
  });
  bulkChannels.set(thin, bulk);
  return thin;
}

/** Largest message either side of a blob call: 3 MiB of data plus its fields. */
const MAX_MESSAGE_BYTES = 4 * 1024 * 1024;
const PUT_BLOB_PATH = `/${ImageStoreService.typeName}/PutBlob`;
const GET_BLOB_PATH = `/${ImageStoreService.typeName}/GetBlob`;
/** PutBlobRequest.data, written after the other fields without a copy. */
const PUT_BLOB_DATA_FIELD = PutBlobRequestSchema.field.data.number;
const GET_BLOB_DATA_FIELD = GetBlobResponseSchema.field.data.number;

/**
 * PutBlob and GetBlob as a thin gRPC client (lib/grpc/client.ts) on an
 * HTTP/2 connection of its own with wide receive windows. It keeps what a
 * Connect client gives: the bearer token and `headers`, `timeoutMs` (sent as
 * grpc-timeout and enforced here: DeadlineExceeded), `signal` (the call is
 * reset: Canceled), and statuses from the trailers as ConnectErrors (not
 * onHeader/onTrailer, which no caller uses). The connection holds the
 * process open only while a call is in progress.
 */
class BulkChannel {
  #session: http2.ClientHttp2Session | undefined;
  /** Calls in progress on each session (a session is ref'd while it has any). */
  readonly #calls = new WeakMap<http2.ClientHttp2Session, number>();
  #closed = false;

  constructor(
    private readonly baseUrl: string,
    private readonly token: () => string,
    private readonly tls: ClientTls,
  ) {}

  close(): void {
    this.#closed = true;
    this.#session?.destroy();
    this.#session = undefined;
  }

  /**
   * Opens a call and returns it with its end: a signal aborted (with the
   * ConnectError to throw) by the deadline or the caller's signal, and
   * `done()` to run once the call is over.
   */
  #open(path: string, options: CallOptions = {}): { call: RawClientCall; ended: AbortSignal; done: () => void } {
    if (this.#closed) throw new ConnectError("the transport is closed", Code.Unavailable);
    options.signal?.throwIfAborted();
    let session = this.#session;
    if (!session || session.closed || session.destroyed) {
      session = connectHttp2(this.baseUrl, this.tls);
      session.unref();
      this.#session = session;
    }
    const headers: Record<string, string> = {};
    new Headers(options.headers).forEach((value, key) => (headers[key] = value));
    const token = this.token();
    if (token !== "") headers.authorization = `Bearer ${token}`;
    if (options.timeoutMs !== undefined) headers["grpc-timeout"] = `${Math.max(1, Math.ceil(options.timeoutMs))}m`;
    const call = openRawCall(session, path, headers, { maxMessageBytes: MAX_MESSAGE_BYTES });
    const calls = this.#calls.get(session) ?? 0;
    this.#calls.set(session, calls + 1);
    if (calls === 0) session.ref();
    const ended = new AbortController();
    const end = (reason: ConnectError) => {
      if (ended.signal.aborted) return;
      ended.abort(reason);
      call.cancel();
    };
    const timer =
      options.timeoutMs === undefined
        ? undefined
        : setTimeout(() => end(new ConnectError("the call's deadline passed", Code.DeadlineExceeded)), options.timeoutMs);
    const onAbort = () => end(new ConnectError("the call was cancelled", Code.Canceled));
    options.signal?.addEventListener("abort", onAbort, { once: true });
    let finished = false;
    const owner = session;
    return {
      call,
      ended: ended.signal,
      done: () => {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        options.signal?.removeEventListener("abort", onAbort);
        call.cancel();
        const left = (this.#calls.get(owner) ?? 1) - 1;
        this.#calls.set(owner, left);
        if (left === 0 && !owner.destroyed) owner.unref();
      },
    };
  }

  async *getBlob(request: MessageInitShape<typeof GetBlobRequestSchema>, options?: CallOptions): AsyncGenerator<GetBlobResponse> {
    for await (const { message, data } of this.getBlobPieces(request, options)) {
      message.data = data.length === 1 ? data[0] : Buffer.concat(data);
      yield message;
    }
  }

  /** GetBlob's responses, each with its data as views of the frames it came in (no copy). */
  async *getBlobPieces(
    request: MessageInitShape<typeof GetBlobRequestSchema>,
    options?: CallOptions,
  ): AsyncGenerator<{ message: GetBlobResponse; data: Buffer[] }> {
    const { call, ended, done } = this.#open(GET_BLOB_PATH, options);
    try {
      call.write(frame(toBinary(GetBlobRequestSchema, create(GetBlobRequestSchema, request))));
      call.end();
      for await (const pieces of call.messagePieces()) {
        if (ended.aborted) break;
        yield splitBulkMessage(GetBlobResponseSchema, pieces, GET_BLOB_DATA_FIELD, Code.Internal);
      }
      ended.throwIfAborted();
    } catch (err) {
      throw ended.aborted ? ConnectError.from(ended.reason) : err;
    } finally {
      done();
    }
  }

  async putBlob(requests: AsyncIterable<MessageInitShape<typeof PutBlobRequestSchema>>, options?: CallOptions): Promise<PutBlobResponse> {
    const { call, ended, done } = this.#open(PUT_BLOB_PATH, options);
    try {
      const reply = (async () => {
        let response: PutBlobResponse | undefined;
        for await (const message of call.messages()) {
          if (response) throw new ConnectError("put_blob answered more than one message", Code.Internal);
          response = decodeMessage(PutBlobResponseSchema, message, Code.Internal);
        }
        if (!response) throw new ConnectError("put_blob answered no message", Code.Internal);
        return response;
      })();
      const sending = (async () => {
        for await (const request of requests) {
          // The store answered (an error, or "exists") or the call ended: stop.
          if (call.stream.closed || call.stream.destroyed || ended.aborted) return;
          const payload = request.data ?? new Uint8Array(0);
          const fields = create(PutBlobRequestSchema, { digest: request.digest, size: request.size, offset: request.offset, digestAtEnd: request.digestAtEnd });
          call.write(bytesFieldHeader(PUT_BLOB_DATA_FIELD, payload.length, Array.from(toBinary(PutBlobRequestSchema, fields))));
          if (!call.write(payload) && !call.stream.closed && !call.stream.destroyed) await call.drained().catch(() => undefined);
        }
        call.end();
      })();
      // Whichever comes first: the answer (maybe before every message went
      // out), or a failure of the request stream itself.
      sending.catch(() => undefined);
      reply.catch(() => undefined);
      await Promise.race([reply, sending]);
      return await reply;
    } catch (err) {
      throw ended.aborted ? ConnectError.from(ended.reason) : err;
    } finally {
      done();
    }
  }
}

/** Progress of one blob transfer. */
export interface BlobProgress {
  digest: string;
  /** Bytes of the blob present at the receiver (including a resumed prefix). */
  bytesDone: number;
  size: number;
}

/** A transfer is tried again (from where it stopped) after a retryable failure (`classify`), with this backoff. */
const TRANSFER_BACKOFF = { initialMs: 100, maxMs: 5000 } as const;

export interface TransferOptions {
  /** Attempts in all (a resume counts as one); default 5. */
  attempts?: number;
  signal?: AbortSignal;
  /** Called as bytes arrive, at most once per chunk. */
  onProgress?: (progress: BlobProgress) => void;
  /** Deadline of each call, ms; default none. */
  timeoutMs?: number;
  /** Deadline of an upload's QueryUpload, ms; default timeoutMs. */
  queryTimeoutMs?: number;
  /** An upload's first QueryUpload answered: what the store holds of the blob. */
  onHeld?: (held: { exists: boolean; committedOffset: number }) => void;
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
  let bytesSent = 0;
  return retry(
    async (attempt) => {
      try {
        const query = await client.queryUpload({ digest }, { signal: options.signal, timeoutMs: options.queryTimeoutMs ?? options.timeoutMs });
        if (attempt === 1) options.onHeld?.({ exists: query.exists, committedOffset: Number(query.committedOffset) });
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
        throw ConnectError.from(err);
      }
    },
    { ...TRANSFER_BACKOFF, maxAttempts: options.attempts ?? 5, signal: options.signal },
  );
}

/** From this size on, uploadBlobHashing hashes on a thread of its own (starting one costs about 30 ms). */
const HASH_THREAD_MIN_BYTES = 64 * 1024 * 1024;
/** Bytes handed to the hashing thread and not hashed yet, at most. */
const HASH_THREAD_BACKLOG_BYTES = 16 * 1024 * 1024;

/** The hashing thread: sha256 of the chunks it is sent, acknowledging each; `null` asks for the digest. */
const HASH_THREAD_CODE = `
const { parentPort } = require("node:worker_threads");
const hash = require("node:crypto").createHash("sha256");
parentPort.on("message", (m) => {
  if (m === null) return parentPort.postMessage("sha256:" + hash.digest("hex"));
  hash.update(m);
  parentPort.postMessage(m.length);
});
`;

/**
 * sha256 on a worker thread, so that hashing a big upload overlaps sending
 * it instead of taking the sending thread's time. Each chunk is copied to the
 * thread; update() waits while more than HASH_THREAD_BACKLOG_BYTES are queued.
 */
class ThreadHash {
  readonly #worker = new Worker(HASH_THREAD_CODE, { eval: true });
  #queued = 0;
  #waiters: (() => void)[] = [];
  #digest: { resolve: (digest: string) => void; reject: (err: Error) => void } | undefined;
  #failure: Error | undefined;

  constructor() {
    this.#worker.on("message", (m: number | string) => {
      if (typeof m === "string") return this.#digest?.resolve(m);
      this.#queued -= m;
      while (this.#queued <= HASH_THREAD_BACKLOG_BYTES && this.#waiters.length > 0) this.#waiters.shift()!();
    });
    this.#worker.on("error", (err) => {
      this.#failure = err;
      for (const wake of this.#waiters.splice(0)) wake();
      this.#digest?.reject(err);
    });
  }

  async update(data: Uint8Array): Promise<void> {
    if (this.#failure) throw this.#failure;
    this.#queued += data.length;
    // A copy of just these bytes, moved to the thread (posting a view would copy its whole buffer).
    const copy = new Uint8Array(data);
    this.#worker.postMessage(copy, [copy.buffer]);
    if (this.#queued > HASH_THREAD_BACKLOG_BYTES) await new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  digest(): Promise<string> {
    if (this.#failure) return Promise.reject(this.#failure);
    const digest = new Promise<string>((resolve, reject) => (this.#digest = { resolve, reject }));
    this.#worker.postMessage(null);
    return digest;
  }

  async close(): Promise<void> {
    await this.#worker.terminate();
  }
}

/**
 * Uploads one blob whose digest is not known yet, reading `source` once:
 * PutBlob with digest_at_end, hashing what it sends and naming the digest in
 * the last message; the store commits the blob only if its hash matches.
 * Not resumable: a transient failure sends the blob again whole (with
 * backoff). A source that yields other than `size` bytes is an
 * InvalidArgument. Resolves with the digest once the store holds the blob.
 */
export async function uploadBlobHashing(
  client: ImageStoreClient,
  blob: { size: number; source: BlobSource },
  options: Omit<TransferOptions, "onHeld" | "queryTimeoutMs"> = {},
): Promise<{ digest: string; alreadyExisted: boolean }> {
  const { size } = blob;
  return retry(
    async () => {
      const hash = size >= HASH_THREAD_MIN_BYTES ? new ThreadHash() : createHash("sha256");
      let at = 0;
      let digest = "";
      const requests = async function* () {
        let held: Uint8Array | undefined;
        // Each message goes out once the next is read, so the last one can carry the digest.
        for await (const data of blob.source(0)) {
          for (let i = 0; i < data.length; i += BLOB_CHUNK_BYTES) {
            const piece = data.subarray(i, i + BLOB_CHUNK_BYTES);
            if (at + piece.length > size) throw new ConnectError(`the source has more than its size ${size}`, Code.InvalidArgument);
            await hash.update(piece);
            if (held) yield message(held, at - held.length, "");
            held = piece;
            at += piece.length;
          }
        }
        if (at !== size) throw new ConnectError(`the source ended at ${at} of its size ${size}`, Code.InvalidArgument);
        digest = hash instanceof ThreadHash ? await hash.digest() : digestOf(hash);
        yield message(held ?? new Uint8Array(0), size - (held?.length ?? 0), digest);
      };
      const message = (data: Uint8Array, offset: number, last: string) => {
        options.onProgress?.({ digest: last, bytesDone: offset + data.length, size });
        return offset === 0
          ? { digestAtEnd: true, size: BigInt(size), offset: 0n, data, digest: last }
          : { offset: BigInt(offset), data, digest: last };
      };
      try {
        const response = await client.putBlob(requests(), { signal: options.signal, timeoutMs: options.timeoutMs });
        if (!response.complete || response.digest !== digest) {
          throw new ConnectError(`upload ended at ${response.committedSize} of ${size} without the blob`, Code.Internal);
        }
        return { digest, alreadyExisted: response.alreadyExisted };
      } catch (err) {
        throw ConnectError.from(err);
      } finally {
        if (hash instanceof ThreadHash) await hash.close();
      }
    },
    { ...TRANSFER_BACKOFF, maxAttempts: options.attempts ?? 5, signal: options.signal },
  );
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
  for await (const pieces of readBlobPieces(client, request, options)) {
    yield pieces.length === 1 ? pieces[0] : Buffer.concat(pieces);
  }
}

/**
 * Like readBlobChunks, but each chunk is the list of its pieces: over an
 * imageStoreTransport, views of the frames it arrived in (no copy), to be
 * hashed and written (writePieces) as they are.
 */
export async function* readBlobPieces(
  client: ImageStoreClient,
  request: { digest: string; offset?: number; length?: number },
  options: { signal?: AbortSignal; timeoutMs?: number; onSize?: (size: number) => void } = {},
): AsyncGenerator<Uint8Array[]> {
  const init = {
    digest: request.digest,
    offset: BigInt(request.offset ?? 0),
    length: request.length === undefined ? undefined : BigInt(request.length),
  };
  const callOptions = { signal: options.signal, timeoutMs: options.timeoutMs };
  const bulk = bulkChannels.get(client);
  const responses = bulk
    ? bulk.getBlobPieces(init, callOptions)
    : (async function* () {
        for await (const message of client.getBlob(init, callOptions)) yield { message, data: [message.data] };
      })();
  let expected = request.offset ?? 0;
  let first = true;
  for await (const { message, data } of responses) {
    if (first) options.onSize?.(Number(message.size));
    first = false;
    if (Number(message.offset) !== expected) {
      throw new ConnectError(`store sent offset ${message.offset}, expected ${expected}`, Code.DataLoss);
    }
    for (const piece of data) expected += piece.length;
    yield data;
  }
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
  let size = blob.size ?? -1;
  // Chunks are written while the next arrive; a failed write fails the download.
  const writer = new BackgroundWriter(file, offset);
  try {
    await retry(
      async () => {
        try {
          for await (const pieces of readBlobPieces(
            client,
            { digest, offset },
            { signal: options.signal, timeoutMs: options.timeoutMs, onSize: (s) => (size = s) },
          )) {
            for (const piece of pieces) hash.update(piece);
            await writer.write(pieces);
            for (const piece of pieces) offset += piece.length;
            options.onProgress?.({ digest, bytesDone: offset, size });
          }
          await writer.settle();
        } catch (err) {
          await writer.settle();
          throw ConnectError.from(err);
        }
      },
      { ...TRANSFER_BACKOFF, maxAttempts: options.attempts ?? 5, signal: options.signal },
    );
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
