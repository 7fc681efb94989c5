/**
 * A multi-process site assembled exactly as docs/site.md says: this harness
 * reads the doc's fenced blocks (`sh vars`, `sh process=NAME`,
 * `sh step=NAME`, `sh example=NAME`) and runs them with bash, with its own
 * values for the doc's variables (a temp directory, free ports, free slot
 * uids) and the bins on PATH. Each `process=` block is a component run as a
 * child process (the shell execs the bin, so its pid is the component's):
 * `kill(name, signal)` and `start(name)` restart it with the same command,
 * ports and state, `waitServing(name)` waits until it does its work again.
 * Every component appends its output to `<dir>/logs/<name>.log`; the harness
 * prints where at start. For the end-to-end test and the chaos benchmark.
 */
import { randomInt } from "node:crypto";
import { freePort } from "./net.js";
import { chmod, mkdir, mkdtemp, readFile, rm, symlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient, type Transport } from "@connectrpc/connect";
import postgres from "postgres";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { HealthCheckResponse_ServingStatus, Health } from "../../gen/grpc/health/v1/health_pb.js";
import { postgresProcesses } from "../../coordinator/db/embedded.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { simBoardCommand } from "../../supervisor/sim-board/start.js";
import { DocProcesses, docBlock, docBlocks, runBash, type DocBlock, type ShellResult } from "./doc-blocks.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
export const SITE_DOC = join(REPO, "docs", "site.md");

/** The servers that register with the coordinator, by process name, with the port variable of each. */
const REGISTERED: Record<string, string> = {
  "image-store": "STORE_PORT",
  "image-cache": "CACHE_PORT",
  "log-server": "LOGS_PORT",
  proxy: "PROXY_PORT",
};

export interface Site {
  /** The site's directory ($STATE): every component's state, logs in `logs/`. */
  dir: string;
  /** The doc's variables as this site set them (ports, names, directories). */
  vars: Record<string, string>;
  /** The coordinator's URL. */
  url: string;
  /** The components (process blocks), in start order. */
  components: string[];
  /** Each component's cold start as the site was assembled: ms from spawn to serving. */
  coldStartMs: Record<string, number>;
  /** A transport to the coordinator with the admin's API token (logged in once, at first use). */
  admin(): Promise<Transport>;
  /** Starts a component that is not running (its doc command); resolves once spawned. */
  start(name: string): Promise<void>;
  /** Sends `signal` (default SIGKILL) to a component and waits for it to exit. */
  kill(name: string, signal?: NodeJS.Signals): Promise<void>;
  /** Waits until a component serves again: health, registration, attachment. */
  waitServing(name: string, timeoutMs?: number): Promise<void>;
  /** The component's pid, while it runs. */
  pid(name: string): number | undefined;
  /** Where a component's output goes. */
  logFile(name: string): string;
  /** Runs a `step=` or `example=` block to its end. */
  run(name: string): Promise<ShellResult>;
  /** Runs a command line with the site's variables and bins (e.g. `tml job list`), in `cwd` (default the site's directory). */
  shell(command: string, cwd?: string): Promise<ShellResult>;
  /** Stops every component (SIGTERM, then SIGKILL after the grace) and removes the directory unless kept. */
  stop(options?: { keepDir?: boolean }): Promise<void>;
}

/** Polls `check` until it holds, failing at the deadline with the last error, or at once when `fatal` says why. */
export async function poll(what: string, check: () => Promise<boolean>, timeoutMs: number, fatal: () => string | undefined = () => undefined): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    const reason = fatal();
    if (reason !== undefined) throw new Error(reason);
    try {
      if (await check()) return;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`${what} within ${timeoutMs} ms${last ? `: ${String(last)}` : ""}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/**
 * Assembles the site of docs/site.md: each block in the doc's order, a
 * process started and waited for, a step run; examples are left to the
 * caller (`run`).
 */
export async function startSite(options: { site?: string; quiet?: boolean } = {}): Promise<Site> {
  const blocks = (await docBlocks(SITE_DOC)).filter((b) => b.lang === "sh");
  const varsBlock = docBlock(blocks, SITE_DOC, "vars");
  const dir = await mkdtemp(join(tmpdir(), "treadmill-site-"));
  await chmod(dir, 0o755); // the process driver's slot uids enter the supervisors' work directories
  const logs = join(dir, "logs");
  const bins = join(dir, "bin");
  await mkdir(logs);
  await mkdir(bins);
  for (const bin of ["tml", "treadmill-coordinator", "treadmill-image-store", "treadmill-log-server", "treadmill-proxy", "treadmill-supervisor"]) {
    await symlink(join(REPO, "bin", `${bin}.js`), join(bins, bin));
  }
  const uids = 63000 + 2 * randomInt(0, 900);
  const vars: Record<string, string> = {
    TREADMILL: REPO,
    STATE: dir,
    SITE: options.site ?? "lab-a",
    HOST: "127.0.0.1",
    SUP1_UIDS: String(uids),
    SUP2_UIDS: String(uids + 1),
  };
  for (const port of ["PG_PORT", "COORDINATOR_PORT", "STORE_PORT", "CACHE_PORT", "LOGS_PORT", "PROXY_PORT"]) vars[port] = String(await freePort());
  const url = `http://${vars.HOST}:${vars.COORDINATOR_PORT}`;
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    ...vars,
    PATH: `${bins}:${process.env.PATH ?? ""}`,
    TML_CONFIG: join(dir, "tml.json"),
    TML_SERVER: "",
    TML_TOKEN: "",
    NO_COLOR: "1",
  };
  const script = (body: string) => `set -euo pipefail\n${varsBlock.text}\n${body}`;
  const logFile = (name: string) => join(logs, `${name}.log`);
  if (!options.quiet) process.stderr.write(`site ${vars.SITE} in ${dir}: each component's output in ${logs}/<name>.log\n`);

  const processes = new DocProcesses({ doc: "docs/site.md", harness: "site harness", blocks, script, cwd: dir, env, logFile });
  const running = processes.running;

  const blockNamed = (name: string, kinds: string[]): DocBlock => {
    const block = blocks.find((b) => b.name === name && kinds.includes(b.kind));
    if (block === undefined) throw new Error(`docs/site.md has no ${kinds.join(" or ")} block named ${name}`);
    return block;
  };

  const shell = (body: string, cwd = dir) => runBash(script(body), { cwd, env });

  let adminTransport: Transport | undefined;
  const admin = async () => {
    if (adminTransport === undefined) {
      const password = (await readFile(join(dir, "admin-password"), "utf8")).trim();
      const login = await createClient(AuthService, coordinatorTransport(url)).login({ name: "admin", password, description: "site harness" });
      adminTransport = coordinatorTransport(url, login.token);
    }
    return adminTransport;
  };

  const healthy = async (target: string) => {
    const health = createClient(Health, coordinatorTransport(target));
    const reply = await health.check({ service: "" }, { timeoutMs: 2000 });
    return reply.status === HealthCheckResponse_ServingStatus.SERVING;
  };

  const site: Site = {
    dir,
    vars,
    url,
    components: processes.names,
    coldStartMs: {},
    admin,
    logFile,
    pid: (name) => running.get(name)?.child.pid,

    async start(name) {
      processes.start(name);
    },

    async kill(name, signal = "SIGKILL") {
      const proc = running.get(name);
      if (proc === undefined) return;
      // PostgreSQL killed is the postmaster killed (no shutdown checkpoint), not a fast shutdown by its wrapper.
      const postmaster = name === "postgres" && signal === "SIGKILL" ? await postgresProcesses(join(dir, "postgres", "pgdata")) : [];
      for (const pid of postmaster) process.kill(pid, "SIGKILL");
      proc.child.kill(signal);
      await proc.exited;
    },

    async waitServing(name, timeoutMs = 60_000) {
      const proc = running.get(name);
      if (proc === undefined) throw new Error(`${name} is not running`);
      const what = `${name} serving`;
      // A component that exits meanwhile will not serve: say so at once.
      const until = (label: string, check: () => Promise<boolean>, ms: number) =>
        poll(label, check, ms, () => (running.get(name) === proc ? undefined : `${name} exited while starting; see ${logFile(name)}`));
      if (name === "postgres") {
        await until(
          what,
          async () => {
            const sql = postgres((await readFile(join(dir, "database-url"), "utf8")).trim(), { max: 1, connect_timeout: 2, onnotice: () => undefined });
            try {
              await sql`select 1`;
              return true;
            } finally {
              await sql.end({ timeout: 1 });
            }
          },
          timeoutMs,
        );
      } else if (name === "sim-board") {
        // docs/site.md keeps the board's state in $STATE/board-1.
        await until(what, async () => ["on", "off"].includes(await simBoardCommand(join(dir, "board-1"), "status")), timeoutMs);
      } else if (name === "coordinator") {
        await until(what, () => healthy(url), timeoutMs);
      } else if (REGISTERED[name] !== undefined) {
        const publicUrl = `http://${vars.HOST}:${vars[REGISTERED[name]]}`;
        const databaseUrl = (await readFile(join(dir, "database-url"), "utf8")).trim();
        const sql = postgres(databaseUrl, { max: 1, connect_timeout: 2, onnotice: () => undefined });
        try {
          // Serving, and registered (or heartbeating) since it started.
          await until(
            what,
            async () =>
              (await healthy(publicUrl)) &&
              (await sql`select 1 from services where url = ${publicUrl} and last_heartbeat_at >= ${proc.startedAt}`).length > 0,
            timeoutMs,
          );
        } finally {
          await sql.end({ timeout: 1 });
        }
      } else {
        // A supervisor: its host is online again.
        const host = /--name\s+"?([a-z0-9._-]+)/.exec(processes.block(name).text)?.[1];
        if (host === undefined) throw new Error(`the process block ${name} names no --name`);
        const hosts = createClient(HostService, await admin());
        await until(what, async () => (await hosts.getHost({ host: { case: "name", value: host } }, { timeoutMs: 2000 })).host?.online === true, timeoutMs);
      }
    },

    run: (name) => shell(blockNamed(name, ["step", "example"]).text),
    shell: (command, cwd) => shell(command, cwd),

    async stop(stopOptions = {}) {
      await processes.stopAll();
      if (!stopOptions.keepDir) await rm(dir, { recursive: true, force: true });
    },
  };

  try {
    for (const block of blocks) {
      if (block.kind === "process") {
        const spawned = performance.now();
        await site.start(block.name);
        await site.waitServing(block.name);
        site.coldStartMs[block.name] = performance.now() - spawned;
      } else if (block.kind === "step") {
        const result = await site.run(block.name);
        if (result.code !== 0) throw new Error(`docs/site.md step ${block.name} exited ${result.code}: ${result.stderr}`);
      }
    }
  } catch (err) {
    await site.stop({ keepDir: true });
    throw new Error(`the site did not start (logs in ${logs}): ${(err as Error).message}`, { cause: err });
  }
  return site;
}
