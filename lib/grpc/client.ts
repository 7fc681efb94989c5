/**
 * A thin gRPC client over node:http2 for the calls that move bulk bytes
 * (image blobs, the proxy's tunnels), the client-side twin of
 * lib/grpc/server.ts: it frames and parses messages itself
 * (lib/grpc/wire.ts), so a byte stream costs a 5-byte prefix and a write per
 * message instead of connect-node's per-message machinery (FACTS.md "Bulk
 * bytes over gRPC"). It speaks plain gRPC over HTTP/2 to any gRPC server,
 * never compresses, and reads the status from the trailers (or a
 * trailers-only response) as a ConnectError.
 */
import http2 from "node:http2";
import type net from "node:net";
import { Code, ConnectError } from "@connectrpc/connect";
import { Http2SessionManager } from "@connectrpc/connect-node";
import { PUBLIC_ROOTS, connectSocket, untrustedCertificateIn, type ClientTls } from "./trust.js";
import { decodeGrpcMessage, drained, readMessagePieces, readMessages } from "./wire.js";

/** HTTP/2 receive windows (FACTS.md: both must grow on the receiving side). */
export const STREAM_WINDOW = 4 * 1024 * 1024;
export const SESSION_WINDOW = 16 * 1024 * 1024;
/** Largest HTTP/2 frame the peer may send us: fewer, larger reads than the 16 KiB default. */
const MAX_FRAME = 1024 * 1024;

/**
 * An Http2SessionManager that raises the connection-level receive window of
 * each session it opens to SESSION_WINDOW (connect-node has no option for
 * it): without it every stream of the connection shares 64 KiB per round
 * trip, whatever the stream window says. Pass `settings.initialWindowSize`
 * for the streams' windows.
 */
export class WideSessionManager extends Http2SessionManager {
  readonly #widened = new WeakSet<http2.Http2Session>();

  override async request(...args: Parameters<Http2SessionManager["request"]>): Promise<http2.ClientHttp2Stream> {
    const stream = await super.request(...args);
    // Connect stops listening once a call is done; closing the connection
    // afterwards must not turn a late stream error into a crash.
    stream.on("error", () => undefined);
    const session = stream.session;
    if (session && !this.#widened.has(session)) {
      this.#widened.add(session);
      session.setLocalWindowSize(SESSION_WINDOW);
    }
    return stream;
  }
}

/**
 * A TCP (or TLS with ALPN h2, verified with `trust`: lib/grpc/trust.ts)
 * connection to an http(s) URL's authority, Nagle off.
 */
export function dialSocket(authority: URL, trust: ClientTls = PUBLIC_ROOTS): net.Socket {
  const socket = connectSocket(authority, trust);
  socket.setNoDelay(true);
  return socket;
}

/**
 * Opens an HTTP/2 connection to `url` (cleartext with prior knowledge, or TLS
 * with ALPN h2, verified with `trust`) with wide receive windows and Nagle
 * off, so that small messages (keystrokes, echoes) go out at once.
 */
export function connectHttp2(url: string, trust: ClientTls = PUBLIC_ROOTS): http2.ClientHttp2Session {
  const authority = new URL(url);
  const session = http2.connect(authority, {
    settings: { initialWindowSize: STREAM_WINDOW, maxFrameSize: MAX_FRAME },
    createConnection: () => dialSocket(authority, trust),
  });
  // Failures surface on the calls' streams.
  session.on("error", () => undefined);
  session.once("connect", () => {
    if (!session.destroyed) session.setLocalWindowSize(SESSION_WINDOW);
  });
  return session;
}

/** One call in progress. */
export interface RawClientCall {
  readonly stream: http2.ClientHttp2Stream;
  /** Writes bytes (framed messages); false when the caller should wait for `drained()`. */
  write(data: Uint8Array): boolean;
  /** Resolves once the request stream can take more; rejects when the call ended. */
  drained(): Promise<void>;
  /** Ends the request stream (the client's half-close of the call). */
  end(): void;
  /**
   * The response messages, each one contiguous buffer. Ends when the call
   * ends with OK; throws its ConnectError otherwise (also when the stream
   * breaks).
   */
  messages(): AsyncGenerator<Uint8Array>;
  /** The same messages, each as the list of its pieces (no copy; see readMessagePieces). */
  messagePieces(): AsyncGenerator<Buffer[]>;
  /** Resets the call (RST_STREAM CANCEL). Idempotent. */
  cancel(): void;
}

/** gRPC's mapping of HTTP statuses without a grpc-status. */
function codeOfHttpStatus(status: number): Code {
  if (status === 401) return Code.Unauthenticated;
  if (status === 403) return Code.PermissionDenied;
  if (status === 404) return Code.Unimplemented;
  if (status === 429 || status === 502 || status === 503 || status === 504) return Code.Unavailable;
  if (status === 400) return Code.Internal;
  return Code.Unknown;
}

/**
 * Starts a call of `path` ("/pkg.Service/Method") on `session` with the
 * given request headers (authorization...). Messages over `maxMessageBytes`
 * fail the call (ResourceExhausted).
 */
export function openRawCall(
  session: http2.ClientHttp2Session,
  path: string,
  headers: Record<string, string>,
  options: { maxMessageBytes: number },
): RawClientCall {
  const stream = session.request({
    ...headers,
    ":method": "POST",
    ":path": path,
    "content-type": "application/grpc+proto",
    te: "trailers",
    "grpc-accept-encoding": "identity",
  });
  stream.on("error", () => undefined);
  const controller = new AbortController();
  stream.once("close", () => controller.abort(new ConnectError("the call's stream closed", Code.Canceled)));
  let status: ConnectError | null | undefined; // null: OK; undefined: not known yet
  const statusOf = (h: http2.IncomingHttpHeaders): ConnectError | null | undefined => {
    const grpcStatus = h["grpc-status"];
    if (grpcStatus === undefined) return undefined;
    const code = Number(grpcStatus);
    if (code === 0) return null;
    const message = typeof h["grpc-message"] === "string" ? decodeGrpcMessage(h["grpc-message"]) : "";
    return new ConnectError(message, Number.isInteger(code) && code > 0 && code <= 16 ? (code as Code) : Code.Unknown);
  };
  stream.once("response", (h) => {
    const httpStatus = Number(h[":status"]);
    if (httpStatus !== 200) status = new ConnectError(`http status ${httpStatus}`, codeOfHttpStatus(httpStatus));
    else status = statusOf(h);
  });
  stream.once("trailers", (h) => {
    status ??= statusOf(h);
  });

  return {
    stream,
    write: (data) => stream.write(data),
    drained: () => drained(stream, controller.signal),
    end: () => {
      if (!stream.writableEnded && !stream.destroyed) stream.end();
    },
    // Not the close signal: messages buffered before the close still count.
    messages: () => withStatus(readMessages(stream, new AbortController().signal, options.maxMessageBytes)),
    messagePieces: () => withStatus(readMessagePieces(stream, new AbortController().signal, options.maxMessageBytes)),
    cancel: () => {
      if (!stream.destroyed) stream.close(http2.constants.NGHTTP2_CANCEL);
    },
  };

  /** The response messages of `reader`, then the call's status (thrown unless OK). */
  async function* withStatus<T>(reader: AsyncGenerator<T>): AsyncGenerator<T> {
    try {
      yield* reader;
    } catch (err) {
      if (status) throw status;
      if (err instanceof ConnectError && err.code !== Code.Canceled) throw err;
      // A certificate refused: say so, not merely that the connection broke.
      const untrusted = untrustedCertificateIn(err);
      if (untrusted) throw new ConnectError(untrusted.message, Code.Unavailable, undefined, undefined, untrusted);
      const rst = stream.rstCode;
      throw new ConnectError(
        rst === http2.constants.NGHTTP2_CANCEL ? "the call was cancelled" : "the connection to the server broke",
        rst === http2.constants.NGHTTP2_CANCEL ? Code.Canceled : Code.Unavailable,
      );
    }
    if (status === null) return;
    if (status) throw status;
    throw new ConnectError("the server ended the call without a status", Code.Internal);
  }
}
