/**
 * docs/operations.md's commands (its `sh ops=NAME` blocks), run as written on
 * a site assembled from docs/site.md (test/support/site.ts, whose variables
 * they use): what an operator watches on a healthy site, and what the
 * coordinator says while its database is away and once it is back.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus as ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { coordinatorTransport, REGISTRATION_HEALTH } from "../../lib/coordinator-client.js";
import { waitUntil } from "../support/jobs.js";
import { docBlock, docBlocks, type DocBlock } from "../support/doc-blocks.js";
import { startSite, type Site } from "../support/site.js";

const OPERATIONS = join(fileURLToPath(new URL("../..", import.meta.url)), "docs", "operations.md");

let site: Site;
let blocks: DocBlock[];

beforeAll(async () => {
  blocks = (await docBlocks(OPERATIONS)).filter((b) => b.lang === "sh");
  site = await startSite();
}, 240_000);

afterAll(async () => {
  await site?.stop();
}, 60_000);

/** The status `url`'s health service `service` reports. */
async function health(url: string, service = ""): Promise<ServingStatus> {
  return (await createClient(Health, coordinatorTransport(url)).check({ service }, { timeoutMs: 2000 })).status;
}

const run = (name: string) => site.shell(docBlock(blocks, OPERATIONS, "ops", name).text);

describe("the operator's commands of docs/operations.md", () => {
  const watchShowsHealthy = async () => {
    const watched = await run("watch");
    expect(watched.stderr).toBe("");
    expect(watched.code).toBe(0);
    expect(watched.stdout.match(/^\{"status":"SERVING"\}$/gm)).toHaveLength(2);
    expect(watched.stdout).toMatch(/^treadmill_coordinator_database_connected\{component="coordinator"\} 1$/m);
    expect(watched.stdout).toMatch(/^treadmill_scheduler_pass_failures_total\{component="coordinator"\} \d+$/m);
    for (const port of ["STORE_PORT", "CACHE_PORT", "LOGS_PORT", "PROXY_PORT"]) {
      expect(watched.stdout).toContain(`http://${site.vars.HOST}:${site.vars[port]}`);
    }
    for (const host of ["sup-1", "sup-2", "board-1"]) expect(watched.stdout).toMatch(new RegExp(`^${host}\\s.*\\bonline\\b`, "m"));
  };

  it("shows a healthy site: the coordinator and the log server's registration SERVING, the database gauge at 1, four servers live, three hosts online", async () => {
    await watchShowsHealthy();
  }, 60_000);

  it("says at once that the database is away (NOT_SERVING, the gauge at 0, UNAVAILABLE), and serves again once it is back", async () => {
    await site.kill("postgres");
    try {
      await waitUntil(async () => (await health(site.url)) === ServingStatus.NOT_SERVING, "the coordinator to say NOT_SERVING", 30_000);
      const down = await run("database-down");
      expect(down.stdout).toMatch(/^\{"status":"NOT_SERVING"\}$/m);
      expect(down.stdout).toMatch(/^treadmill_coordinator_database_connected\{component="coordinator"\} 0$/m);
      expect(down.stderr).toContain("is unavailable (the coordinator's database is unavailable; retry shortly); try again in a moment.");
      expect(down.stdout).toMatch(/^tml exited 3$/m);
    } finally {
      await site.start("postgres");
    }
    await site.waitServing("postgres");
    await site.waitServing("coordinator");
    // A heartbeat may have failed meanwhile: the registration is SERVING again at the next one.
    const logServer = `http://${site.vars.HOST}:${site.vars.LOGS_PORT}`;
    await waitUntil(async () => (await health(logServer, REGISTRATION_HEALTH)) === ServingStatus.SERVING, "the log server's registration to say SERVING", 60_000);
    await watchShowsHealthy();
  }, 180_000);
});
