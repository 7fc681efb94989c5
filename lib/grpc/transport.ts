/**
 * The one Connect client transport of the tree: gRPC over HTTP/2 with the
 * interceptors every client wants, so that no caller chooses its own. It
 * always carries `refusedStreamRetry` (a call the server refused before
 * running it, REFUSED_STREAM at its stream limit, is safe to send again:
 * lib/retry.ts) and, when a token is given, `authorization: Bearer`.
 * Servers that call the coordinator (registration, signing keys) use it too,
 * so it holds no raw-path client piece (those are in client.ts). An https
 * server is verified with the caller's `tls` trust (lib/grpc/trust.ts); a
 * caller that brings its own session manager builds it with `http2Trust`.
 * The console speaks gRPC-Web from a browser and keeps its own transport.
 */
import type { Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcTransport, type GrpcTransportOptions } from "@connectrpc/connect-node";
import { refusedStreamRetry } from "../retry.js";
import { http2Trust, type ClientTls } from "./trust.js";

/** Adds `authorization: Bearer <token>` to every call (when a token is set). */
export function bearerInterceptor(token: () => string): Interceptor {
  return (next) => (req) => {
    const value = token();
    if (value !== "") req.header.set("authorization", `Bearer ${value}`);
    return next(req);
  };
}

export interface ClientTransportOptions extends Omit<GrpcTransportOptions, "interceptors"> {
  /** Read at every call; an empty string sends no authorization header. */
  token?: () => string;
  /** The CAs an https server is verified with when no `sessionManager` is given; default Node's roots. */
  tls?: ClientTls;
}

/** A gRPC transport to `baseUrl` that retries refused streams and, given `token`, authenticates. */
export function clientTransport({ token, tls, ...options }: ClientTransportOptions): Transport {
  const interceptors = token ? [refusedStreamRetry, bearerInterceptor(token)] : [refusedStreamRetry];
  const nodeOptions = tls && !options.sessionManager ? { ...options.nodeOptions, ...http2Trust(options.baseUrl, tls) } : options.nodeOptions;
  return createGrpcTransport({ ...options, nodeOptions, interceptors });
}
