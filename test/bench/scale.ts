// `npm run bench -- scale`: the job system at a large lab's size. Two
// coordinator replicas (bin/treadmill-coordinator.js, child processes) on
// one embedded PostgreSQL; 10,000 scripted supervisors
// (test/support/scripted-supervisor.ts, raw wire, "exit" mode), split over
// worker processes (children/scripted-supervisors.ts), each attached to one
// replica, half to each; 100,000 queued jobs. Measured:
//
//  (1) memory per attached supervisor: each replica's RSS growth from half
//      its supervisors to all of them, per supervisor; beside node's own
//      HTTP/2 server holding as many idle connections with one open stream
//      each (children/http2-echo.ts), measured the same way;
//  (2) each replica's CPU while its supervisors are idle (heartbeats every
//      10 s, the default), beside the bare server echoing the same
//      heartbeats;
//  (3) dispatch latency: SubmitJob returning -> StartJob received at an
//      idle matching supervisor, jobs one after another, any of the 10,000
//      hosts matching, SubmitJob sent to each replica in turn; beside a
//      bare PostgreSQL round trip and a bare unary RPC;
//  (4) scheduler pass time with the queue full: 100,000 jobs queued while
//      every host is draining (TREADMILL_BENCH_SCALE_SUBMITTED of them
//      through SubmitJob, the rest copied from those in SQL, then
//      ANALYZE, as autovacuum would have done for a queue that grew over
//      hours); then the hosts enabled, and the passes timed by the
//      replicas' treadmill_scheduler_pass_seconds histogram while the queue
//      drains, by queue depth;
//  (5) assignment throughput: the jobs finalized per second while the
//      queue drains (each supervisor reports RUNNING and exits at once;
//      one slot per host);
//  (6) PostgreSQL's size per job: pg_total_relation_size of the job tables
//      (jobs, job_hosts, job_events, job_secrets, job_log_parts) and of
//      audit_events, per job, once every job is finalized; beside a table
//      of one row per job with its id and its spec.
//
// Sizes (defaults are the issue's; the run takes about 10 minutes on 2
// cores): TREADMILL_BENCH_SCALE_SUPERVISORS (10000),
// TREADMILL_BENCH_SCALE_QUEUED_JOBS (100000),
// TREADMILL_BENCH_SCALE_DISPATCH_JOBS (1000),
// TREADMILL_BENCH_SCALE_SUBMITTED (2000), TREADMILL_BENCH_SCALE_WORKERS (4),
// TREADMILL_BENCH_SCALE_IDLE_MS (20000, the idle CPU window).
//
// Profiling: TREADMILL_BENCH_PROFILE=<dir> writes CPU profiles of the
// replicas there and prints the statements that took the most database
// time during (3) and (4).
import { type ChildProcess, fork } from "node:child_process";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type postgres from "postgres";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { uuidv7 } from "../../coordinator/shared/common.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { metricValues } from "../support/metrics.js";
import { freePort } from "../support/net.js";
import { type RunningProcess, startProcess } from "../support/process.js";
import type { WorkerCommand, WorkerEvent } from "./children/scripted-supervisors.js";
import { percentile, report } from "./report.js";
import {
  PROFILE,
  inBatches,
  insertFixtures,
  printStatements,
  roundTripBaselines,
  serving,
  settledRss,
  sizeFromEnv as env,
  sleep,
  startBenchDatabase,
  until,
  usage,
} from "./shared/job-system.js";

const BIN = fileURLToPath(new URL("../../bin/treadmill-coordinator.js", import.meta.url));
const WORKER = fileURLToPath(new URL("./children/scripted-supervisors.ts", import.meta.url));
const ECHO = fileURLToPath(new URL("./children/http2-echo.ts", import.meta.url));
const SUPERVISORS = env("TREADMILL_BENCH_SCALE_SUPERVISORS", 10_000);
const QUEUED = env("TREADMILL_BENCH_SCALE_QUEUED_JOBS", 100_000);
const DISPATCH_JOBS = env("TREADMILL_BENCH_SCALE_DISPATCH_JOBS", 1000);
const SUBMITTED = Math.min(QUEUED, env("TREADMILL_BENCH_SCALE_SUBMITTED", 2000));
const WORKERS = env("TREADMILL_BENCH_SCALE_WORKERS", 4);
const IDLE_MS = env("TREADMILL_BENCH_SCALE_IDLE_MS", 20_000);
const REPLICAS = 2;
/** How long memory settles after attaching before it is read (the garbage of attaching collected). */
const SETTLE_MS = 5000;
const HEARTBEAT_MS = 10_000; // the coordinator's default supervisor-heartbeat-ms
const JOB_TABLES = ["jobs", "job_hosts", "job_events", "job_secrets", "job_log_parts"];

/** A worker process of scripted supervisors. */
class Worker {
  readonly child: ChildProcess;
  private readonly waiting: ((e: WorkerEvent) => void)[] = [];

  constructor(onStarted: (jobId: string, at: number) => void) {
    this.child = fork(WORKER, [], { execArgv: ["--import", "tsx"], stdio: ["ignore", "inherit", "inherit", "ipc"] });
    this.child.on("message", (e: WorkerEvent) => {
      if (e.kind === "started") onStarted(e.jobId, e.at);
      else this.waiting.shift()?.(e);
    });
  }

  /** Sends `command`; resolves with its answer (commands are answered in order). */
  ask(command: WorkerCommand): Promise<WorkerEvent> {
    return new Promise((resolve) => {
      this.waiting.push(resolve);
      this.child.send(command);
    });
  }

  tell(command: WorkerCommand): void {
    this.child.send(command);
  }
}

/** Splits `items` into `n` nearly equal parts. */
const split = <T>(items: T[], n: number): T[][] => Array.from({ length: n }, (_, i) => items.filter((_, j) => j % n === i));

/** Asks every worker to attach its part of `items` (as `command(part)`); throws if any stream failed. */
async function attachAll<T>(workers: Worker[], items: T[], command: (part: T[]) => WorkerCommand): Promise<void> {
  const parts = split(items, workers.length);
  const answers = await Promise.all(workers.map((w, i) => w.ask(command(parts[i]))));
  const failed = answers.flatMap((a) => (a.kind === "attached" ? a.failed : []));
  if (failed.length > 0) throw new Error(`${failed.length} streams failed to attach, first: ${failed[0]}`);
}

/** One replica's scheduler pass histogram: cumulative counts per upper bound (seconds), sum and count. */
interface PassHistogram {
  buckets: [number, number][];
  sum: number;
  count: number;
}

async function passHistogram(url: string): Promise<PassHistogram> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const buckets: [number, number][] = [];
  for (const m of text.matchAll(/^treadmill_scheduler_pass_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$/gm)) {
    buckets.push([m[1] === "+Inf" ? Infinity : Number(m[1]), Number(m[2])]);
  }
  const value = (name: string) => Number(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "m").exec(text)?.[1] ?? NaN);
  return { buckets, sum: value("treadmill_scheduler_pass_seconds_sum"), count: value("treadmill_scheduler_pass_seconds_count") };
}

/** The passes between two readings of every replica (summed over replicas). */
function passesBetween(before: PassHistogram[], after: PassHistogram[]): PassHistogram {
  const out: PassHistogram = { buckets: after[0].buckets.map(([le]) => [le, 0]), sum: 0, count: 0 };
  after.forEach((a, r) => {
    out.sum += a.sum - before[r].sum;
    out.count += a.count - before[r].count;
    a.buckets.forEach(([, n], i) => (out.buckets[i][1] += n - before[r].buckets[i][1]));
  });
  return out;
}

/** The q-th quantile (0-1) of a histogram, interpolated within its bucket (as PromQL's histogram_quantile). */
function histogramQuantile(h: PassHistogram, q: number): number {
  const rank = q * h.count;
  let lower = 0;
  let below = 0;
  for (const [le, n] of h.buckets) {
    if (n >= rank) return le === Infinity ? lower : lower + ((le - lower) * (rank - below)) / Math.max(1, n - below);
    lower = le;
    below = n;
  }
  return lower;
}

/** The share of passes of `h` that took at most `le` seconds (a bucket bound). */
const shareWithin = (h: PassHistogram, le: number) => (h.buckets.find(([b]) => b === le)?.[1] ?? NaN) / h.count;

/** A server's V8 heap in use (bytes), from its /metrics. */
const heapUsed = async (url: string) => (await metricValues(url, ["nodejs_heap_size_used_bytes"])).nodejs_heap_size_used_bytes;

const queued = async (sql: postgres.Sql) => (await sql<{ n: number }[]>`select count(*)::int as n from jobs where state = 'queued'`)[0].n;
const unfinished = async (sql: postgres.Sql) => (await sql<{ n: number }[]>`select count(*)::int as n from jobs where state <> 'finalized'`)[0].n;

/**
 * Queues `n` more jobs in SQL as copies of the queued job `template` (a job
 * SubmitJob queued: its row with a new id, its `submitted` timeline event
 * and audit entry), ids UUIDv7 as SubmitJob makes them, queued in id order.
 */
async function copyJobs(sql: postgres.Sql, template: string, n: number): Promise<void> {
  for (let done = 0; done < n; done += 10_000) {
    const now = Date.now();
    const ids = Array.from({ length: Math.min(10_000, n - done) }, (_, i) => uuidv7(now + i));
    await sql.begin(async (tx) => {
      await tx`
        insert into jobs
        select (jsonb_populate_record(null::jobs, to_jsonb(t) || jsonb_build_object('id', v.id,
          'queued_at', t.queued_at + v.n * interval '1 microsecond', 'created_at', t.created_at + v.n * interval '1 microsecond'))).*
        from jobs t, unnest(${ids}::uuid[]) with ordinality as v(id, n) where t.id = ${template}`;
      await tx`
        insert into job_events (job_id, at, kind, state, stage, message, attempt, host_id)
        select v.id, e.at, e.kind, e.state, e.stage, e.message, e.attempt, e.host_id
        from job_events e, unnest(${ids}::uuid[]) v(id) where e.job_id = ${template}`;
      await tx`
        insert into audit_events (at, kind, actor, job_id, host_id, user_id, message, details)
        select a.at, a.kind, a.actor, v.id, a.host_id, a.user_id, a.message, a.details
        from audit_events a, unnest(${ids}::uuid[]) v(id) where a.job_id = ${template}`;
    });
  }
}

export async function run(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-bench-scale-"));
  await chmod(dir, 0o755); // the server's OS user must reach its directory
  const { pg, sql } = await startBenchDatabase(dir, { max_connections: 100 });
  const replicas: { url: string; process: RunningProcess }[] = [];
  const workers: Worker[] = [];
  let echo: RunningProcess | undefined;
  // When each job's StartJob arrived at a supervisor (the first, on this process's clock).
  const startedAt = new Map<string, number>();
  let onStart: (jobId: string) => void = () => undefined;
  const started = (jobId: string, at: number) => {
    if (!startedAt.has(jobId)) startedAt.set(jobId, at - performance.timeOrigin);
    onStart(jobId);
  };
  try {
    for (let r = 0; r < REPLICAS; r++) {
      const port = await freePort();
      // Every scripted supervisor connects from 127.0.0.1: lift the per-address limit.
      const args = ["--port", String(port), "--database-url", pg.url, "--log-level", "warn", "--max-connections-per-address", "0"];
      // node's own flags go before the script (NODE_OPTIONS refuses --cpu-prof).
      const child = PROFILE ? startProcess("--cpu-prof", [`--cpu-prof-dir=${PROFILE}`, BIN, ...args]) : startProcess(BIN, args);
      replicas.push({ url: `http://127.0.0.1:${port}`, process: child });
      // One at a time: the first applies the migrations.
      await serving(replicas[r].url);
    }
    const pids = replicas.map((r) => r.process.child.pid!);
    for (let i = 0; i < WORKERS; i++) workers.push(new Worker(started));
    process.stdout.write(
      `sizes: ${SUPERVISORS} supervisors on ${REPLICAS} replicas (${WORKERS} worker processes), ${QUEUED} queued jobs, ${DISPATCH_JOBS} dispatched\n`,
    );

    // Baselines: round trips.
    const { pgP50, rpcP50 } = await roundTripBaselines(sql, replicas[0].url);
    report("baseline: PostgreSQL SELECT 1 round trip p50", pgP50, "ms");
    report("baseline: connect-node unary round trip p50", rpcP50, "ms");

    // Baseline: node's own HTTP/2 server holding a replica's share of idle
    // streams, measured as (1) and (2) measure a replica.
    const perReplica = Math.floor(SUPERVISORS / REPLICAS);
    echo = startProcess("--import", ["tsx", ECHO]);
    const echoUrl = `http://127.0.0.1:${(await echo.waitForLine(/^port \d+/)).split(" ")[1]}`;
    const echoPid = echo.child.pid!;
    const bare = (count: number): WorkerCommand => ({ kind: "bare", url: echoUrl, count, heartbeatMs: HEARTBEAT_MS });
    const bareHalf = Math.floor(perReplica / 2);
    await attachAll(workers, Array.from({ length: bareHalf }), (part) => bare(part.length));
    const bareHalfRss = await settledRss(echoPid, SETTLE_MS);
    await attachAll(workers, Array.from({ length: perReplica - bareHalf }), (part) => bare(part.length));
    const bareFullRss = await settledRss(echoPid, SETTLE_MS);
    const bareCpu0 = await usage(echoPid);
    await sleep(IDLE_MS);
    const bareCpu = ((await usage(echoPid)).cpuMs - bareCpu0.cpuMs) / IDLE_MS;
    const bareKiB = (bareFullRss - bareHalfRss) / (perReplica - bareHalf) / 1024;
    report(`baseline: node http2 server, RSS per idle stream`, bareKiB, "KiB");
    report(`baseline: node http2 server, CPU with ${perReplica} streams`, bareCpu * 100, "% of a core");
    await Promise.all(workers.map((w) => w.ask({ kind: "close" })));
    echo.child.kill("SIGKILL");
    await echo.exited;

    // Fixtures: 10,000 hosts, every one matching every job.
    const { token, hosts } = await insertFixtures(
      sql,
      Array.from({ length: SUPERVISORS }, (_, i) => ({ name: `bench-${String(i).padStart(5, "0")}`, tags: { pool: "bench" } })),
    );
    const attachments = hosts.map((h, i) => ({ credential: h.credential, url: replicas[i % REPLICAS].url }));

    // (1) and (2): memory and idle CPU of each replica, in two halves (the
    // growth from the first half to the second is what each more
    // supervisor costs, without the one-time growth of a server that starts
    // taking connections).
    const half = Math.floor(attachments.length / 2);
    let t = performance.now();
    await attachAll(workers, attachments.slice(0, half), (part) => ({ kind: "attach", hosts: part }));
    let attachSeconds = (performance.now() - t) / 1000;
    const halfRss = await Promise.all(pids.map((pid) => settledRss(pid, SETTLE_MS)));
    const halfHeap = await Promise.all(replicas.map((r) => heapUsed(r.url)));
    t = performance.now();
    await attachAll(workers, attachments.slice(half), (part) => ({ kind: "attach", hosts: part }));
    attachSeconds += (performance.now() - t) / 1000;
    const fullRss = await Promise.all(pids.map((pid) => settledRss(pid, SETTLE_MS)));
    const fullHeap = await Promise.all(replicas.map((r) => heapUsed(r.url)));
    const cpu0 = await Promise.all(pids.map(usage));
    await sleep(IDLE_MS);
    const cpu1 = await Promise.all(pids.map(usage));
    for (let r = 0; r < REPLICAS; r++) {
      const n = attachments.slice(half).filter((a) => a.url === replicas[r].url).length;
      report(`replica ${r + 1}: memory per attached supervisor`, (fullRss[r] - halfRss[r]) / n / 1024, "KiB", {
        name: "node http2 stream",
        value: bareKiB,
      });
      report(`  of which V8 heap used`, (fullHeap[r] - halfHeap[r]) / n / 1024, "KiB");
      report(`replica ${r + 1}: RSS with ${attachments.filter((a) => a.url === replicas[r].url).length} supervisors`, fullRss[r] / 2 ** 20, "MiB");
      report(`replica ${r + 1}: CPU, supervisors idle`, ((cpu1[r].cpuMs - cpu0[r].cpuMs) / IDLE_MS) * 100, "% of a core", {
        name: "node http2 echo",
        value: bareCpu * 100,
      });
    }
    report(`attach rate (${SUPERVISORS} supervisors, 50 at once per worker)`, SUPERVISORS / attachSeconds, "per s");

    // (3) Dispatch latency, every host idle and matching.
    const jobClients = replicas.map((r) =>
      createClient(JobService, createGrpcTransport({ baseUrl: r.url, interceptors: [bearerInterceptor(() => token)] })),
    );
    const spec = { image: "bench:v1", hosts: { tags: { pool: "bench" } } };
    await Promise.all(workers.map((w) => w.tell({ kind: "watch", on: true })));
    if (PROFILE) await sql`select pg_stat_statements_reset()`;
    const latencies: number[] = [];
    for (let i = 0; i < DISPATCH_JOBS; i++) {
      let wanted = "";
      let arrived!: () => void;
      const got = new Promise<void>((r) => (arrived = r));
      onStart = (jobId) => jobId === wanted && arrived();
      const { job } = await jobClients[i % REPLICAS].submitJob({ spec });
      const returned = performance.now();
      wanted = job!.id;
      if (!startedAt.has(wanted)) await got;
      // StartJob may overtake SubmitJob's answer: that is no wait at all.
      latencies.push(Math.max(0, startedAt.get(wanted)! - returned));
    }
    onStart = () => undefined;
    await Promise.all(workers.map((w) => w.tell({ kind: "watch", on: false })));
    if (PROFILE) await printStatements(sql, "(3)");
    report(`dispatch latency p50 (${DISPATCH_JOBS} jobs, ${SUPERVISORS} hosts)`, percentile(latencies, 50), "ms", { name: "SELECT 1", value: pgP50 });
    report(`dispatch latency p99`, percentile(latencies, 99), "ms", { name: "unary RPC", value: rpcP50 });
    await until(async () => (await unfinished(sql)) === 0, "dispatched jobs to end");

    // (4) The queue: hosts draining, SUBMITTED jobs through SubmitJob (both replicas), the rest copied.
    await sql`update hosts set admin_state = 'draining'`;
    t = performance.now();
    let turn = 0;
    await inBatches(Array.from({ length: SUBMITTED }), 40, () => jobClients[turn++ % REPLICAS].submitJob({ spec, queueAnyway: true }));
    report(`SubmitJob rate (${SUBMITTED} jobs, 40 at once)`, SUBMITTED / ((performance.now() - t) / 1000), "jobs/s");
    const [{ id: template }] = await sql<{ id: string }[]>`select id from jobs where state = 'queued' limit 1`;
    await copyJobs(sql, template, QUEUED - SUBMITTED);
    await sql`analyze`;
    if ((await queued(sql)) !== QUEUED) throw new Error("the queue is not the size asked for");
    if (PROFILE) await sql`select pg_stat_statements_reset()`;

    // (4) and (5): the hosts enabled; passes read by queue depth while it drains.
    const readAll = () => Promise.all(replicas.map((r) => passHistogram(r.url)));
    const windows: { depth: number; passes: PassHistogram }[] = [];
    const initial = await readAll();
    let last = initial;
    const [{ t0 }] = await sql<{ t0: Date }[]>`
      with e as (update hosts set admin_state = 'enabled') select now() as t0, pg_notify('treadmill_schedule', '')`;
    for (let depth = QUEUED; depth > 0; ) {
      await sleep(1000);
      const now = await readAll();
      windows.push({ depth, passes: passesBetween(last, now) });
      last = now;
      depth = await queued(sql);
    }
    await until(async () => (await unfinished(sql)) === 0, "the last jobs to end", 600_000, 250);
    const [{ end }] = await sql<{ end: Date }[]>`select max(finalized_at) as end from jobs where assigned_at >= ${t0}`;
    if (PROFILE) await printStatements(sql, "(4)");
    for (const w of windows) {
      process.stdout.write(
        `(4) from ${w.depth} queued: ${w.passes.count} passes, mean ${((w.passes.sum / Math.max(1, w.passes.count)) * 1000).toFixed(1)} ms\n`,
      );
    }
    // The first second is the burst of every host free at once (reported apart).
    const full = windows.slice(1).filter((w) => w.depth >= 0.9 * QUEUED);
    const fullPasses = full.reduce(
      (acc, w) => ({ buckets: acc.buckets.map(([le, n], i) => [le, n + w.passes.buckets[i][1]] as [number, number]), sum: acc.sum + w.passes.sum, count: acc.count + w.passes.count }),
      { buckets: windows[0].passes.buckets.map(([le]) => [le, 0] as [number, number]), sum: 0, count: 0 },
    );
    report(`scheduler pass p50, >= ${0.9 * QUEUED} queued (${fullPasses.count} passes)`, histogramQuantile(fullPasses, 0.5) * 1000, "ms", {
      name: "SELECT 1",
      value: pgP50,
    });
    report(`scheduler pass p99, >= ${0.9 * QUEUED} queued`, histogramQuantile(fullPasses, 0.99) * 1000, "ms", { name: "SELECT 1", value: pgP50 });
    report(`  passes within 50 ms`, shareWithin(fullPasses, 0.05) * 100, "%");
    const all = passesBetween(initial, last);
    report(`scheduler pass p99, the whole drain (${all.count} passes)`, histogramQuantile(all, 0.99) * 1000, "ms", { name: "SELECT 1", value: pgP50 });
    report(`  mean pass of the first second (every host free, ${windows[0].passes.count} passes)`, (windows[0].passes.sum / Math.max(1, windows[0].passes.count)) * 1000, "ms");
    const seconds = (end.getTime() - t0.getTime()) / 1000;
    report(`assignment throughput (${QUEUED} jobs, ${SUPERVISORS} hosts)`, QUEUED / seconds, "jobs/s", { name: "1 / SELECT 1", value: 1000 / pgP50 });

    // (6) Size per job, every job finalized.
    const [{ jobs, bytes, audit }] = await sql<{ jobs: number; bytes: number; audit: number }[]>`
      select (select count(*) from jobs)::float8 as jobs,
        (select sum(pg_total_relation_size(t::regclass)) from unnest(${JOB_TABLES}::text[]) t)::float8 as bytes,
        pg_total_relation_size('audit_events')::float8 as audit`;
    await sql`create table bench_floor as select id, spec from jobs`;
    await sql`alter table bench_floor add primary key (id)`;
    const [{ floor }] = await sql<{ floor: number }[]>`select pg_total_relation_size('bench_floor')::float8 as floor`;
    report(`PostgreSQL size per job (${JOB_TABLES.join(", ")})`, bytes / jobs, "B", { name: "id + spec", value: floor / jobs });
    report(`  audit_events per job`, audit / jobs, "B", { name: "id + spec", value: floor / jobs });
  } catch (err) {
    // What the replicas said (warnings and errors: --log-level warn).
    for (const [r, replica] of replicas.entries()) {
      for (const line of replica.process.lines.slice(-20)) process.stderr.write(`replica ${r + 1}: ${line}\n`);
    }
    throw err;
  } finally {
    await Promise.all(workers.map((w) => w.ask({ kind: "close" }).catch(() => undefined)));
    for (const w of workers) w.child.kill("SIGKILL");
    echo?.child.kill("SIGKILL");
    for (const r of replicas) r.process.child.kill("SIGTERM");
    await Promise.all(replicas.map((r) => r.process.exited));
    await sql.end({ timeout: 5 });
    await pg.stop();
    await rm(dir, { recursive: true, force: true });
  }
}
