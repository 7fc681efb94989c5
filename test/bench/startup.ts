// `npm run bench -- startup`: how fast the bins start, beside `node -e 0`
// (the floor any Node program pays) measured in the same run.
//
//  - `tml --help` and `tml job list` (against a coordinator of its own that
//    runs nothing else, with its token in the environment): cold start, exec to exit, p50 and p90 of
//    repeated runs, each run alternating with one of `node -e 0` so that
//    both meet the same load (the ratio's baseline is those runs' p50);
//    `tml --help` also from the TypeScript sources through tsx
//    (TREADMILL_FROM_SOURCE=1), what every bin cost before dist/;
//  - each server of docs/site.md's multi-process site restarted (SIGTERM,
//    then its doc command again): exec to health SERVING on its port, polled
//    every 5 ms;
//  - `npm start` (bin/treadmill-testbed.js) on a restart (its state and
//    database made by a first start): exec to "Treadmill testbed is up".
//
// Runs: TREADMILL_BENCH_STARTUP_RUNS (default 15) per tml figure, 3 per
// server and testbed restart.
import { spawn, spawnSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { freePort } from "../support/net.js";
import { startSite } from "../support/site.js";
import { percentile, report } from "./report.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const RUNS = Number(process.env.TREADMILL_BENCH_STARTUP_RUNS ?? 15);

/** Milliseconds from exec to exit of `node args`, `runs` times; fails on a non-zero exit. */
function timeRuns(args: string[], runs: number, env: NodeJS.ProcessEnv = process.env): number[] {
  const samples: number[] = [];
  for (let i = 0; i < runs; i++) {
    const started = performance.now();
    const result = spawnSync(process.execPath, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    samples.push(performance.now() - started);
    if (result.status !== 0) throw new Error(`node ${args.join(" ")} exited ${result.status}: ${result.stderr.toString()}`);
  }
  return samples;
}

/** `timeRuns` of `args`, each run followed by one of `node -e 0`: the samples of both. */
function timeAlternating(args: string[], runs: number, env: NodeJS.ProcessEnv = process.env): { samples: number[]; floor: number[] } {
  const samples: number[] = [];
  const floor: number[] = [];
  for (let i = 0; i < runs; i++) {
    samples.push(...timeRuns(args, 1, env));
    floor.push(...timeRuns(["-e", "0"], 1));
  }
  return { samples, floor };
}

/** Resolves once `url` answers health SERVING, polling every 5 ms. */
async function untilServing(url: string, timeoutMs = 30_000): Promise<void> {
  const health = createClient(Health, coordinatorTransport(url));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const reply = await health.check({ service: "" }, { timeoutMs: 1000 });
      if (reply.status === HealthCheckResponse_ServingStatus.SERVING) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`${url} not serving within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** Starts the testbed in `dir` and resolves with the ms until it printed that it is up, and a stop. */
async function startTestbed(dir: string): Promise<{ readyMs: number; stop: () => Promise<void> }> {
  const started = performance.now();
  const child = spawn(process.execPath, [join(REPO, "bin", "treadmill-testbed.js"), "--base-port", "0", "--boards", "0"], {
    cwd: dir,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  let output = "";
  const readyMs = await new Promise<number>((resolve, reject) => {
    const onData = (b: Buffer) => {
      output += b.toString("utf8");
      if (output.includes("Treadmill testbed is up")) resolve(performance.now() - started);
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    void exited.then(() => reject(new Error(`the testbed exited before it was up:\n${output}`)));
  });
  return {
    readyMs,
    async stop() {
      child.kill("SIGINT");
      await exited;
    },
  };
}

const p50 = (samples: number[]) => percentile(samples, 50);

export async function run(): Promise<void> {
  const floor = timeRuns(["-e", "0"], RUNS);
  const baseline = { name: "node -e 0 p50", value: p50(floor) };
  report("node -e 0 p50", p50(floor), "ms");

  const tml = join(REPO, "bin", "tml.js");
  const help = timeAlternating([tml, "--help"], RUNS);
  const helpBaseline = { name: "node -e 0 p50 alternating", value: p50(help.floor) };
  report("tml --help p50", p50(help.samples), "ms", helpBaseline);
  report("tml --help p90", percentile(help.samples, 90), "ms", helpBaseline);
  const fromSource = timeRuns([tml, "--help"], Math.min(RUNS, 7), { ...process.env, TREADMILL_FROM_SOURCE: "1" });
  report("tml --help from the sources (tsx) p50", p50(fromSource), "ms", baseline);

  // tml job list against a coordinator of its own (embedded PostgreSQL,
  // nothing else running), so that the figure is tml's and not a busy site's.
  {
    const dir = await mkdtemp(join(tmpdir(), "treadmill-startup-coordinator-"));
    const port = await freePort();
    const password = "startup-bench-password";
    const coordinator = spawn(process.execPath, [join(REPO, "bin", "treadmill-coordinator.js"), "--port", String(port), "--data-dir", dir], {
      env: { ...process.env, TREADMILL_COORDINATOR_ADMIN_PASSWORD: password },
      stdio: "ignore",
    });
    try {
      const url = `http://127.0.0.1:${port}`;
      await untilServing(url);
      const { token } = await createClient(AuthService, coordinatorTransport(url)).login({ name: "admin", password, description: "startup bench" });
      const env = { ...process.env, TML_SERVER: url, TML_TOKEN: token, TML_CONFIG: join(dir, "tml.json") };
      // Unmeasured first calls: the figure is tml's cold start, not the just-started coordinator's first answers.
      timeRuns([tml, "job", "list"], 3, env);
      const list = timeAlternating([tml, "job", "list"], RUNS, env);
      const listBaseline = { name: "node -e 0 p50 alternating", value: p50(list.floor) };
      report("tml job list p50", p50(list.samples), "ms", listBaseline);
      report("tml job list p90", percentile(list.samples, 90), "ms", listBaseline);
    } finally {
      const exited = new Promise((resolve) => coordinator.once("exit", resolve));
      coordinator.kill("SIGTERM");
      await exited;
      await rm(dir, { recursive: true, force: true });
    }
  }

  const site = await startSite({ quiet: true });
  try {
    const servers: Record<string, string> = {
      coordinator: "COORDINATOR_PORT",
      "image-store": "STORE_PORT",
      "image-cache": "CACHE_PORT",
      "log-server": "LOGS_PORT",
      proxy: "PROXY_PORT",
    };
    for (const [name, portVar] of Object.entries(servers)) {
      const samples: number[] = [];
      for (let i = 0; i < 3; i++) {
        await site.kill(name, "SIGTERM");
        const started = performance.now();
        await site.start(name);
        await untilServing(`http://${site.vars.HOST}:${site.vars[portVar]}`);
        samples.push(performance.now() - started);
        await site.waitServing(name); // registered again before the next one goes
      }
      report(`${name} exec to SERVING p50`, p50(samples), "ms", baseline);
    }
  } finally {
    await site.stop();
  }

  const dir = await mkdtemp(join(tmpdir(), "treadmill-startup-"));
  try {
    await (await startTestbed(dir)).stop(); // makes the state: the database, the users, the images
    const restarts: number[] = [];
    for (let i = 0; i < 3; i++) {
      const testbed = await startTestbed(dir);
      restarts.push(testbed.readyMs);
      await testbed.stop();
    }
    report("npm start restart to up p50", p50(restarts), "ms", baseline);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
