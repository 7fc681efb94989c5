import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import type { Registry } from "prom-client";
import type { Logger } from "../logger.js";
import { createCors } from "./cors.js";
import type { Authorize, RpcFinisher } from "./interceptors.js";

/** A request from either the HTTP/1.1 or the HTTP/2 server of the one port. */
export type HttpRequest = IncomingMessage | Http2ServerRequest;
/** The response of an HttpRequest. */
export type HttpResponse = ServerResponse | Http2ServerResponse;
/** Answers one request (Node's request listener, for HTTP/1.1 and HTTP/2). */
export type HttpHandler = (req: HttpRequest, res: HttpResponse) => void;
/** What a server shares with its extra HTTP handler. */
export interface ServerShared {
  /** How every RPC ends (logged, counted, its error made safe to send), hand-framed ones too. */
  finishRpc: RpcFinisher;
  /** The server's authorization hook, which hand-framed RPCs run before reading a request. */
  authorize: Authorize;
  /** Aborts when the server's grace period is over: hand-framed calls end as Connect calls do. */
  shutdownSignal: AbortSignal;
}

/**
 * A handler tried before the RPCs (static files, hand-written gRPC
 * procedures); returns true when it answered. `server` gives what the server
 * shares with it.
 */
export type ExtraHttpHandler = (req: HttpRequest, res: HttpResponse, server: ServerShared) => boolean;

export interface RequestPipelineOptions {
  logger: Logger;
  corsOrigins: readonly string[];
  registry: Registry;
  /** Optional plain-HTTP handler; returns true when it answered. */
  http?: ExtraHttpHandler;
  /** What the server shares with `http`. */
  shared: ServerShared;
  /** The Connect adapter, which answers everything else (404 if unknown). */
  rpc: HttpHandler;
}

/**
 * Every request on the port goes through, in order: CORS (which may answer a
 * preflight), `/metrics`, the component's plain-HTTP handler, then RPCs.
 */
export function createRequestPipeline(options: RequestPipelineOptions): HttpHandler {
  const cors = createCors(options.corsOrigins);
  const { registry, logger } = options;

  const serveMetrics = (res: HttpResponse): void => {
    registry.metrics().then(
      (text) => {
        res.setHeader("Content-Type", registry.contentType);
        res.end(text);
      },
      (err: unknown) => {
        logger.error({ err }, "metrics collection failed");
        res.statusCode = 500;
        res.end();
      },
    );
  };

  const { shared } = options;
  return (req, res) => {
    if (cors(req, res)) return;
    const path = req.url?.split("?", 1)[0];
    if (path === "/metrics" && (req.method === "GET" || req.method === "HEAD")) {
      serveMetrics(res);
      return;
    }
    if (options.http?.(req, res, shared)) return;
    options.rpc(req, res);
  };
}
