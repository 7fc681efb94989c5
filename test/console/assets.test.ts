import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { consoleAssets } from "../../coordinator/console-assets.js";
import { silentLogger } from "../../lib/logger.js";
import { createServer, type Server } from "../../lib/server.js";

/** A real one-port server with the console handler in front of (no) RPCs. */
async function serve(dir: string): Promise<Server> {
  const server = createServer({ name: "console-test", logger: silentLogger(), routes: () => undefined, http: consoleAssets({ dir, logger: silentLogger() }) });
  await server.start();
  return server;
}

describe("the coordinator's web console files", () => {
  let dir: string;
  let built: Server;
  let empty: Server;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "treadmill-console-"));
    await mkdir(join(dir, "dist", "assets"), { recursive: true });
    await writeFile(join(dir, "dist", "index.html"), '<meta name="csp-nonce" content="__CSP_NONCE__"><script src="/assets/app-X1.js"></script>');
    await writeFile(join(dir, "dist", "assets", "app-X1.js"), "console.log('app');\n".repeat(50));
    await writeFile(join(dir, "dist", "assets", "app-X1.js.gz"), gzipSync("console.log('app');\n".repeat(50)));
    await writeFile(join(dir, "dist", "favicon.svg"), "<svg/>");
    built = await serve(join(dir, "dist"));
    empty = await serve(join(dir, "missing"));
  });

  afterAll(async () => {
    await built?.stop();
    await empty?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("answers client routes with index.html, uncached, under a strict policy with a fresh nonce", async () => {
    const first = await fetch(`${built.address().url}/jobs/0190a1b2-c3d4`);
    const second = await fetch(`${built.address().url}/`);
    expect(first.status).toBe(200);
    expect(first.headers.get("content-type")).toBe("text/html; charset=utf-8");
    expect(first.headers.get("cache-control")).toBe("no-cache");
    const policy = first.headers.get("content-security-policy")!;
    expect(policy).toContain("default-src 'none'");
    expect(policy).toContain("script-src 'self'");
    expect(policy).toContain("frame-ancestors 'none'");
    const nonce = /'nonce-([^']+)'/.exec(policy)![1];
    expect(await first.text()).toContain(`content="${nonce}"`);
    expect(second.headers.get("content-security-policy")).not.toContain(nonce);
  });

  it("serves hashed assets for a year, gzipped when asked, and 404s unknown or odd names", async () => {
    const url = built.address().url;
    const plain = await fetch(`${url}/assets/app-X1.js`, { headers: { "accept-encoding": "identity" } });
    expect(plain.status).toBe(200);
    expect(plain.headers.get("content-type")).toBe("text/javascript; charset=utf-8");
    expect(plain.headers.get("cache-control")).toBe("public, max-age=31536000, immutable");
    expect(plain.headers.get("content-encoding")).toBeNull();
    expect(await plain.text()).toContain("console.log('app')");
    // fetch asks for gzip and inflates it.
    const packed = await fetch(`${url}/assets/app-X1.js`);
    expect(packed.headers.get("content-encoding")).toBe("gzip");
    expect(await packed.text()).toContain("console.log('app')");
    expect((await fetch(`${url}/favicon.svg`)).headers.get("content-type")).toBe("image/svg+xml");
    expect((await fetch(`${url}/assets/nope.js`)).status).toBe(404);
    expect((await fetch(`${url}/assets/..%2Findex.html`)).status).toBe(404);
    expect((await fetch(`${url}/assets/%2e%2e/index.html`)).status).toBe(404);
  });

  it("leaves RPC paths and other methods to the RPC handler", async () => {
    const url = built.address().url;
    const rpc = await fetch(`${url}/treadmill.coordinator.v1.JobService/GetJob`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    expect(rpc.headers.get("content-security-policy")).toBeNull();
    expect(rpc.status).toBe(404); // no such service on this test server
    const health = await fetch(`${url}/grpc.health.v1.Health/Check`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
    expect(health.status).toBe(200);
    expect(((await health.json()) as { status: string }).status).toBe("SERVING");
  });

  it("says how to build the console when it is not built", async () => {
    const res = await fetch(`${empty.address().url}/`);
    expect(res.status).toBe(503);
    expect(await res.text()).toContain("npm run build");
  });
});
