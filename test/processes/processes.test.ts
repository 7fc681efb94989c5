import { execFile } from "node:child_process";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { coordinatorServices } from "../../coordinator/routes.js";
import { postgresProcesses } from "../../coordinator/db/embedded.js";
import { startProcess, type RunningProcess } from "../support/process.js";

const run = promisify(execFile);

async function healthOf(url: string) {
  const client = createClient(Health, createGrpcTransport({ baseUrl: url }));
  return (await client.check({ service: "" }, { timeoutMs: 5000 })).status;
}

/** The `url` field of a component's JSON "... ready" log line. */
function urlOf(line: string): string {
  return (JSON.parse(line) as { url: string }).url;
}

/** SIGTERM, then the exit code and how long the stop took. */
async function terminate(proc: RunningProcess) {
  const started = Date.now();
  proc.child.kill("SIGTERM");
  const code = await proc.exited;
  return { code, ms: Date.now() - started };
}

describe("the runnable processes", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "treadmill-procs-"));
    // The embedded PostgreSQL runs as the unprivileged postgres user, which
    // must be able to enter the data directory's parents.
    await chmod(dir, 0o755);
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it.each([
    ["treadmill-image-store", ["--mode", "store", "--data-dir", "image-store"], /image store ready/],
    ["treadmill-image-store", ["--mode", "cache", "--data-dir", "image-cache"], /image store ready/],
    ["treadmill-log-server", ["--data-dir", "log-server"], /log server ready/],
    ["treadmill-proxy", [], /proxy ready/],
  ])("%s %j starts on a free port, answers health and stops on SIGTERM", async (bin, args, ready) => {
    const absolute = args.map((a, i) => (args[i - 1] === "--data-dir" ? join(dir, a) : a));
    const proc = startProcess(`bin/${bin}.js`, [...absolute, "--port", "0"]);
    const url = urlOf(await proc.waitForLine(ready));
    expect(await healthOf(url)).toBe(HealthCheckResponse_ServingStatus.SERVING);
    const { code, ms } = await terminate(proc);
    expect(code).toBe(0);
    expect(ms).toBeLessThan(5000);
  });

  it("treadmill-proxy reports every configuration problem at once and exits 2", async () => {
    const proc = startProcess("bin/treadmill-proxy.js", ["--port", "many", "--grace-ms", "soon", "--no-such-flag"]);
    expect(await proc.exited).toBe(2);
    const output = proc.lines.join("\n");
    expect(output).toMatch(/port/);
    expect(output).toMatch(/grace/);
    expect(output).toMatch(/no-such-flag/);
  });

  it("treadmill-coordinator runs its embedded PostgreSQL and leaves none behind on SIGTERM", async () => {
    const dataDir = join(dir, "coordinator");
    const proc = startProcess("bin/treadmill-coordinator.js", ["--port", "0", "--data-dir", dataDir], {
      DATABASE_URL: "",
    });
    const url = urlOf(await proc.waitForLine(/coordinator ready/, 60000));
    expect(await healthOf(url)).toBe(HealthCheckResponse_ServingStatus.SERVING);
    const pgdata = join(dataDir, "postgres", "pgdata");
    expect((await postgresProcesses(pgdata)).length).toBeGreaterThan(0);
    const { code, ms } = await terminate(proc);
    expect(code).toBe(0);
    // Within the embedded PostgreSQL's fast-shutdown budget (10 s, then it is
    // killed): its shutdown checkpoint took 5.5 s on a loaded CI machine.
    expect(ms).toBeLessThan(10_000);
    expect(await postgresProcesses(pgdata)).toEqual([]);
  }, 90000);

  it("npm start's testbed brings up every component, lists every coordinator service through reflection, and stops clean", async () => {
    const dataDir = join(dir, "testbed");
    const started = Date.now();
    const proc = startProcess("bin/treadmill-testbed.js", ["--base-port", "0", "--data-dir", dataDir], {
      DATABASE_URL: "",
    });
    await proc.waitForLine(/Press Ctrl-C to stop/, 60000);
    const startupMs = Date.now() - started;
    const urls = proc.lines.map((l) => /^\s{2}(coordinator|image store|image cache|log server|proxy)\s+(http\S+)/.exec(l)).filter((m) => m !== null);
    expect(urls.map((m) => m[1])).toEqual(["coordinator", "image store", "image cache", "log server", "proxy"]);
    for (const m of urls) {
      expect(await healthOf(m[2])).toBe(HealthCheckResponse_ServingStatus.SERVING);
    }
    const { stdout } = await run("node_modules/.bin/buf", [
      "curl",
      "--protocol",
      "grpc",
      "--http2-prior-knowledge",
      "--list-services",
      urls[0][2],
    ]);
    for (const service of coordinatorServices) {
      expect(stdout.split("\n")).toContain(service.typeName);
    }
    const { code, ms } = await terminate(proc);
    expect(code).toBe(0);
    expect(ms).toBeLessThan(5000);
    expect(await postgresProcesses(join(dataDir, "coordinator", "postgres", "pgdata"))).toEqual([]);
    process.stdout.write(`testbed start-up took ${startupMs} ms, stop ${ms} ms\n`);
  }, 120000);
});
