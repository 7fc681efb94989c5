/**
 * The raw route adapter: a second transport, framed by hand, for the few
 * procedures that move bulk bytes or hold thousands of streams (image blobs,
 * logs, tunnels, `Attach`), mounted on a server's port ahead of the Connect
 * adapter through createServer's `http` option. Why: connect-node, fully
 * tuned, holds bulk transfers to about 40% of raw loopback TCP and keeps a
 * chain of generators per streaming call; a handler that frames messages
 * itself moves the same wire protocol with fewer copies (FACTS.md "Bulk
 * bytes over gRPC"). Every gRPC client (connect-node, grpc-js, Python, buf
 * curl) calls these procedures as it calls any other.
 *
 * One implementation, two transports: a route calls the very method the
 * Connect router calls (the ServiceImpl's), with a HandlerContext that
 * carries what connect-node's does; what differs is only what makes this path fast,
 * the route's codec (lib/grpc/codec.ts: messages decoded from the frames
 * they arrived in, bulk payloads written after a hand-encoded head) and
 * HTTP/2 flow control as the only backpressure. Every call goes through the
 * server's authorization hook before a message is read, and ends through
 * the server's RpcFinisher (lib/server/interceptors.ts), as a Connect call
 * does: the same log line, metrics, and error rule (ConnectErrors sent,
 * anything else logged and sent as Internal). `rawProcedure` is for a
 * procedure whose streaming shape a Connect handler cannot give fast (the
 * proxy's byte streams): it gets the call itself, and shares its logic with
 * its Connect handler through a function both call.
 *
 * It speaks plain gRPC (`application/grpc` or `application/grpc+proto`) over
 * HTTP/2 only; gRPC-Web, Connect and JSON requests fall through to the
 * Connect adapter. It honours `grpc-timeout` (DeadlineExceeded),
 * cancellation (the stream's reset or close aborts the context's signal),
 * the server's forced stop (Unavailable), error trailers with
 * percent-encoded `grpc-message`, and refuses compression (it advertises
 * `grpc-accept-encoding: identity`; a compressed message is
 * InvalidArgument). The framing it shares with the client is wire.ts.
 */
import type { DescMethod, DescMethodBiDiStreaming, DescMethodClientStreaming, DescMethodServerStreaming } from "@bufbuild/protobuf";
import { Code, ConnectError, createContextValues, type HandlerContext } from "@connectrpc/connect";
import { constants as http2constants, type Http2ServerRequest, type Http2ServerResponse, type IncomingHttpHeaders, type ServerHttp2Stream } from "node:http2";
import type { ExtraHttpHandler, ServerShared } from "../server.js";
import type { RawCodec } from "./codec.js";
import { drained, encodeGrpcMessage, parseTimeout, readMessagePieces, readMessages } from "./wire.js";

const GRPC_CONTENT_TYPE = /^application\/grpc(\+proto)?(;.*)?$/i;

/** One call on the raw path. */
export interface RawGrpcCall {
  /**
   * The call's context, as a Connect handler gets it: the request headers,
   * what the authorization hook established (`values`), and the signal that
   * aborts with the ConnectError ending the call (cancel, deadline, stop).
   */
  readonly context: HandlerContext;
  /** The response stream; response headers are already sent. */
  readonly stream: ServerHttp2Stream;
  /** The request's messages, each as the list of its pieces (no copy; see readMessagePieces). */
  pieces(): AsyncGenerator<Buffer[]>;
  /** The request's messages, each one contiguous buffer. */
  messages(): AsyncGenerator<Uint8Array>;
  /** Writes bytes (framed messages) and resolves once the stream can take more. */
  write(data: Uint8Array): Promise<void>;
}

export type RawGrpcProcedure = (call: RawGrpcCall) => Promise<void>;

/** A procedure the raw path serves. */
export interface RawRoute {
  readonly method: DescMethod;
  readonly serve: RawGrpcProcedure;
}

export interface RawGrpcOptions {
  routes: readonly RawRoute[];
  /** Largest request message accepted (ResourceExhausted beyond). */
  maxMessageBytes: number;
  /**
   * What the component's error-mapping interceptor does on the Connect path
   * (the coordinator's: a database outage is Unavailable), applied to the
   * error a call ends with before the server's RpcFinisher sees it.
   */
  mapError?: (err: unknown) => unknown;
}

/** The path of a method ("/pkg.Service/Method"). */
export function procedureOf(method: DescMethod): string {
  return `/${method.parent.typeName}/${method.name}`;
}

/**
 * A client-streaming method served by `impl`, the method the Connect router
 * serves (`(requests, ctx) => service.putBlob(requests, ctx)`).
 */
export function clientStreamingRoute<I, O>(
  method: DescMethodClientStreaming,
  codec: RawCodec<I, O>,
  impl: (requests: AsyncIterable<I>, context: HandlerContext) => Promise<O>,
): RawRoute {
  return {
    method,
    serve: async (call) => {
      const response = await impl(decoded(call, codec), call.context);
      const wait = writeMessage(call, codec.encode(response));
      if (wait) await wait;
    },
  };
}

/**
 * A server-streaming method served by `impl`. With `readAhead`, the next
 * response is asked for while the current one drains to the socket (a disk
 * read overlapping a network write).
 */
export function serverStreamingRoute<I, O>(
  method: DescMethodServerStreaming,
  codec: RawCodec<I, O>,
  impl: (request: I, context: HandlerContext) => AsyncIterable<O>,
  options: { readAhead?: boolean } = {},
): RawRoute {
  return {
    method,
    serve: async (call) => {
      const request = await onlyMessage(call, codec, method);
      const responses = impl(request, call.context);
      await (options.readAhead ? sendReadingAhead(call, codec, responses) : send(call, codec, responses));
    },
  };
}

/** A bidirectional method served by `impl`. */
export function biDiStreamingRoute<I, O>(
  method: DescMethodBiDiStreaming,
  codec: RawCodec<I, O>,
  impl: (requests: AsyncIterable<I>, context: HandlerContext) => AsyncIterable<O>,
): RawRoute {
  return { method, serve: (call) => send(call, codec, impl(decoded(call, codec), call.context)) };
}

/**
 * A procedure that reads and writes its call by hand: for a streaming shape
 * a Connect handler cannot give fast. Its logic is a function its Connect
 * handler calls too (say so where it is written).
 */
export function rawProcedure(method: DescMethod, serve: RawGrpcProcedure): RawRoute {
  return { method, serve };
}

async function* decoded<I>(call: RawGrpcCall, codec: RawCodec<I, unknown>): AsyncGenerator<I> {
  for await (const pieces of call.pieces()) yield codec.decode(pieces);
}

/** The one request message of a server-streaming call. */
async function onlyMessage<I>(call: RawGrpcCall, codec: RawCodec<I, unknown>, method: DescMethod): Promise<I> {
  let request: { value: I } | undefined;
  let count = 0;
  for await (const pieces of call.pieces()) {
    if (++count > 1) break;
    request = { value: codec.decode(pieces) };
  }
  if (!request || count > 1) {
    throw new ConnectError(`${snakeCase(method.name)} takes exactly one request message`, Code.InvalidArgument);
  }
  return request.value;
}

function snakeCase(name: string): string {
  return name.replace(/(?<=[a-z0-9])([A-Z])/g, "_$1").toLowerCase();
}

/** Writes a framed message's buffers; a promise only when the stream is full. */
function writeMessage(call: RawGrpcCall, buffers: readonly Uint8Array[]): Promise<void> | undefined {
  let room = true;
  for (const b of buffers) room = call.stream.write(b);
  return room ? undefined : drained(call.stream, call.context.signal);
}

/** Writes every response; waits only when the stream is full (back-to-back responses share a socket write). */
async function send<O>(call: RawGrpcCall, codec: RawCodec<unknown, O>, responses: AsyncIterable<O>): Promise<void> {
  for await (const response of responses) {
    const wait = writeMessage(call, codec.encode(response));
    if (wait) await wait;
  }
}

async function sendReadingAhead<O>(call: RawGrpcCall, codec: RawCodec<unknown, O>, responses: AsyncIterable<O>): Promise<void> {
  const iterator = responses[Symbol.asyncIterator]();
  let pending = iterator.next();
  try {
    for (;;) {
      const next = await pending;
      if (next.done) break;
      pending = iterator.next();
      const wait = writeMessage(call, codec.encode(next.value));
      if (wait) await wait;
    }
  } finally {
    // Stops the producer (a file being read) when the call ends early.
    await pending.catch(() => undefined);
    await iterator.return?.(undefined);
  }
}

/** Returns the `http` handler of createServer that answers the given routes. */
export function createRawGrpcHandler(options: RawGrpcOptions): ExtraHttpHandler {
  const routes = new Map(options.routes.map((route) => [procedureOf(route.method), route]));
  return (req, res, server) => {
    if (req.httpVersion !== "2.0" || req.method !== "POST") return false;
    const path = req.url?.split("?", 1)[0] ?? "";
    const route = routes.get(path);
    if (!route) return false;
    if (!GRPC_CONTENT_TYPE.test(String(req.headers["content-type"] ?? ""))) return false;
    void serve(path, route, req as Http2ServerRequest, res as Http2ServerResponse, options, server);
    return true;
  };
}

async function serve(
  path: string,
  route: RawRoute,
  req: Http2ServerRequest,
  res: Http2ServerResponse,
  { maxMessageBytes, mapError }: RawGrpcOptions,
  { finishRpc, authorize, shutdownSignal }: ServerShared,
): Promise<void> {
  const stream = res.stream;
  const started = performance.now();
  // One controller per call, aborted by whatever ends it first: the client
  // (reset or close), the deadline, the server's forced stop. Lighter than
  // connect-node's chain of linked signals and a second copy of the headers
  // (Attach holds thousands of calls open), with the same reasons.
  const controller = new AbortController();
  const end = (reason: unknown) => {
    if (!controller.signal.aborted) controller.abort(reason);
  };
  const onClose = () => end(new ConnectError("the client cancelled the call", Code.Canceled));
  const onShutdown = () => end(shutdownSignal.reason);
  stream.once("close", onClose);
  stream.once("aborted", onClose);
  if (shutdownSignal.aborted) onShutdown();
  else shutdownSignal.addEventListener("abort", onShutdown, { once: true });
  const signal = controller.signal;
  let timer: NodeJS.Timeout | undefined;
  let context: HandlerContext | undefined;
  let error: unknown;
  try {
    const encoding = req.headers["grpc-encoding"];
    if (encoding !== undefined && encoding !== "identity") {
      throw new ConnectError(`grpc-encoding ${String(encoding)} is not supported`, Code.Unimplemented);
    }
    const timeoutMs = parseTimeout(req.headers["grpc-timeout"]);
    const deadline = timeoutMs === undefined ? undefined : Date.now() + timeoutMs;
    if (timeoutMs !== undefined) timer = setTimeout(() => end(new ConnectError("the operation timed out", Code.DeadlineExceeded)), timeoutMs);
    context = {
      service: route.method.parent,
      method: route.method,
      protocolName: "grpc",
      requestMethod: "POST",
      url: req.url,
      signal,
      timeoutMs: () => (deadline === undefined ? undefined : deadline - Date.now()),
      requestHeader: toHeaders(req.headers),
      responseHeader: new Headers(),
      responseTrailer: new Headers(),
      values: createContextValues(),
    };
    await abortable(authorize(path, context.requestHeader, context.values), signal);
    stream.respond(
      { ":status": 200, "content-type": "application/grpc+proto", "grpc-accept-encoding": "identity" },
      { waitForTrailers: true },
    );
    const call: RawGrpcCall = {
      context,
      stream,
      pieces: () => readMessagePieces(req, signal, maxMessageBytes),
      messages: () => readMessages(req, signal, maxMessageBytes),
      write: (data) => (stream.write(data) ? Promise.resolve() : drained(stream, signal)),
    };
    await abortable(route.serve(call), signal);
  } catch (err) {
    error = mapError ? mapError(err) : err;
  } finally {
    clearTimeout(timer);
    stream.off("close", onClose);
    stream.off("aborted", onClose);
    shutdownSignal.removeEventListener("abort", onShutdown);
  }
  const outcome = finishRpc(path, started, error, signal);
  // As connect-node does once a call is over: listeners on the call's signal run.
  controller.abort();
  if (stream.destroyed || stream.closed) return;
  const trailers: Record<string, string> = { "grpc-status": String(outcome?.code ?? 0) };
  if (outcome) trailers["grpc-message"] = encodeGrpcMessage(outcome.rawMessage);
  context?.responseTrailer.forEach((value, key) => (trailers[key] ??= value));
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

function toHeaders(incoming: IncomingHttpHeaders): Headers {
  const headers = new Headers();
  for (const [key, value] of Object.entries(incoming)) {
    if (key.startsWith(":") || value === undefined) continue;
    for (const v of Array.isArray(value) ? value : [value]) headers.append(key, v);
  }
  return headers;
}
