import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import { cors } from "@connectrpc/connect";

/** Browsers may cache a preflight answer this long (seconds). */
const PREFLIGHT_MAX_AGE_S = 7200;

/** Headers browsers may send: the protocols' own plus our bearer tokens. */
const ALLOWED_HEADERS = [...cors.allowedHeaders, "Authorization"].join(", ");
const ALLOWED_METHODS = cors.allowedMethods.join(", ");
const EXPOSED_HEADERS = cors.exposedHeaders.join(", ");

/**
 * CORS for browsers using Connect or gRPC-Web (the web console). Only origins
 * in the allow-list get Access-Control-Allow-Origin; "*" allows every origin,
 * but only when the operator lists it explicitly. No credentials (cookies):
 * browsers authenticate with a bearer token header.
 *
 * Returns a function that adds the headers to a response and answers a
 * preflight itself, returning true when it did. (It names node's request and
 * response types itself, not http.ts's, which imports it.)
 */
export function createCors(
  allowedOrigins: readonly string[],
): (req: IncomingMessage | Http2ServerRequest, res: ServerResponse | Http2ServerResponse) => boolean {
  const anyOrigin = allowedOrigins.includes("*");
  const origins = new Set(allowedOrigins);

  return (req, res) => {
    const origin = req.headers.origin;
    if (origin === undefined) return false; // not a cross-origin browser request
    const allowed = anyOrigin || origins.has(origin);
    const preflight = req.method === "OPTIONS" && req.headers["access-control-request-method"] !== undefined;
    // Caches must not hand one origin's answer to another.
    res.setHeader("Vary", "Origin");
    if (!allowed) {
      if (!preflight) return false; // the browser blocks the response for lack of our headers
      res.writeHead(403);
      res.end();
      return true;
    }
    res.setHeader("Access-Control-Allow-Origin", anyOrigin ? "*" : origin);
    if (!preflight) {
      res.setHeader("Access-Control-Expose-Headers", EXPOSED_HEADERS);
      return false;
    }
    res.setHeader("Access-Control-Allow-Methods", ALLOWED_METHODS);
    res.setHeader("Access-Control-Allow-Headers", ALLOWED_HEADERS);
    res.setHeader("Access-Control-Max-Age", String(PREFLIGHT_MAX_AGE_S));
    res.writeHead(204);
    res.end();
    return true;
  };
}
