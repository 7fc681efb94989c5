// What the job-system benchmarks (coordinator.ts, scale.ts, events.ts,
// webhooks.ts, results.ts) share: the embedded PostgreSQL they run the
// coordinator on (with profiling on request), its flags and teardown, the
// assignment round of events.ts and webhooks.ts, the fixtures they write straight into it (a user and its token,
// an image, hosts, a live log server), the baselines they all print beside
// (a bare PostgreSQL round trip, a bare unary RPC), readings of a process's
// memory and CPU from /proc, of the coordinator's job metrics, and of
// pg_stat_statements.
import { randomUUID } from "node:crypto";
import { readFile, readdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import postgres from "postgres";
import { Health } from "../../../gen/grpc/health/v1/health_pb.js";
import { hashSecret, newSecret } from "../../../coordinator/auth.js";
import { type EmbeddedPostgres, startEmbeddedPostgres } from "../../../coordinator/db/embedded.js";
import { ROOTFS_MEDIA_TYPE as ROOTFS } from "../../../lib/image/media-types.js";
import { silentLogger } from "../../../lib/logger.js";
import { metricValues } from "../../support/metrics.js";
import { startProcess, type RunningProcess } from "../../support/process.js";
import { percentile } from "../report.js";

export { ROOTFS };

const COORDINATOR_BIN = fileURLToPath(new URL("../../../bin/treadmill-coordinator.js", import.meta.url));

/** An integer size from the environment, or `fallback`. */
export const sizeFromEnv = (name: string, fallback: number): number => Number(process.env[name] ?? fallback);

/** TREADMILL_BENCH_PROFILE: a directory for CPU profiles and the database's slow-statement log; profiling is on when set. */
export const PROFILE = process.env.TREADMILL_BENCH_PROFILE;

/**
 * An embedded PostgreSQL for a benchmark under `dir`, and a client of it.
 * With PROFILE: pg_stat_statements, and auto_explain of statements over 5 ms
 * logged into PROFILE.
 */
export async function startBenchDatabase(
  dir: string,
  settings: Record<string, string | number> = {},
): Promise<{ pg: EmbeddedPostgres; sql: postgres.Sql }> {
  const pg = await startEmbeddedPostgres({
    dataDir: join(dir, "pg"),
    logger: silentLogger(),
    database: "postgres",
    ephemeral: true,
    settings: {
      max_connections: 200,
      ...settings,
      ...(PROFILE
        ? {
            shared_preload_libraries: "pg_stat_statements,auto_explain",
            "auto_explain.log_min_duration": "5ms",
            "auto_explain.log_analyze": "on",
            logging_collector: "on",
            log_directory: PROFILE,
          }
        : {}),
    },
  });
  const sql = postgres(pg.url, { max: 4, onnotice: () => undefined });
  if (PROFILE) await sql`create extension if not exists pg_stat_statements`;
  return { pg, sql };
}

/** Resident memory (bytes) and CPU time (ms) of a process, from /proc. */
export async function usage(pid: number): Promise<{ rss: number; cpuMs: number }> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const rss = Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024;
  const stat = (await readFile(`/proc/${pid}/stat`, "utf8")).split(") ")[1].split(" ");
  const ticks = Number(stat[11]) + Number(stat[12]); // utime + stime, fields 14 and 15
  return { rss, cpuMs: (ticks * 1000) / 100 };
}

/** The median of `samples` readings of a process's RSS a second apart, after `settleMs` (the heap grows and shrinks with garbage). */
export async function settledRss(pid: number, settleMs = 2000, samples = 5): Promise<number> {
  await sleep(settleMs);
  const readings: number[] = [];
  for (let i = 0; i < samples; i++) {
    readings.push((await usage(pid)).rss);
    await sleep(1000);
  }
  return percentile(readings, 50);
}

/** CPU time (ms) of every PostgreSQL server process, and of the whole machine (busy, all cores). */
export async function cpuSplit(): Promise<{ postgresMs: number; busyMs: number }> {
  let postgresMs = 0;
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readFile(`/proc/${entry}/stat`, "utf8").catch(() => "");
    const open = stat.indexOf("(");
    const close = stat.lastIndexOf(")");
    if (open < 0 || stat.slice(open + 1, close) !== "postgres") continue;
    const fields = stat.slice(close + 2).split(" ");
    postgresMs += ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
  }
  const cpu = (await readFile("/proc/stat", "utf8")).split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
  const idle = cpu[3] + cpu[4]; // idle, iowait
  const busyMs = ((cpu.slice(0, 8).reduce((a, b) => a + b, 0) - idle) * 1000) / 100;
  return { postgresMs, busyMs };
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls `probe` until it holds; throws after `timeoutMs`. */
export async function until(probe: () => Promise<boolean>, what: string, timeoutMs = 600_000, intervalMs = 50): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/** Runs `fn` over `items`, `size` at a time. */
export async function inBatches<T>(items: T[], size: number, fn: (item: T) => Promise<unknown>): Promise<void> {
  for (let i = 0; i < items.length; i += size) await Promise.all(items.slice(i, i + size).map(fn));
}

/** The statements that took the most database time since the last reset. */
export async function printStatements(sql: postgres.Sql, phase: string): Promise<void> {
  const rows = await sql<{ calls: number; total: number; mean: number; query: string }[]>`
    select calls::int, round(total_exec_time::numeric, 1)::float as total, round(mean_exec_time::numeric, 3)::float as mean,
      regexp_replace(query, '[[:space:]]+', ' ', 'g') as query
    from pg_stat_statements order by total_exec_time desc limit 25`;
  process.stdout.write(`pg_stat_statements (during ${phase}): calls, total ms, mean ms, query\n`);
  for (const r of rows) process.stdout.write(`${r.calls}\t${r.total}\t${r.mean}\t${r.query.slice(0, 160)}\n`);
}

/** The baselines: p50 of a bare PostgreSQL round trip (`SELECT 1`) and of a bare connect-node unary RPC (Health.Check at `url`). */
export async function roundTripBaselines(sql: postgres.Sql, url: string, n = 2000): Promise<{ pgP50: number; rpcP50: number }> {
  const health = createClient(Health, createGrpcTransport({ baseUrl: url }));
  const pgSamples: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await sql`select 1`;
    pgSamples.push(performance.now() - t);
  }
  const rpcSamples: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await health.check({});
    rpcSamples.push(performance.now() - t);
  }
  return { pgP50: percentile(pgSamples, 50), rpcP50: percentile(rpcSamples, 50) };
}

/** Resolves once the server at `url` answers Health.Check. */
export async function serving(url: string, timeoutMs = 60_000): Promise<void> {
  const health = createClient(Health, createGrpcTransport({ baseUrl: url }));
  await until(() => health.check({}).then(() => true, () => false), `the server at ${url}`, timeoutMs);
}

/** A host of the fixtures: its row and its credential. */
export interface BenchHost {
  id: string;
  name: string;
  credential: string;
  tags: Record<string, string>;
}

/**
 * The fixtures, straight into the database: an admin user and its API
 * token, the image `bench:v1` (a rootfs), `hosts` (capacity 1, process
 * driver), and a log server that stays live for the whole run, never called
 * (no job is assigned without a live log server, scheduler.ts; the scripted
 * supervisors never ship logs).
 */
export async function insertFixtures(sql: postgres.Sql, hosts: Omit<BenchHost, "credential" | "id">[]): Promise<{ token: string; hosts: BenchHost[] }> {
  const userId = randomUUID();
  const token = newSecret("user");
  await sql`insert into users (id, name, role) values (${userId}, 'bench', 'admin')`;
  await sql`insert into api_tokens (id, user_id, hash, name) values (${randomUUID()}, ${userId}, ${hashSecret(token)}, 'bench')`;
  const digest = `sha256:${"ab".repeat(32)}`;
  await sql`insert into images (name, tag, digest, media_types, owner_id, visibility) values ('bench', 'v1', ${digest}, ${[ROOTFS]}, ${userId}, 'public')`;
  const rows = hosts.map((h) => ({ ...h, id: randomUUID(), credential: newSecret("host") }));
  for (let i = 0; i < rows.length; i += 1000) {
    const chunk = rows.slice(i, i + 1000);
    await sql`
      insert into hosts (id, name, tags, driver_kind, media_types, capacity, credential_hash)
      select v.id, v.name, v.tags, 'process', ${[ROOTFS]}, 1, decode(v.hash, 'hex')
      from jsonb_to_recordset(${sql.json(chunk.map((h) => ({ id: h.id, name: h.name, tags: h.tags, hash: hashSecret(h.credential).toString("hex") })))}::jsonb)
        as v(id uuid, name text, tags jsonb, hash text)`;
  }
  await sql`
    insert into services (id, kind, url, site, heartbeat_interval_ms, last_heartbeat_at)
    values (${randomUUID()}, 'log_server', 'http://bench-logs.invalid', '', ${600_000_000}, now())`;
  return { token, hosts: rows };
}

const JOB_METRICS = [
  "treadmill_scheduler_pass_seconds_sum",
  "treadmill_scheduler_pass_seconds_count",
  "treadmill_scheduler_assigned_jobs_total",
  "treadmill_group_commit_seconds_sum",
  "treadmill_group_commit_seconds_count",
  "treadmill_group_commit_changes_total",
] as const;

export type JobMetricReading = Record<(typeof JOB_METRICS)[number], number>;

/** The job system's counters from a coordinator's /metrics. */
export function jobMetrics(url: string): Promise<JobMetricReading> {
  return metricValues(url, JOB_METRICS);
}

/**
 * The coordinator's flags in these benchmarks: every scripted supervisor
 * connects from 127.0.0.1 (no per-address limit), and the health keeper
 * sweeps hourly (a benchmark that needs health sets it by hand).
 */
export function benchCoordinatorArgs(port: number, databaseUrl: string): string[] {
  return ["--port", String(port), "--database-url", databaseUrl, "--log-level", "warn", "--max-connections-per-address", "0", "--health-sweep-interval-ms", "3600000"];
}

/**
 * One assignment round of the events and webhooks benchmarks: the hosts
 * drain, `submit` queues the round's jobs, every host is enabled at once;
 * resolves with finalized jobs per second from the enabling to the last
 * job's end.
 */
export async function assignmentRound(sql: postgres.Sql, jobs: number, submit: () => Promise<unknown>): Promise<number> {
  await sql`update hosts set admin_state = 'draining'`;
  await inBatches(Array.from({ length: jobs }), 40, submit);
  const [{ t0 }] = await sql<{ t0: Date }[]>`
    with e as (update hosts set admin_state = 'enabled') select now() as t0, pg_notify('treadmill_schedule', '')`;
  await until(async () => (await sql`select count(*)::int as n from jobs where state <> 'finalized'`)[0].n === 0, "the queue to drain", 600_000, 250);
  const [{ end }] = await sql<{ end: Date }[]>`select max(finalized_at) as end from jobs where assigned_at >= ${t0}`;
  return jobs / ((end.getTime() - t0.getTime()) / 1000);
}

/**
 * The coordinator (bin/treadmill-coordinator.js) as a child process with
 * benchCoordinatorArgs; with TREADMILL_BENCH_PROFILE=<dir>, under node
 * --cpu-prof writing its CPU profile there (node's own flags go before the
 * script: NODE_OPTIONS refuses --cpu-prof).
 */
export function startBenchCoordinator(port: number, databaseUrl: string): RunningProcess {
  const args = benchCoordinatorArgs(port, databaseUrl);
  return PROFILE ? startProcess("--cpu-prof", [`--cpu-prof-dir=${PROFILE}`, COORDINATOR_BIN, ...args]) : startProcess(COORDINATOR_BIN, args);
}

/** Ends what a job-system benchmark started, in order: supervisors, the coordinator, the database, the directory. */
export async function stopBenchCoordinator(parts: {
  supervisors: { close(): Promise<unknown> }[];
  coordinator: { child: { kill(signal: NodeJS.Signals): unknown }; exited: Promise<unknown> };
  sql: postgres.Sql;
  pg: EmbeddedPostgres;
  dir: string;
}): Promise<void> {
  await Promise.all(parts.supervisors.map((s) => s.close()));
  parts.coordinator.child.kill("SIGTERM");
  await parts.coordinator.exited;
  await parts.sql.end({ timeout: 5 });
  await parts.pg.stop();
  await rm(parts.dir, { recursive: true, force: true });
}
