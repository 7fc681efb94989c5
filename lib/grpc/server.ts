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
 * The framing and codecs it shares with the client are lib/grpc/wire.ts.
 */
import { Code, ConnectError, createContextValues, type ContextValues } from "@connectrpc/connect";
import { constants as http2constants, type Http2ServerRequest, type Http2ServerResponse, type IncomingHttpHeaders, type ServerHttp2Stream } from "node:http2";
import type { Logger } from "../logger.js";
import type { ExtraHttpHandler } from "../server.js";
import { codeName, type Authorize } from "../server/interceptors.js";
import type { RpcMetrics } from "../server/metrics.js";
import { drained, encodeGrpcMessage, parseTimeout, readMessagePieces, readMessages } from "./wire.js";

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

function write(stream: ServerHttp2Stream, data: Uint8Array, signal: AbortSignal): Promise<void> {
  if (stream.write(data)) return Promise.resolve();
  return drained(stream, signal);
}

function toHeaders(incoming: IncomingHttpHeaders): Headers {
  const headers = new Headers();
  for (const [key, value] of Object.entries(incoming)) {
    if (key.startsWith(":") || value === undefined) continue;
    for (const v of Array.isArray(value) ? value : [value]) headers.append(key, v);
  }
  return headers;
}

/** ConnectErrors pass; anything else is a bug: logged, sent as a generic Internal. */
function toConnectError(err: unknown, log: Logger): ConnectError {
  if (err instanceof ConnectError) return err;
  log.error({ err }, "raw grpc procedure failed");
  return new ConnectError("internal error", Code.Internal);
}
