/**
 * Serves the built web console (console/dist, `npm run build`) on the
 * coordinator's port, before the RPCs (ServerOptions.http):
 *
 * - `/assets/<name>`: hashed files, cached for a year (`immutable`), gzipped
 *   when the client accepts it and the build left a `.gz` beside the file;
 * - `/favicon.svg`;
 * - every other GET whose first path segment has no dot (`/`, `/jobs/...`,
 *   the client routes) gets `index.html`, never cached, with a strict
 *   Content-Security-Policy and a fresh nonce for the style elements xterm.js
 *   creates. Paths such as `/treadmill.coordinator.v1.JobService/GetJob` or
 *   `/grpc.health.v1.Health/Check` are left to the RPC handler.
 *
 * Without a build, client routes answer 503 with a page that says how to
 * build it.
 */
import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { extname, join } from "node:path";
import type { Logger } from "../lib/logger.js";
import { packagePath } from "../lib/package.js";
import type { HttpRequest, HttpResponse } from "../lib/server.js";

/** console/dist of this checkout or installation. */
export const DEFAULT_CONSOLE_DIR = packagePath("console", "dist");

const CONTENT_TYPES: Record<string, string> = {
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".svg": "image/svg+xml",
  ".txt": "text/plain; charset=utf-8",
  ".html": "text/html; charset=utf-8",
};
const ASSET_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const NOT_BUILT = `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Treadmill</title></head><body>
<h1>The web console is not built</h1>
<p>This coordinator serves the web console from its <code>console/dist</code> folder, which is empty.
Build it with <code>npm run build</code> (<code>npm ci</code> does it too), then reload this page.
The APIs work without it: <code>tml</code> uses them.</p></body></html>`;

/**
 * The Content-Security-Policy of the console's page. Scripts and style
 * sheets come only from this origin; `<style>` elements need the nonce;
 * style attributes are allowed (xterm.js sets some). The page calls log
 * servers, image stores and proxies, which are other origins known only at
 * run time, hence connect-src by scheme.
 */
export function consolePolicy(nonce: string): string {
  return [
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    `style-src-elem 'self' 'nonce-${nonce}'`,
    "style-src-attr 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self' http: https: ws: wss:",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
  ].join("; ");
}

/** The http handler of createServer that serves the console in `dir`. */
export function consoleAssets({ dir, logger }: { dir: string; logger: Logger }): (req: HttpRequest, res: HttpResponse) => boolean {
  return (req, res) => {
    if (req.method !== "GET" && req.method !== "HEAD") return false;
    const path = (req.url ?? "/").split("?", 1)[0];
    let file: string;
    let cache: string;
    if (path.startsWith("/assets/")) {
      const name = path.slice("/assets/".length);
      if (!ASSET_NAME.test(name)) return notFound(res);
      file = join(dir, "assets", name);
      cache = "public, max-age=31536000, immutable";
    } else if (path === "/favicon.svg") {
      file = join(dir, "favicon.svg");
      cache = "public, max-age=86400";
    } else if (path.split("/", 2)[1].includes(".")) {
      return false; // an RPC path, or a file we do not have
    } else {
      serveIndex(dir, req, res, logger);
      return true;
    }
    serveFile(file, cache, req, res, logger);
    return true;
  };
}

function commonHeaders(res: HttpResponse): void {
  res.setHeader("X-Content-Type-Options", "nosniff");
  res.setHeader("Referrer-Policy", "no-referrer");
}

function notFound(res: HttpResponse): true {
  commonHeaders(res);
  res.statusCode = 404;
  res.setHeader("Content-Type", "text/plain; charset=utf-8");
  res.end("not found\n");
  return true;
}

function send(req: HttpRequest, res: HttpResponse, body: Buffer | string): void {
  res.setHeader("Content-Length", String(Buffer.byteLength(body)));
  if (req.method === "HEAD") res.end();
  else res.end(body);
}

function serveIndex(dir: string, req: HttpRequest, res: HttpResponse, logger: Logger): void {
  readFile(join(dir, "index.html"), "utf8").then(
    (html) => {
      const nonce = randomBytes(16).toString("base64");
      commonHeaders(res);
      res.statusCode = 200;
      res.setHeader("Content-Type", CONTENT_TYPES[".html"]);
      res.setHeader("Cache-Control", "no-cache");
      res.setHeader("Content-Security-Policy", consolePolicy(nonce));
      res.setHeader("X-Frame-Options", "DENY");
      send(req, res, html.replaceAll("__CSP_NONCE__", nonce));
    },
    (err: NodeJS.ErrnoException) => {
      if (err.code !== "ENOENT") logger.error({ err }, "web console index unreadable");
      commonHeaders(res);
      res.statusCode = 503;
      res.setHeader("Content-Type", CONTENT_TYPES[".html"]);
      res.setHeader("Cache-Control", "no-store");
      send(req, res, NOT_BUILT);
    },
  );
}

function serveFile(file: string, cache: string, req: HttpRequest, res: HttpResponse, logger: Logger): void {
  const type = CONTENT_TYPES[extname(file)] ?? "application/octet-stream";
  const gzipOk = /\bgzip\b/.test(String(req.headers["accept-encoding"] ?? "")) && (type.startsWith("text/javascript") || type.startsWith("text/css"));
  const read = (gzipOk ? readFile(`${file}.gz`) : Promise.reject(Object.assign(new Error("no gzip"), { code: "ENOENT" }))).then(
    (body) => ({ body, gzipped: true }),
    () => readFile(file).then((body) => ({ body, gzipped: false })),
  );
  read.then(
    ({ body, gzipped }) => {
      commonHeaders(res);
      res.statusCode = 200;
      res.setHeader("Content-Type", type);
      res.setHeader("Cache-Control", cache);
      const vary = res.getHeader("Vary");
      res.setHeader("Vary", vary === undefined ? "Accept-Encoding" : `${String(vary)}, Accept-Encoding`);
      if (gzipped) res.setHeader("Content-Encoding", "gzip");
      send(req, res, body);
    },
    (err: NodeJS.ErrnoException) => {
      if (err.code !== "ENOENT") logger.error({ err, file }, "web console file unreadable");
      notFound(res);
    },
  );
}
