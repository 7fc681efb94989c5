/**
 * docs/site.md, run as it is written: a site assembled from separate
 * processes (test/support/site.ts reads the doc's blocks), a job through it
 * end to end, and every component brought back after a SIGKILL (issue #18,
 * item 9 and the chaos benchmark's harness).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { startSite, type Site } from "../support/site.js";

let site: Site;

beforeAll(async () => {
  site = await startSite();
}, 240_000);

afterAll(async () => {
  await site?.stop();
}, 60_000);

describe("a site assembled from docs/site.md", () => {
  it("runs the doc's first job end to end: image through the store and the site cache, log through the log server", async () => {
    const hello = await site.run("hello");
    expect(hello.stderr).toMatch(/--> job \S+ succeeded \(exit code 0\)/);
    expect(hello.stdout).toContain(`hello from site ${site.vars.SITE}`);
    expect(hello.code).toBe(0);
  }, 120_000);

  it("lists the doc's four servers as registered and live", async () => {
    const listed = await site.run("servers-registered");
    expect(listed.code).toBe(0);
    for (const port of ["STORE_PORT", "CACHE_PORT", "LOGS_PORT", "PROXY_PORT"]) {
      expect(listed.stdout).toContain(`http://${site.vars.HOST}:${site.vars[port]}`);
    }
  }, 60_000);

  it("runs the doc's firmware on the simulated board through the board driver", async () => {
    const blinky = await site.run("blinky");
    expect(blinky.stderr).toMatch(/--> job \S+ succeeded \(exit code 0\)/);
    expect(blinky.stdout).toContain(`blinky on ${site.vars.SITE}`);
    expect(blinky.code).toBe(0);
  }, 120_000);

  it("brings each component back after a SIGKILL, and runs a job again", async () => {
    expect(site.components).toEqual([
      "postgres",
      "coordinator",
      "image-store",
      "image-cache",
      "log-server",
      "proxy",
      "supervisor-1",
      "supervisor-2",
      "sim-board",
      "supervisor-board",
    ]);
    for (const name of site.components) {
      const before = site.pid(name);
      await site.kill(name, "SIGKILL");
      expect(site.pid(name)).toBeUndefined();
      await site.start(name);
      expect(site.pid(name)).not.toBe(before);
      await site.waitServing(name);
    }
    const again = await site.shell(`tml job run example/hello --site "$SITE"`);
    expect(again.stdout).toContain(`hello from site ${site.vars.SITE}`);
    expect(again.code).toBe(0);
    const board = await site.shell(`tml job run example/blinky --tag board=sim --site "$SITE"`);
    expect(board.stdout).toContain(`blinky on ${site.vars.SITE}`);
    expect(board.code).toBe(0);
  }, 300_000);
});
