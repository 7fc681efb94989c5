/**
 * Hand-written gRPC (HTTP/2) handlers for the few RPCs that move bulk bytes
 * (image blobs, tunnels), mounted on a server's port ahead of the Connect
 * adapter through createServer's `http` option. Why: connect-node, fully
 * tuned, holds bulk transfers to about 40% of raw loopback TCP; a handler that
 * frames messages itself moves the same wire protocol with fewer copies
 * (FACTS.md "Bulk bytes over gRPC"). Every gRPC client (connect-node,
 * grpc-js, Python, buf curl) calls these RPCs as it calls any other.
 *
 * It speaks plain gRPC (`application/grpc` or `application/grpc+proto`) over
 * HTTP/2 only; gRPC-Web, Connect and JSON requests fall through to the Connect
 * adapter, which serves the same methods. It honours `grpc-timeout`
 * (DeadlineExceeded), cancellation (the stream's reset or close aborts the
 * call's signal), error trailers with percent-encoded `grpc-message`, and
 * refuses compression (it advertises `grpc-accept-encoding: identity`; a
 * compressed message is InvalidArgument). Every call first goes through the
 * server's authorization hook (ServerOptions.authorize), as the Connect
 * adapter's calls do, before the procedure reads a message; a refusal is a
 * trailers-only response. What is specific to the resource (this digest,
 * this job) stays the procedure's job: it receives the request headers.
 */
import { fromBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createContextValues, type ContextValues } from "@connectrpc/connect";
import { constants as http2constants, type Http2ServerRequest, type Http2Stream, type Http2ServerResponse, type IncomingHttpHeaders, type ServerHttp2Stream } from "node:http2";
import { Readable } from "node:stream";
import type { Logger } from "../logger.js";
import type { ExtraHttpHandler } from "../server.js";
import { codeName, type Authorize } from "./interceptors.js";
import type { RpcMetrics } from "./metrics.js";

const GRPC_CONTENT_TYPE = /^application\/grpc(\+proto)?(;.*)?$/i;

/** One call of a raw procedure. */
export interface RawGrpcCall {
  /** "/pkg.Service/Method". */
  readonly procedure: string;
  /** The request headers, pseudo-headers left out. */
  readonly headers: Headers;
  /** What the server's authorization hook established (the caller). */
  readonly values: ContextValues;
  /** Aborts with the ConnectError that ends the call (cancel, deadline). */
  readonly signal: AbortSignal;
  /** The response stream; response headers are already sent. */
  readonly stream: ServerHttp2Stream;
  /** The request's messages, each one contiguous buffer, at most `maxMessageBytes`. */
  messages(): AsyncGenerator<Uint8Array>;
  /** The same messages, each as the list of its pieces (no copy; see readMessagePieces). */
  pieces(): AsyncGenerator<Buffer[]>;
  /** Writes bytes (framed messages) and resolves once the stream can take more. */
  write(data: Uint8Array): Promise<void>;
}

export type RawGrpcProcedure = (call: RawGrpcCall) => Promise<void>;

export interface RawGrpcOptions {
  /** Procedures by path. */
  procedures: Record<string, RawGrpcProcedure>;
  /** Largest request message accepted (ResourceExhausted beyond). */
  maxMessageBytes: number;
  logger: Logger;
}

/** Returns the `http` handler of createServer that answers the given procedures. */
export function createRawGrpcHandler(options: RawGrpcOptions): ExtraHttpHandler {
  const log = options.logger.child({ subsystem: "raw-grpc" });
  return (req, res, server) => {
    if (req.httpVersion !== "2.0" || req.method !== "POST") return false;
    const path = req.url?.split("?", 1)[0] ?? "";
    const procedure = Object.hasOwn(options.procedures, path) ? options.procedures[path] : undefined;
    if (!procedure) return false;
    if (!GRPC_CONTENT_TYPE.test(String(req.headers["content-type"] ?? ""))) return false;
    void serve(path, procedure, req as Http2ServerRequest, res as Http2ServerResponse, options.maxMessageBytes, log, server);
    return true;
  };
}

async function serve(
  path: string,
  procedure: RawGrpcProcedure,
  req: Http2ServerRequest,
  res: Http2ServerResponse,
  maxMessageBytes: number,
  log: Logger,
  { rpcMetrics: metrics, authorize }: { rpcMetrics: RpcMetrics; authorize: Authorize },
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
    const signal = controller.signal;
    const headers = toHeaders(req.headers);
    const values = createContextValues();
    await abortable(authorize(path, headers, values), signal);
    stream.respond(
      { ":status": 200, "content-type": "application/grpc+proto", "grpc-accept-encoding": "identity" },
      { waitForTrailers: true },
    );
    const call: RawGrpcCall = {
      procedure: path,
      headers,
      values,
      signal,
      stream,
      messages: () => readMessages(req, signal, maxMessageBytes),
      pieces: () => readMessagePieces(req, signal, maxMessageBytes),
      write: (data) => write(stream, data, signal),
    };
    await abortable(procedure(call), signal);
  } catch (err) {
    outcome = controller.signal.aborted ? ConnectError.from(controller.signal.reason) : toConnectError(err, log);
  } finally {
    clearTimeout(timer);
    stream.off("close", onClose);
    stream.off("aborted", onClose);
  }
  const code = outcome?.code ?? 0;
  const durationMs = performance.now() - started;
  // Logged and counted as the RPC interceptor does for Connect-served calls.
  metrics.observe(path, codeName(outcome?.code), durationMs / 1000);
  log.info(
    { procedure: path, code: codeName(outcome?.code), durationMs: Math.round(durationMs), reason: outcome?.rawMessage },
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
  // A bidi call may end while its client still sends (a tunnel closed by the
  // server), not only a failed one.
  stream.once("wantTrailers", () => closeUnfinished(req, stream));
}

/**
 * After the call ended the client may still be sending (an upload refused or
 * timed out mid-way, a bidi stream the server closed): once the trailers are
 * out, reset the stream with NO_ERROR as gRPC servers do, which also ends the
 * request body a handler may still read.
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

/** A protobuf varint's bytes. */
export function varint(n: number): number[] {
  const out: number[] = [];
  if (Number.isInteger(n) && n >= 0 && n <= 0xffffffff) {
    // The common case (lengths, offsets under 4 GiB) without BigInt.
    let v = n;
    while (v >= 0x80) {
      out.push((v & 0x7f) | 0x80);
      v = Math.floor(v / 128);
    }
    out.push(v);
    return out;
  }
  let v = BigInt(n);
  while (v >= 0x80n) {
    out.push(Number(v & 0x7fn) | 0x80);
    v >>= 7n;
  }
  out.push(Number(v));
  return out;
}

/** One uncompressed gRPC message: the 5-byte prefix, then the message. */
export function frame(message: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(5 + message.length);
  out[0] = 0;
  out.writeUInt32BE(message.length, 1);
  out.set(message, 5);
  return out;
}

/**
 * The 5-byte gRPC prefix of a message made of `fields` (already encoded
 * fields) followed by one length-delimited field `fieldNumber` of
 * `payloadLength` bytes, up to that payload, which the caller writes next
 * without copying it.
 */
export function bytesFieldHeader(fieldNumber: number, payloadLength: number, fields: ArrayLike<number> = []): Buffer {
  const tag = varint((fieldNumber << 3) | 2);
  const length = varint(payloadLength);
  const headLength = fields.length + tag.length + length.length;
  const head = Buffer.allocUnsafe(5 + headLength);
  head[0] = 0;
  head.writeUInt32BE(headLength + payloadLength, 1);
  let at = 5;
  for (let i = 0; i < fields.length; i++) head[at++] = fields[i];
  for (const b of tag) head[at++] = b;
  for (const b of length) head[at++] = b;
  return head;
}

/**
 * The payload of a message that holds nothing but one length-delimited field
 * `fieldNumber` (a oneof's `bytes data`), as a view of `message`; undefined
 * when the message is anything else (then decode it in full). Lets a byte
 * stream skip the protobuf runtime for its data messages.
 */
export function soleBytesField(message: Uint8Array, fieldNumber: number): Uint8Array | undefined {
  const at = soleBytesFieldStart(message, fieldNumber, message.length);
  return at === undefined ? undefined : message.subarray(at);
}

/**
 * soleBytesField for a message in pieces (readMessagePieces): the payload's
 * pieces, views, never copies. Undefined also when the field's header is
 * split between pieces (rare: then join the pieces and decode).
 */
export function soleBytesFieldPieces(pieces: readonly Buffer[], fieldNumber: number): Buffer[] | undefined {
  if (pieces.length === 0) return undefined;
  let total = 0;
  for (const p of pieces) total += p.length;
  const at = soleBytesFieldStart(pieces[0], fieldNumber, total);
  return at === undefined ? undefined : slicePieces(pieces, at, total);
}

/** The bytes [from, to) of a message's pieces taken together, as views (no copy). */
export function slicePieces(pieces: readonly Buffer[], from: number, to: number): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  for (const p of pieces) {
    const start = Math.max(from - at, 0);
    const stop = Math.min(to - at, p.length);
    if (stop > start) out.push(start === 0 && stop === p.length ? p : p.subarray(start, stop));
    at += p.length;
    if (at >= to) break;
  }
  return out;
}

/** Where the payload starts when the `total` bytes starting with `head` are exactly one bytes field. */
function soleBytesFieldStart(head: Uint8Array, fieldNumber: number, total: number): number | undefined {
  const tag = (fieldNumber << 3) | 2;
  if (tag > 0x7f || head.length < 2 || head[0] !== tag) return undefined;
  let length = 0;
  let shift = 1;
  let at = 1;
  for (;;) {
    if (at >= head.length || at > 5) return undefined;
    const b = head[at++];
    length += (b & 0x7f) * shift;
    if (b < 0x80) break;
    shift *= 128;
  }
  return at + length === total ? at : undefined;
}

/**
 * The gRPC messages of a length-prefixed byte stream (a request body, or a
 * response body on the client side), each as one contiguous buffer.
 *
 * A Node stream is read with 'data' events (HTTP/2 delivers the body in
 * frames of at most 16 KiB): each message is copied once out of its frames,
 * where Readable's async iterator would first concatenate what is buffered,
 * and the consumer wakes once per message rather than once per frame.
 */
export async function* readMessages(body: AsyncIterable<Buffer>, signal: AbortSignal, maxMessageBytes: number): AsyncGenerator<Uint8Array> {
  if (body instanceof Readable) {
    for await (const pieces of readMessagePieces(body, signal, maxMessageBytes)) yield joinPieces(pieces);
    return;
  }
  const splitter = new MessageSplitter(maxMessageBytes);
  const out: Buffer[][] = [];
  for await (const chunk of body) {
    if (signal.aborted) throw signal.reason;
    splitter.push(chunk, out);
    while (out.length > 0) yield joinPieces(out.shift()!);
  }
  splitter.end();
}

/** One buffer of a message's pieces (copied only when there are several). */
function joinPieces(pieces: Buffer[]): Buffer {
  return pieces.length === 1 ? pieces[0] : Buffer.concat(pieces);
}

/** Messages queued by readMessagePieces before it pauses the stream. */
const QUEUED_MESSAGE_BYTES = 4 * 1024 * 1024;

/**
 * Like readMessages, but each message comes as the list of its pieces, views
 * of the frames it arrived in, never copied: for bulk data that is hashed and
 * written (writev) piece by piece.
 */
export async function* readMessagePieces(body: Readable, signal: AbortSignal, maxMessageBytes: number): AsyncGenerator<Buffer[]> {
  const splitter = new MessageSplitter(maxMessageBytes);
  const queue: Buffer[][] = [];
  let queued = 0;
  let ended = false;
  let failure: unknown;
  let wake: (() => void) | undefined;
  const notify = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const onData = (chunk: Buffer) => {
    try {
      queued += splitter.push(chunk, queue);
    } catch (err) {
      failure ??= err;
      body.pause();
    }
    if (queued >= QUEUED_MESSAGE_BYTES) body.pause();
    notify();
  };
  const onEnd = () => {
    ended = true;
    notify();
  };
  const onError = (err: unknown) => {
    failure ??= err;
    notify();
  };
  const onClose = () => {
    if (!ended) failure ??= new Error("the stream closed before its end");
    notify();
  };
  body.on("data", onData);
  body.once("end", onEnd);
  body.once("error", onError);
  body.once("close", onClose);
  try {
    for (;;) {
      if (signal.aborted) throw signal.reason;
      const message = queue.shift();
      if (message !== undefined) {
        for (const piece of message) queued -= piece.length;
        if (queued < QUEUED_MESSAGE_BYTES && failure === undefined && body.isPaused()) body.resume();
        yield message;
        continue;
      }
      if (failure !== undefined) throw failure;
      if (ended) break;
      await new Promise<void>((resolve) => (wake = resolve));
    }
    splitter.end();
  } finally {
    body.off("data", onData);
    body.off("end", onEnd);
    body.off("error", onError);
    body.off("close", onClose);
  }
}

/**
 * Splits a length-prefixed byte stream, fed chunk by chunk, into messages,
 * each the list of its pieces (views of the chunks, no copy).
 */
class MessageSplitter {
  #parts: Buffer[] = [];
  #buffered = 0;
  /** Length of the message being assembled; -1: reading a prefix. */
  #want = -1;

  constructor(private readonly maxMessageBytes: number) {}

  /** Adds a chunk; appends the messages it completes to `out`; returns their bytes. */
  push(chunk: Buffer, out: Buffer[][]): number {
    this.#parts.push(chunk);
    this.#buffered += chunk.length;
    let bytes = 0;
    for (;;) {
      if (this.#want < 0) {
        if (this.#buffered < 5) return bytes;
        const prefix = joinPieces(this.#take(5));
        if ((prefix[0] & 1) !== 0) throw new ConnectError("compressed messages are not supported", Code.InvalidArgument);
        this.#want = prefix.readUInt32BE(1);
        if (this.#want > this.maxMessageBytes) {
          throw new ConnectError(`message of ${this.#want} bytes is larger than ${this.maxMessageBytes}`, Code.ResourceExhausted);
        }
      }
      if (this.#buffered < this.#want) return bytes;
      out.push(this.#want === 0 ? [Buffer.alloc(0)] : this.#take(this.#want));
      bytes += this.#want;
      this.#want = -1;
    }
  }

  /** The stream ended: throws when it ended inside a message. */
  end(): void {
    if (this.#want >= 0 || this.#buffered > 0) throw new ConnectError("stream ended inside a message", Code.InvalidArgument);
  }

  /** Takes the first n buffered bytes as views of the chunks. */
  #take(n: number): Buffer[] {
    const parts = this.#parts;
    const out: Buffer[] = [];
    let at = 0;
    let used = 0;
    while (at < n) {
      const p = parts[used];
      const k = Math.min(p.length, n - at);
      if (k === p.length) {
        out.push(p);
        used++;
      } else {
        out.push(p.subarray(0, k));
        parts[used] = p.subarray(k);
      }
      at += k;
    }
    parts.splice(0, used);
    this.#buffered -= n;
    return out;
  }
}

function write(stream: ServerHttp2Stream, data: Uint8Array, signal: AbortSignal): Promise<void> {
  if (stream.write(data)) return Promise.resolve();
  return drained(stream, signal);
}

/** Resolves once the stream drains; rejects when the call ends first. */
export function drained(stream: Http2Stream, signal: AbortSignal): Promise<void> {
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
export function parseTimeout(value: string | string[] | undefined): number | undefined {
  if (typeof value !== "string") return undefined;
  const match = /^(\d{1,8})([HMSmun])$/.exec(value);
  if (!match) throw new ConnectError("grpc-timeout is malformed", Code.InvalidArgument);
  const n = Number(match[1]);
  const unitMs = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 }[match[2] as "H"];
  return Math.max(1, Math.ceil(n * unitMs));
}

/** Decodes a percent-encoded grpc-message (a client reading a status). */
export function decodeGrpcMessage(value: string): string {
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

/** Percent-encodes a grpc-message as the gRPC spec says. */
export function encodeGrpcMessage(message: string): string {
  const bytes = Buffer.from(message, "utf8");
  let out = "";
  for (const b of bytes) {
    out += b >= 0x20 && b <= 0x7e && b !== 0x25 ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

/** Decodes a request message; malformed bytes are the caller's fault. */
export function decodeMessage<S extends DescMessage>(schema: S, bytes: Uint8Array): MessageShape<S> {
  try {
    return fromBinary(schema, bytes);
  } catch {
    throw new ConnectError("request message is malformed", Code.InvalidArgument);
  }
}

/** ConnectErrors pass; anything else is a bug: logged, sent as a generic Internal. */
function toConnectError(err: unknown, log: Logger): ConnectError {
  if (err instanceof ConnectError) return err;
  log.error({ err }, "raw grpc procedure failed");
  return new ConnectError("internal error", Code.Internal);
}
