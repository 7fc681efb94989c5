/**
 * A hand-written gRPC (HTTP/2) handler for the two bulk RPCs, PutBlob and
 * GetBlob, mounted on the server's port ahead of the Connect adapter (through
 * createServer's `http` option). Why: connect-node, fully tuned, holds blob
 * transfers to about 40% of raw loopback TCP; this handler moves the same
 * wire protocol with fewer copies (FACTS.md "Bulk bytes over gRPC").
 *
 * It speaks plain gRPC (`application/grpc` or `application/grpc+proto`) over
 * HTTP/2 only; gRPC-Web, Connect and JSON requests fall through to the Connect
 * adapter, which serves the same methods. It honours `grpc-timeout`
 * (DeadlineExceeded), cancellation (the stream's reset or close aborts the
 * call), auth (the service methods check the token), error trailers with
 * percent-encoded `grpc-message`, and refuses compression (it advertises
 * `grpc-accept-encoding: identity`; a compressed message is InvalidArgument).
 */
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { constants as http2constants, type Http2ServerRequest, type Http2ServerResponse, type IncomingHttpHeaders, type ServerHttp2Stream } from "node:http2";
import { GetBlobRequestSchema, ImageStoreService, PutBlobRequestSchema, PutBlobResponseSchema } from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import type { Logger } from "../../lib/logger.js";
import type { HttpRequest, HttpResponse } from "../../lib/server.js";
import { MAX_CHUNK_BYTES, type BlobPiece, type ImageStoreServiceImpl } from "./store-service.js";

const PUT_BLOB = `/${ImageStoreService.typeName}/PutBlob`;
const GET_BLOB = `/${ImageStoreService.typeName}/GetBlob`;
const GRPC_CONTENT_TYPE = /^application\/grpc(\+proto)?(;.*)?$/i;
/** A message is at most 3 MiB of data plus its fields. */
const MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 64 * 1024;

/** Returns the `http` handler of createServer that answers the bulk RPCs. */
export function createBulkGrpcHandler(service: ImageStoreServiceImpl, logger: Logger): (req: HttpRequest, res: HttpResponse) => boolean {
  const log = logger.child({ subsystem: "bulk-grpc" });
  return (req, res) => {
    if (req.httpVersion !== "2.0" || req.method !== "POST") return false;
    const path = req.url?.split("?", 1)[0];
    if (path !== PUT_BLOB && path !== GET_BLOB) return false;
    if (!GRPC_CONTENT_TYPE.test(String(req.headers["content-type"] ?? ""))) return false;
    const h2req = req as Http2ServerRequest;
    void serve(path, h2req, res as Http2ServerResponse, service, log);
    return true;
  };
}

async function serve(
  procedure: string,
  req: Http2ServerRequest,
  res: Http2ServerResponse,
  service: ImageStoreServiceImpl,
  log: Logger,
): Promise<void> {
  const stream = res.stream;
  const started = performance.now();
  const controller = new AbortController();
  const onClose = () => controller.abort(new ConnectError("the client cancelled the call", Code.Canceled));
  stream.once("close", onClose);
  stream.once("aborted", onClose);
  let timer: NodeJS.Timeout | undefined;
  let outcome: ConnectError | undefined;
  try {
    const encoding = req.headers["grpc-encoding"];
    if (encoding !== undefined && encoding !== "identity") {
      throw new ConnectError(`grpc-encoding ${String(encoding)} is not supported`, Code.Unimplemented);
    }
    const timeoutMs = parseTimeout(req.headers["grpc-timeout"]);
    if (timeoutMs !== undefined) {
      timer = setTimeout(() => controller.abort(new ConnectError("the call's deadline passed", Code.DeadlineExceeded)), timeoutMs);
    }
    const headers = toHeaders(req.headers);
    stream.respond(
      { ":status": 200, "content-type": "application/grpc+proto", "grpc-accept-encoding": "identity" },
      { waitForTrailers: true },
    );
    const work =
      procedure === PUT_BLOB
        ? servePut(req, stream, headers, controller.signal, service)
        : serveGet(req, stream, headers, controller.signal, service);
    await abortable(work, controller.signal);
  } catch (err) {
    outcome = controller.signal.aborted ? ConnectError.from(controller.signal.reason) : toConnectError(err, log);
  } finally {
    clearTimeout(timer);
    stream.off("close", onClose);
    stream.off("aborted", onClose);
  }
  const code = outcome?.code ?? 0;
  log.info(
    { procedure, code: outcome ? Code[outcome.code] : "OK", durationMs: Math.round(performance.now() - started), reason: outcome?.rawMessage },
    outcome ? "rpc failed" : "rpc finished",
  );
  if (stream.destroyed || stream.closed) return;
  const trailers: Record<string, string> = { "grpc-status": String(code) };
  if (outcome) trailers["grpc-message"] = encodeGrpcMessage(outcome.rawMessage);
  if (!stream.headersSent) {
    // Trailers-only response.
    stream.respond(
      { ":status": 200, "content-type": "application/grpc+proto", "grpc-accept-encoding": "identity", ...trailers },
      { endStream: true },
    );
    closeUnfinished(req, stream);
    return;
  }
  // The compatibility layer's response (which owns this stream) sends its
  // trailers when the stream asks for them (respond() had waitForTrailers).
  res.addTrailers(trailers);
  stream.end();
  // Runs after the compatibility layer's own listener has sent the trailers.
  if (outcome) stream.once("wantTrailers", () => closeUnfinished(req, stream));
}

/**
 * After an error the client may still be sending (an upload refused or timed
 * out mid-way): once the trailers are out, reset the stream with NO_ERROR as
 * gRPC servers do, which also ends the request body a handler may still read.
 */
function closeUnfinished(req: Http2ServerRequest, stream: ServerHttp2Stream): void {
  if (req.complete || stream.destroyed) return;
  setImmediate(() => {
    if (!stream.destroyed) stream.close(http2constants.NGHTTP2_NO_ERROR);
  });
}

/** Rejects with the signal's reason as soon as it aborts, whatever `work` does. */
function abortable<T>(work: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    work.then(
      (v) => {
        signal.removeEventListener("abort", onAbort);
        resolve(v);
      },
      (e) => {
        signal.removeEventListener("abort", onAbort);
        reject(e);
      },
    );
  });
}

async function servePut(
  req: Http2ServerRequest,
  stream: ServerHttp2Stream,
  headers: Headers,
  signal: AbortSignal,
  service: ImageStoreServiceImpl,
): Promise<void> {
  const messages = (async function* (): AsyncGenerator<BlobPiece> {
    for await (const bytes of readMessages(req, signal)) {
      yield decode(PutBlobRequestSchema, bytes);
    }
  })();
  const response = await service.receiveBlob(headers, signal, messages);
  await write(stream, frame(toBinary(PutBlobResponseSchema, response)), signal);
}

async function serveGet(
  req: Http2ServerRequest,
  stream: ServerHttp2Stream,
  headers: Headers,
  signal: AbortSignal,
  service: ImageStoreServiceImpl,
): Promise<void> {
  let request: ReturnType<typeof fromBinary<typeof GetBlobRequestSchema>> | undefined;
  for await (const bytes of readMessages(req, signal)) {
    if (request) throw new ConnectError("get_blob takes exactly one request message", Code.InvalidArgument);
    request = decode(GetBlobRequestSchema, bytes);
  }
  if (!request) throw new ConnectError("get_blob takes exactly one request message", Code.InvalidArgument);
  const chunks = await service.openBlob(headers, request);
  // Read the next chunk from disk while the current one drains to the socket.
  let pending = chunks.next();
  try {
    for (;;) {
      const next = await pending;
      if (next.done) break;
      const { offset, data, size } = next.value;
      const head = chunkHeader(offset, data.length, size);
      pending = chunks.next();
      stream.write(head);
      const flushed = stream.write(data);
      if (!flushed) await drained(stream, signal);
    }
  } finally {
    // Stops reading (closes the file) when the call ends early.
    await pending.catch(() => undefined);
    await chunks.return(undefined);
  }
}

/**
 * The 5-byte gRPC prefix plus a GetBlobResponse's fields up to the length of
 * `data`, whose bytes follow without being copied: field 1 offset (varint),
 * field 3 size (varint, first chunk), field 2 data (length-delimited).
 */
function chunkHeader(offset: number, dataLength: number, size: number | undefined): Buffer {
  const fields: number[] = [];
  if (offset > 0) fields.push(0x08, ...varint(offset));
  if (size !== undefined && size > 0) fields.push(0x18, ...varint(size));
  fields.push(0x12, ...varint(dataLength));
  const head = Buffer.allocUnsafe(5 + fields.length);
  head[0] = 0;
  head.writeUInt32BE(fields.length + dataLength, 1);
  head.set(fields, 5);
  return head;
}

function varint(n: number): number[] {
  const out: number[] = [];
  let v = BigInt(n);
  while (v >= 0x80n) {
    out.push(Number(v & 0x7fn) | 0x80);
    v >>= 7n;
  }
  out.push(Number(v));
  return out;
}

function frame(message: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(5 + message.length);
  out[0] = 0;
  out.writeUInt32BE(message.length, 1);
  out.set(message, 5);
  return out;
}

/** The gRPC messages of a request body, each as one contiguous buffer. */
async function* readMessages(req: Http2ServerRequest, signal: AbortSignal): AsyncGenerator<Uint8Array> {
  let parts: Buffer[] = [];
  let buffered = 0;
  let want = -1; // length of the message being assembled; -1: reading a prefix
  const take = (n: number): Buffer => {
    // Takes the first n buffered bytes, copying only when they span chunks.
    let out: Buffer;
    if (parts[0].length >= n) {
      out = parts[0].subarray(0, n);
      parts[0] = parts[0].subarray(n);
      if (parts[0].length === 0) parts.shift();
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const p = parts[0];
        const k = Math.min(p.length, n - at);
        p.copy(out, at, 0, k);
        at += k;
        if (k === p.length) parts.shift();
        else parts[0] = p.subarray(k);
      }
    }
    buffered -= n;
    return out;
  };
  for await (const chunk of req as AsyncIterable<Buffer>) {
    if (signal.aborted) throw signal.reason;
    parts.push(chunk);
    buffered += chunk.length;
    for (;;) {
      if (want < 0) {
        if (buffered < 5) break;
        const prefix = take(5);
        if ((prefix[0] & 1) !== 0) throw new ConnectError("compressed messages are not supported", Code.InvalidArgument);
        want = prefix.readUInt32BE(1);
        if (want > MAX_MESSAGE_BYTES) {
          throw new ConnectError(`message of ${want} bytes is larger than ${MAX_MESSAGE_BYTES}`, Code.ResourceExhausted);
        }
      }
      if (buffered < want) break;
      const message = want === 0 ? new Uint8Array(0) : take(want);
      want = -1;
      yield message;
    }
  }
  if (want >= 0 || buffered > 0) throw new ConnectError("request ended inside a message", Code.InvalidArgument);
  parts = [];
}

function write(stream: ServerHttp2Stream, data: Uint8Array, signal: AbortSignal): Promise<void> {
  if (stream.write(data)) return Promise.resolve();
  return drained(stream, signal);
}

function drained(stream: ServerHttp2Stream, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = () => {
      stream.off("drain", done);
      stream.off("close", done);
      signal.removeEventListener("abort", done);
      if (signal.aborted) reject(signal.reason);
      else if (stream.destroyed) reject(new ConnectError("the stream closed", Code.Canceled));
      else resolve();
    };
    stream.once("drain", done);
    stream.once("close", done);
    signal.addEventListener("abort", done, { once: true });
  });
}

function toHeaders(incoming: IncomingHttpHeaders): Headers {
  const headers = new Headers();
  for (const [key, value] of Object.entries(incoming)) {
    if (key.startsWith(":") || value === undefined) continue;
    for (const v of Array.isArray(value) ? value : [value]) headers.append(key, v);
  }
  return headers;
}

/** gRPC's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n). */
function parseTimeout(value: string | string[] | undefined): number | undefined {
  if (typeof value !== "string") return undefined;
  const match = /^(\d{1,8})([HMSmun])$/.exec(value);
  if (!match) throw new ConnectError("grpc-timeout is malformed", Code.InvalidArgument);
  const n = Number(match[1]);
  const unitMs = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 }[match[2] as "H"];
  return Math.max(1, Math.ceil(n * unitMs));
}

/** Percent-encodes a grpc-message as the gRPC spec says. */
function encodeGrpcMessage(message: string): string {
  const bytes = Buffer.from(message, "utf8");
  let out = "";
  for (const b of bytes) {
    out += b >= 0x20 && b <= 0x7e && b !== 0x25 ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

/** Decodes a request message; malformed bytes are the caller's fault. */
function decode<S extends typeof PutBlobRequestSchema | typeof GetBlobRequestSchema>(schema: S, bytes: Uint8Array) {
  try {
    return fromBinary(schema, bytes);
  } catch {
    throw new ConnectError("request message is malformed", Code.InvalidArgument);
  }
}

/** ConnectErrors pass; anything else is a bug: logged, sent as a generic Internal. */
function toConnectError(err: unknown, log: Logger): ConnectError {
  if (err instanceof ConnectError) return err;
  log.error({ err }, "bulk rpc failed");
  return new ConnectError("internal error", Code.Internal);
}
