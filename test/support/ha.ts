/**
 * A PostgreSQL primary with a synchronous standby and two coordinator
 * replicas on a multi-host DATABASE_URL, assembled exactly as docs/ha.md
 * says: this harness runs the doc's fenced blocks (`sh vars`,
 * `sh step=NAME`, `sh process=NAME`) with bash, with its own values for the
 * doc's variables (a temp directory, free ports, PG_BIN from TEST_PG_BIN_DIR
 * when set) and the bins on PATH. Each `process=` block is a child process in
 * a process group of its own (the shell execs the last command, so the group
 * is the server's: a PostgreSQL killed is its postmaster and every backend,
 * as when its machine dies). Every process appends its output to
 * `<dir>/logs/<name>.log`. For the failover test and benchmark.
 */
import { chmod, mkdir, mkdtemp, readFile, rm, symlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { JobSpecSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { DocProcesses, docBlock, docBlocks, runBash, type ShellResult } from "./doc-blocks.js";
import { freePort } from "./net.js";
import { poll } from "./site.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
export const HA_DOC = join(REPO, "docs", "ha.md");

export interface Ha {
  /** $STATE: the clusters, the passwords, the coordinators' directories; logs in `logs/`. */
  dir: string;
  vars: Record<string, string>;
  /** The coordinator replicas' URLs, coordinator-1 first. */
  urls: string[];
  /** DATABASE_URL as the coordinators have it (both hosts, read-write). */
  databaseUrl: string;
  /** Each process's cold start as the doc's order ran it: ms from spawn to serving. */
  coldStartMs: Record<string, number>;
  /** A transport to `url` with an admin's API token (logged in at first use). */
  admin(url: string): Promise<Transport>;
  /** Starts a process block that is not running; resolves once spawned. */
  start(name: string): Promise<void>;
  /** SIGKILLs a process's whole group (a PostgreSQL server: postmaster and backends) and waits for it to exit. */
  kill(name: string): Promise<void>;
  /** Waits until a process serves: a PostgreSQL accepts connections, a coordinator is SERVING. */
  waitServing(name: string, timeoutMs?: number): Promise<void>;
  /** Runs a `step=` block to its end. */
  run(name: string): Promise<ShellResult>;
  logFile(name: string): string;
  /** Stops every process (SIGTERM, then SIGKILL) and removes the directory unless kept. */
  stop(options?: { keepDir?: boolean }): Promise<void>;
}

/** Whether the coordinator at `url` says SERVING. */
export async function serving(url: string): Promise<boolean> {
  const reply = await createClient(Health, coordinatorTransport(url)).check({ service: "" }, { timeoutMs: 2000 });
  return reply.status === HealthCheckResponse_ServingStatus.SERVING;
}

/** Assembles docs/ha.md's primary, standby and coordinators, in the doc's order. */
export async function startHa(options: { quiet?: boolean } = {}): Promise<Ha> {
  const blocks = (await docBlocks(HA_DOC)).filter((b) => b.lang === "sh");
  const varsBlock = docBlock(blocks, HA_DOC, "vars");
  const dir = await mkdtemp(join(tmpdir(), "treadmill-ha-"));
  await chmod(dir, 0o755); // the postgres OS user must reach its clusters
  const logs = join(dir, "logs");
  const bins = join(dir, "bin");
  await mkdir(logs);
  await mkdir(bins);
  for (const bin of ["tml", "treadmill-coordinator"]) await symlink(join(REPO, "bin", `${bin}.js`), join(bins, bin));
  const vars: Record<string, string> = { STATE: dir, PRIMARY: "127.0.0.1", STANDBY: "127.0.0.1", HOST: "127.0.0.1" };
  if (process.env.TEST_PG_BIN_DIR) vars.PG_BIN = process.env.TEST_PG_BIN_DIR;
  for (const port of ["PRIMARY_PORT", "STANDBY_PORT", "COORDINATOR_1_PORT", "COORDINATOR_2_PORT"]) vars[port] = String(await freePort());
  const urls = [`http://${vars.HOST}:${vars.COORDINATOR_1_PORT}`, `http://${vars.HOST}:${vars.COORDINATOR_2_PORT}`];
  const env: NodeJS.ProcessEnv = { ...process.env, ...vars, PATH: `${bins}:${process.env.PATH ?? ""}`, NO_COLOR: "1" };
  const script = (body: string) => `set -euo pipefail\n${varsBlock.text}\n${body}`;
  const logFile = (name: string) => join(logs, `${name}.log`);
  if (!options.quiet) process.stderr.write(`ha in ${dir}: each process's output in ${logs}/<name>.log\n`);

  const processes = new DocProcesses({ doc: "docs/ha.md", harness: "ha harness", blocks, script, cwd: dir, env, logFile });
  const running = processes.running;
  const shell = (body: string) => runBash(script(body), { cwd: dir, env });
  const admins = new Map<string, Transport>();

  const ha: Ha = {
    dir,
    vars,
    urls,
    databaseUrl: "",
    coldStartMs: {},
    logFile,

    async admin(url) {
      let transport = admins.get(url);
      if (transport === undefined) {
        const password = (await readFile(join(dir, "admin-password"), "utf8")).trim();
        const login = await createClient(AuthService, coordinatorTransport(url)).login({ name: "admin", password, description: "ha harness" });
        transport = coordinatorTransport(url, login.token);
        admins.set(url, transport);
      }
      return transport;
    },

    async start(name) {
      processes.start(name);
    },

    async kill(name) {
      const proc = running.get(name);
      if (proc === undefined) return;
      try {
        process.kill(-proc.child.pid!, "SIGKILL");
      } catch {
        // already gone
      }
      await proc.exited;
    },

    async waitServing(name, timeoutMs = 60_000) {
      const proc = running.get(name);
      if (proc === undefined) throw new Error(`${name} is not running`);
      const fatal = () => (running.get(name) === proc ? undefined : `${name} exited while starting; see ${logFile(name)}`);
      const port = { primary: vars.PRIMARY_PORT, standby: vars.STANDBY_PORT }[name];
      if (port !== undefined) {
        await poll(`${name} accepting connections`, async () => (await shell(`"$PG_BIN/pg_isready" -q -U postgres -h "$STATE/run" -p ${port}`)).code === 0, timeoutMs, fatal);
      } else {
        const url = urls[Number(/^coordinator-(\d)$/.exec(name)?.[1] ?? "0") - 1];
        if (url === undefined) throw new Error(`the harness does not know how ${name} serves`);
        await poll(`${name} serving`, () => serving(url), timeoutMs, fatal);
      }
    },

    run: (name) => {
      const block = blocks.find((b) => b.kind === "step" && b.name === name);
      if (block === undefined) throw new Error(`docs/ha.md has no step block named ${name}`);
      return shell(block.text);
    },

    async stop(stopOptions = {}) {
      await processes.stopAll();
      if (!stopOptions.keepDir) await rm(dir, { recursive: true, force: true });
    },
  };

  try {
    for (const block of blocks) {
      if (block.kind === "process") {
        const spawned = performance.now();
        await ha.start(block.name);
        await ha.waitServing(block.name);
        ha.coldStartMs[block.name] = performance.now() - spawned;
      } else if (block.kind === "step" && block.name !== "promote") {
        const result = await ha.run(block.name);
        if (result.code !== 0) throw new Error(`docs/ha.md step ${block.name} exited ${result.code}: ${result.stderr}`);
        if (block.name === "replication-check" && result.stdout.trim() !== "standby1|streaming|sync") {
          throw new Error(`docs/ha.md: the primary does not list the standby as synchronous: ${JSON.stringify(result.stdout)}`);
        }
      }
    }
    const password = (await readFile(join(dir, "treadmill.password"), "utf8")).trim();
    ha.databaseUrl = `postgres://treadmill:${password}@${vars.PRIMARY}:${vars.PRIMARY_PORT},${vars.STANDBY}:${vars.STANDBY_PORT}/treadmill?target_session_attrs=read-write`;
  } catch (err) {
    await ha.stop({ keepDir: true });
    throw new Error(`the ha setup did not start (logs in ${logs}): ${(err as Error).message}`, { cause: err });
  }
  return ha;
}

/** One SubmitJob a submitter made, acknowledged. */
export interface Acknowledged {
  jobId: string;
  requestId: string;
  /** The coordinator that acknowledged it. */
  url: string;
  /** When it was acknowledged (Date.now()). */
  at: number;
}

export interface Submitter {
  acknowledged: Acknowledged[];
  /** Codes of the failed attempts, with how many of each (retried with the same request_id). */
  failures: Map<string, number>;
  /** Stops after the submission in flight is acknowledged; resolves then. */
  stop(): Promise<void>;
}

/**
 * Submits a job every `everyMs` through `transport`, each with a request_id
 * of its own, retrying a failed submission with the same request_id until it
 * is acknowledged (so each acknowledgement is one job, and no submission is
 * abandoned half-way). Failures are counted by code.
 */
export function startSubmitter(url: string, transport: Transport, spec: () => MessageInitShape<typeof JobSpecSchema>, everyMs: number): Submitter {
  const jobs = createClient(JobService, transport);
  const acknowledged: Acknowledged[] = [];
  const failures = new Map<string, number>();
  let stopping = false;
  let n = 0;
  const loop = (async () => {
    while (!stopping) {
      const requestId = `${process.pid}-${url}-${++n}`;
      const body = spec();
      for (;;) {
        try {
          const { job } = await jobs.submitJob({ spec: body, requestId }, { timeoutMs: 5000 });
          acknowledged.push({ jobId: job!.id, requestId, url, at: Date.now() });
          break;
        } catch (err) {
          const code = Code[ConnectError.from(err).code];
          failures.set(code, (failures.get(code) ?? 0) + 1);
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
      }
      await new Promise((resolve) => setTimeout(resolve, everyMs));
    }
  })();
  return {
    acknowledged,
    failures,
    async stop() {
      stopping = true;
      await loop;
    },
  };
}
