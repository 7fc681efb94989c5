import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import type { Registry } from "prom-client";
import type { Logger } from "../logger.js";
import { createCors } from "./cors.js";

/** A request from either the HTTP/1.1 or the HTTP/2 server of the one port. */
export type HttpRequest = IncomingMessage | Http2ServerRequest;
/** The response of an HttpRequest. */
export type HttpResponse = ServerResponse | Http2ServerResponse;
/** Answers one request (Node's request listener, for HTTP/1.1 and HTTP/2). */
export type HttpHandler = (req: HttpRequest, res: HttpResponse) => void;

export interface RequestPipelineOptions {
  logger: Logger;
  corsOrigins: readonly string[];
  registry: Registry;
  /** Optional plain-HTTP handler; returns true when it answered. */
  http?: (req: HttpRequest, res: HttpResponse) => boolean;
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

  return (req, res) => {
    if (cors(req, res)) return;
    const path = req.url?.split("?", 1)[0];
    if (path === "/metrics" && (req.method === "GET" || req.method === "HEAD")) {
      serveMetrics(res);
      return;
    }
    if (options.http?.(req, res)) return;
    options.rpc(req, res);
  };
}
