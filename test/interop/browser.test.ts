import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { mkdir } from "node:fs/promises";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { build } from "esbuild";
import { chromium, type Browser } from "playwright-core";
import { loadCoordinatorConfig } from "../../coordinator/config.js";
import { createCoordinator } from "../../coordinator/coordinator.js";
import type { ServingComponent } from "../../lib/component.js";
import { silentLogger } from "../../lib/logger.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";

/** A static origin serving the bundled test page. */
async function servePage(script: string): Promise<{ server: Server; origin: string }> {
  const html = `<!doctype html><html><head><title>interop</title></head><body><script type="module">${script}</script></body></html>`;
  const server = createServer((req, res) => {
    if (req.url?.startsWith("/favicon")) {
      res.writeHead(204).end();
      return;
    }
    res.writeHead(200, { "content-type": "text/html" }).end(html);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, origin: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}

const closeServer = (s: Server) => new Promise((resolve) => s.close(resolve));

describe("connect-web in headless Chromium", () => {
  let db: TestDatabase;
  let coordinator: ServingComponent;
  let allowed: { server: Server; origin: string };
  let other: { server: Server; origin: string };
  let browser: Browser;

  beforeAll(async () => {
    const bundle = await build({
      entryPoints: ["test/interop/browser/page.ts"],
      bundle: true,
      format: "esm",
      platform: "browser",
      target: "es2022",
      write: false,
      logLevel: "silent",
    });
    const script = bundle.outputFiles[0].text;
    allowed = await servePage(script);
    other = await servePage(script);
    db = await createTestDatabase();
    coordinator = createCoordinator({
      config: {
        ...loadCoordinatorConfig({ env: {}, argv: [] }),
        port: 0,
        databaseUrl: db.url,
        corsOrigins: [allowed.origin],
      },
      logger: silentLogger(),
    });
    await coordinator.start();
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
      ],
    });
  });

  afterAll(async () => {
    await browser?.close();
    await coordinator?.stop();
    await db?.drop();
    if (allowed) await closeServer(allowed.server);
    if (other) await closeServer(other.server);
  });

  async function visit(origin: string) {
    const page = await browser.newPage();
    const pageErrors: string[] = [];
    page.on("pageerror", (err) => pageErrors.push(String(err)));
    await page.goto(`${origin}/?server=${encodeURIComponent(coordinator.address().url)}`);
    await page.waitForFunction(() => "treadmillResult" in window, undefined, { timeout: 20000 });
    const result = await page.evaluate(() => (window as unknown as { treadmillResult: unknown }).treadmillResult);
    await mkdir("test/artifacts", { recursive: true });
    await page.screenshot({ path: `test/artifacts/interop-${new URL(origin).port}.png` });
    await page.close();
    return { result: result as Record<string, { health?: number; getJob?: string; error?: string }>, pageErrors };
  }

  it("calls the coordinator over Connect and gRPC-Web from an allowed origin", async () => {
    const { result, pageErrors } = await visit(allowed.origin);
    expect(pageErrors).toEqual([]);
    // 1 is SERVING; GetJob without a token is refused, the code readable through CORS.
    expect(result.connect).toEqual({ health: 1, getJob: "Unauthenticated" });
    expect(result.grpcWeb).toEqual({ health: 1, getJob: "Unauthenticated" });
  });

  it("is refused by CORS from an origin that is not on the allow-list", async () => {
    const { result } = await visit(other.origin);
    expect(result.connect.health).toBeUndefined();
    expect(result.connect.error).toBeDefined();
    expect(result.grpcWeb.health).toBeUndefined();
  });
});
