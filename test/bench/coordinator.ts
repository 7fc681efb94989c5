// `npm run bench -- coordinator`: the coordinator's job system under load,
// the coordinator as a real child process (bin/treadmill-coordinator.js) on an
// embedded PostgreSQL, scripted supervisors attached over real gRPC streams
// from this process.
//
//  (c) memory and CPU of the coordinator holding N idle attached supervisors
//      with heartbeats (TREADMILL_BENCH_IDLE_SUPERVISORS); memory per
//      supervisor is the growth of the coordinator's RSS from N/2 to N
//      attached (also printed: all N against none, which adds the one-time
//      growth of a server taking its first connections);
//  (a) dispatch latency, SubmitJob returning -> StartJob received at an idle
//      matching supervisor, over sequential jobs
//      (TREADMILL_BENCH_DISPATCH_JOBS) with 200 supervisors attached;
//  (b) assignment throughput: jobs queued while the 200 hosts are drained
//      (TREADMILL_BENCH_QUEUED_JOBS), then every host enabled at once; each
//      supervisor reports RUNNING and exits a job as soon as it starts it, so
//      every job is assigned, started, run and finalized (the figure is
//      finalized jobs per second; each host has one slot, so assignments
//      can go no faster than ends).
//
//  (d) host health (issue #21): dispatch latency and scheduling pass time
//      with 2,000 attached hosts (TREADMILL_BENCH_HEALTH_HOSTS) of which 10%
//      are quarantined and 10% checking, beside the same with all of them
//      healthy, in eight alternating rounds (TREADMILL_BENCH_HEALTH_JOBS jobs
//      per condition). The health states are set in the database and the health
//      keeper's sweep is slowed to an hour, so that nothing moves them back
//      during the run: the figure is the scheduler's cost of the health
//      condition, not of running checks.
//
//  (e) leases (issue #22): dispatch latency and scheduling pass time with
//      2,000 attached hosts (TREADMILL_BENCH_LEASE_HOSTS), 500 of them held
//      by active leases (TREADMILL_BENCH_ACTIVE_LEASES) and 1,000 bookings
//      starting over the next 48 hours on the others
//      (TREADMILL_BENCH_BOOKINGS, two hours each), beside the same hosts
//      with no lease, in eight alternating rounds (TREADMILL_BENCH_LEASE_JOBS
//      jobs per condition; any host matches the jobs, whose timeout is the
//      default hour). The lease rows are written in SQL as the lease service
//      writes them (leases, lease_hosts, hosts.lease_id and booked_from);
//      their ends and grace lie days ahead, so that nothing ends them during
//      the run. Also printed: the jobs placed against a lease or a booking
//      (must be 0). TREADMILL_BENCH_LEASES_ONLY=1 runs (e) alone.
//
// Sizes: by default 1,000 idle supervisors, 1,000 dispatched jobs and 5,000
// queued jobs (a few minutes); TREADMILL_BENCH_FULL=1 runs the issue's sizes
// (2,000, 2,000 and 10,000); each variable above overrides its size.
//
// Baselines measured in the same run: a bare PostgreSQL round trip
// (`SELECT 1`) and a bare connect-node unary round trip (Health.Check on the
// same coordinator).
//
// Profiling: TREADMILL_BENCH_PROFILE=<dir> writes a CPU profile of the
// coordinator (node --cpu-prof) there and prints the statements that took the
// most database time (pg_stat_statements).
import { randomUUID } from "node:crypto";
import { chmod, mkdtemp } from "node:fs/promises";
import { availableParallelism, tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type postgres from "postgres";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { percentile, report } from "./report.js";
import { freePort } from "../support/net.js";
import { startBenchCoordinator, cpuSplit, inBatches, insertFixtures, jobMetrics, printStatements, PROFILE, roundTripBaselines, serving, settledRss, sizeFromEnv as env, startBenchDatabase, stopBenchCoordinator, type BenchHost, type JobMetricReading, until, usage } from "./shared/job-system.js";

const FULL = process.env.TREADMILL_BENCH_FULL === "1";
const IDLE = env("TREADMILL_BENCH_IDLE_SUPERVISORS", FULL ? 2000 : 1000);
const DISPATCH_JOBS = env("TREADMILL_BENCH_DISPATCH_JOBS", FULL ? 2000 : 1000);
const QUEUED_JOBS = env("TREADMILL_BENCH_QUEUED_JOBS", FULL ? 10000 : 5000);
const ACTIVE = 200;
const HEALTH_HOSTS = env("TREADMILL_BENCH_HEALTH_HOSTS", 2000);
const HEALTH_JOBS = env("TREADMILL_BENCH_HEALTH_JOBS", FULL ? 2000 : 600);
const LEASE_HOSTS = env("TREADMILL_BENCH_LEASE_HOSTS", 2000);
const ACTIVE_LEASES = env("TREADMILL_BENCH_ACTIVE_LEASES", 500);
const BOOKINGS = env("TREADMILL_BENCH_BOOKINGS", 1000);
const LEASE_JOBS = env("TREADMILL_BENCH_LEASE_JOBS", FULL ? 2000 : 600);
const LEASES_ONLY = process.env.TREADMILL_BENCH_LEASES_ONLY === "1";

/** Scheduling passes and group commits between two readings of jobMetrics. */
function printJobMetrics(before: JobMetricReading, after: JobMetricReading): void {
  const d = (name: keyof JobMetricReading) => after[name] - before[name];
  const passes = d("treadmill_scheduler_pass_seconds_count");
  const commits = d("treadmill_group_commit_seconds_count");
  process.stdout.write(
    `(b) ${passes} scheduling passes, ${((d("treadmill_scheduler_pass_seconds_sum") / passes) * 1000).toFixed(1)} ms and ` +
      `${(d("treadmill_scheduler_assigned_jobs_total") / passes).toFixed(1)} jobs each; ${commits} group commits, ` +
      `${((d("treadmill_group_commit_seconds_sum") / commits) * 1000).toFixed(1)} ms and ${(d("treadmill_group_commit_changes_total") / commits).toFixed(1)} changes each\n`,
  );
}

/** Row updates and HOT updates so far of the tables a job's life updates. */
async function hotUpdates(sql: postgres.Sql): Promise<Record<string, { upd: number; hot: number }>> {
  const rows = await sql<{ relname: string; upd: number; hot: number }[]>`
    select relname, n_tup_upd::float8 as upd, n_tup_hot_upd::float8 as hot from pg_stat_user_tables
    where relname in ('jobs', 'job_hosts', 'hosts') order by relname`;
  return Object.fromEntries(rows.map((r) => [r.relname, { upd: r.upd, hot: r.hot }]));
}

/**
 * Where a job's time goes during (b), from the database's timestamps (each is
 * its transaction's start): a host's release to its next assignment (the
 * scheduler), assignment to RUNNING (StartJob, its ack and the report), and
 * RUNNING to finalized (the exit report).
 */
async function printPhases(sql: postgres.Sql, since: Date): Promise<void> {
  const [row] = await sql<Record<string, number>[]>`
    with g as (
      select extract(epoch from (j.started_at - j.assigned_at)) * 1000 as to_running,
        extract(epoch from (j.finalized_at - j.started_at)) * 1000 as to_final,
        extract(epoch from (lead(j.assigned_at) over (partition by jh.host_id order by j.assigned_at) - jh.released_at)) * 1000 as gap
      from jobs j join job_hosts jh on jh.job_id = j.id
      where j.assigned_at >= ${since})
    select percentile_cont(0.5) within group (order by gap) as gap50, percentile_cont(0.99) within group (order by gap) as gap99,
      percentile_cont(0.5) within group (order by to_running) as run50, percentile_cont(0.99) within group (order by to_running) as run99,
      percentile_cont(0.5) within group (order by to_final) as fin50, percentile_cont(0.99) within group (order by to_final) as fin99
    from g`;
  const f = (n: number) => Number(n).toFixed(1);
  process.stdout.write(
    `(b) per job, ms p50 / p99: host released -> next assigned ${f(row.gap50)} / ${f(row.gap99)}; ` +
      `assigned -> RUNNING ${f(row.run50)} / ${f(row.run99)}; RUNNING -> finalized ${f(row.fin50)} / ${f(row.fin99)}\n`,
  );
}

/** SubmitJob's client of the bench. */
type Jobs = ReturnType<typeof createClient<typeof JobService>>;

/**
 * A function that submits `n` jobs one after another and returns each one's
 * time from SubmitJob's answer to its StartJob; `listen` sets what the
 * scripted supervisors call on a StartJob.
 */
function dispatcher(jobs: Jobs, listen: (onStart: (jobId: string) => void) => void) {
  // When each job's StartJob arrived (the first, if it came several times).
  const startedAt = new Map<string, number>();
  return async (jobSpec: { image: string; hosts?: { tags: Record<string, string> } }, n: number): Promise<number[]> => {
    const latencies: number[] = [];
    for (let i = 0; i < n; i++) {
      let wanted = "";
      let arrived!: () => void;
      const got = new Promise<void>((r) => (arrived = r));
      listen((jobId) => {
        if (!startedAt.has(jobId)) startedAt.set(jobId, performance.now());
        if (jobId === wanted) arrived();
      });
      const { job } = await jobs.submitJob({ spec: jobSpec });
      const returned = performance.now();
      wanted = job!.id;
      if (!startedAt.has(wanted)) await got;
      // StartJob may overtake SubmitJob's answer: that is no wait at all.
      latencies.push(Math.max(0, startedAt.get(wanted)! - returned));
    }
    listen(() => undefined);
    return latencies;
  };
}

/** One condition's dispatch latencies and scheduling passes over its rounds. */
interface ConditionFigures {
  latencies: number[];
  passSeconds: number;
  passes: number;
}

/**
 * Parts (d) and (e): `rounds` rounds of `roundJobs` dispatches of a job any
 * host takes, alternating the base condition and the changed one (`set`
 * before each round, the queue empty), so that the machine's drift (other
 * work, the database's caches warming) falls on both alike. `misplaced`
 * counts the jobs of a changed round (assigned since `since`) placed where
 * they must not be. Prints the changed condition's pass time and dispatch
 * p50/p99 beside the base's.
 */
async function alternatingRounds(o: {
  sql: postgres.Sql;
  url: string;
  dispatch: ReturnType<typeof dispatcher>;
  part: string;
  rounds: number;
  roundJobs: number;
  attached: number;
  set: (changed: boolean) => Promise<void>;
  misplaced: (since: Date) => Promise<number>;
  names: { base: string; changed: string; misplaced: string };
}): Promise<void> {
  const { sql, part, names } = o;
  const results = { base: { latencies: [], passSeconds: 0, passes: 0 } as ConditionFigures, changed: { latencies: [], passSeconds: 0, passes: 0 } as ConditionFigures };
  let misplaced = 0;
  for (let round = 0; round < o.rounds; round++) {
    const changed = round % 2 === 1;
    await until(async () => (await sql`select count(*)::int as n from jobs where state <> 'finalized'`)[0].n === 0, "jobs to end");
    await o.set(changed);
    const [{ since }] = await sql<{ since: Date }[]>`select now() as since`;
    const m0 = await jobMetrics(o.url);
    const lat = await o.dispatch({ image: "bench:v1" }, o.roundJobs);
    const m1 = await jobMetrics(o.url);
    const r = changed ? results.changed : results.base;
    r.latencies.push(...lat);
    r.passSeconds += m1.treadmill_scheduler_pass_seconds_sum - m0.treadmill_scheduler_pass_seconds_sum;
    r.passes += m1.treadmill_scheduler_pass_seconds_count - m0.treadmill_scheduler_pass_seconds_count;
    if (changed) misplaced += await o.misplaced(since);
  }
  const passMs = (r: ConditionFigures) => (r.passSeconds / Math.max(1, r.passes)) * 1000;
  const { base, changed } = results;
  process.stdout.write(`${part} ${o.attached} attached hosts, ${(o.roundJobs * o.rounds) / 2} jobs per condition in ${o.rounds / 2} rounds each\n`);
  report(`${part} scheduling pass, ${names.base}`, passMs(base), "ms");
  report(`${part} scheduling pass, ${names.changed}`, passMs(changed), "ms", { name: names.base, value: passMs(base) });
  for (const p of [50, 99]) {
    report(`${part} dispatch latency p${p}, ${names.base}`, percentile(base.latencies, p), "ms");
    report(`${part} dispatch latency p${p}, ${names.changed}`, percentile(changed.latencies, p), "ms", { name: names.base, value: percentile(base.latencies, p) });
  }
  process.stdout.write(`${part} jobs placed ${names.misplaced}: ${misplaced} (must be 0)\n`);
}

/**
 * (e) Leases: the same dispatch over LEASE_HOSTS attached hosts without a
 * lease, then with ACTIVE_LEASES of them leased and BOOKINGS bookings on
 * the others, alternated; the figures are printed side by side.
 */
async function leaseRounds(b: {
  sql: postgres.Sql;
  url: string;
  jobs: Jobs;
  hosts: BenchHost[];
  /** The first `attached` of `hosts` have their supervisors attached already (in `supervisors`), their StartJobs heard through `listen`. */
  attached: number;
  supervisors: ScriptedSupervisor[];
  listen: (onStart: (jobId: string) => void) => void;
}): Promise<void> {
  const { sql, url } = b;
  let onStart: (jobId: string) => void = () => undefined;
  const dispatch = dispatcher(b.jobs, (f) => {
    onStart = f;
    b.listen(f);
  });
  const pool = b.hosts.slice(0, LEASE_HOSTS);
  const more = pool
    .slice(b.attached)
    .map(
      (h) =>
        new ScriptedSupervisor({
          urls: [url],
          credential: h.credential,
          mode: "exit",
          noHistory: true,
          wire: "raw",
          onStartJob: (s) => onStart(s.jobId),
        }),
    );
  b.supervisors.push(...more);
  await inBatches(more, 50, (s) => s.connect());
  const ids = pool.map((h) => h.id);
  await until(
    async () => (await sql`select count(*)::int as n from hosts where id = any(${ids}::uuid[]) and attached_replica is not null`)[0].n === ids.length,
    "the lease pool to attach",
  );
  await sql`update hosts set health = 'healthy', admin_state = 'enabled' where id = any(${ids}::uuid[])`;
  const [{ owner }] = await sql<{ owner: string }[]>`select id as owner from users where name = 'bench'`;
  // Every fourth host leased (spread over the name order the free hosts are read in), the bookings on the others.
  const leased = ids.filter((_, i) => i % 4 === 1).slice(0, ACTIVE_LEASES);
  const open = ids.filter((id) => !leased.includes(id));
  const setLeases = async (on: boolean) => {
    await sql.begin(async (tx) => {
      await tx`update hosts set lease_id = null, booked_from = null where lease_id is not null or booked_from is not null`;
      await tx`delete from leases`;
      if (!on) return;
      const active = leased.map((host) => ({ id: randomUUID(), host, from: -3_600_000, state: "active" }));
      // Spread over the next 48 hours, two hours each, a host booked again only after its earlier booking.
      const bookings = Array.from({ length: BOOKINGS }, (_, i) => ({
        id: randomUUID(),
        host: open[i % open.length],
        from: Math.floor(((i + Math.random()) / BOOKINGS) * 46 * 3_600_000) + 60_000,
        state: "waiting",
      }));
      const rows = [...active, ...bookings];
      await tx`
        with v as (
          select * from jsonb_to_recordset(${tx.json(rows as never)}::jsonb) as v(id uuid, host uuid, "from" bigint, state text)),
        l as (
          insert into leases (id, owner_id, state, host_count, starts_at, ends_at, grace_ms, activated_at)
          select v.id, ${owner}, v.state, 1, now() + v."from" * interval '1 millisecond',
            case when v.state = 'active' then now() + interval '3 days' else now() + (v."from" + 7200000) * interval '1 millisecond' end,
            86400000, case when v.state = 'active' then now() end
          from v returning id, starts_at, ends_at)
        insert into lease_hosts (lease_id, host_id, host_index, starts_at, ends_at)
        select l.id, v.host, 0, l.starts_at, l.ends_at from l join v on v.id = l.id`;
      await tx`
        update hosts h set booked_from = b.first, lease_id = b.active
        from (select lh.host_id, min(lh.starts_at) as first, (array_agg(l.id) filter (where l.state = 'active'))[1] as active
              from lease_hosts lh join leases l on l.id = lh.lease_id where lh.open group by lh.host_id) b
        where h.id = b.host_id`;
    });
    // Each round's jobs go one after another to the first free host by
    // name, whose row (and entries in the index of free hosts) they churn:
    // every round starts from a vacuumed table, so that neither condition
    // inherits the other's dead index entries.
    await sql`vacuum analyze hosts`;
  };
  const ROUNDS = 8;
  const roundJobs = Math.max(1, Math.floor((2 * LEASE_JOBS) / ROUNDS));
  // A round not counted first: the coordinator has just taken the attach of
  // the new supervisors, and would charge its tail to the first condition.
  await setLeases(false);
  await dispatch({ image: "bench:v1" }, roundJobs);
  if (PROFILE) await sql`select pg_stat_statements_reset()`;
  await alternatingRounds({
    sql,
    url,
    dispatch,
    part: "(e)",
    rounds: ROUNDS,
    roundJobs,
    attached: pool.length,
    set: setLeases,
    // On a leased host, or on a booked one past its booking's start.
    misplaced: async (since) =>
      (
        await sql<{ n: number }[]>`
          select count(*)::int as n from job_hosts jh join jobs j on j.id = jh.job_id join hosts h on h.id = jh.host_id
          where j.assigned_at >= ${since}
            and (h.lease_id is not null or h.booked_from < j.assigned_at + j.job_timeout_ms * interval '1 millisecond')`
      )[0].n,
    names: { base: "no lease", changed: `${leased.length} leased, ${BOOKINGS} booked`, misplaced: "on a leased host or across a booking in the leased rounds" },
  });
  if (PROFILE) await printStatements(sql, "(e)");
  await setLeases(false);
}

export async function run(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-bench-coordinator-"));
  await chmod(dir, 0o755); // the server's OS user must reach its directory
  const { pg, sql } = await startBenchDatabase(dir);
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const child = startBenchCoordinator(port, pg.url);
  const supervisors: ScriptedSupervisor[] = [];
  try {
    await serving(url);
    const pid = child.child.pid!;
    process.stdout.write(`sizes: ${IDLE} idle supervisors, ${DISPATCH_JOBS} dispatched jobs, ${QUEUED_JOBS} queued jobs on ${ACTIVE} hosts\n`);

    // Baselines.
    const { pgP50, rpcP50 } = await roundTripBaselines(sql, url);
    report("baseline: PostgreSQL SELECT 1 round trip p50", pgP50, "ms");
    report("baseline: connect-node unary round trip p50", rpcP50, "ms");

    const { token, hosts } = await insertFixtures(
      sql,
      Array.from({ length: Math.max(IDLE, ACTIVE, HEALTH_HOSTS, LEASE_HOSTS) }, (_, i) => ({
        name: `bench-${i}`,
        tags: i < ACTIVE ? { pool: "active" } : { pool: "idle" },
      })),
    );

    const jobs = createClient(
      JobService,
      createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => token)] }),
    );
    if (LEASES_ONLY) {
      await leaseRounds({ sql, url, jobs, hosts, attached: 0, supervisors, listen: () => undefined });
      return;
    }

    // (c) Idle supervisors: memory and CPU.
    await new Promise((r) => setTimeout(r, 1000));
    const before = await usage(pid);
    let onStart: (jobId: string) => void = () => undefined;
    for (const h of hosts.slice(0, IDLE)) {
      supervisors.push(
        new ScriptedSupervisor({
          urls: [url],
          credential: h.credential,
          mode: "exit",
          noHistory: true,
          // 2,000 supervisors share this machine with the coordinator: the lighter client.
          wire: "raw",
          onStartJob: (s) => onStart(s.jobId),
        }),
      );
    }
    // Attached in two halves: the growth from the first half to the second
    // is what each more supervisor costs, without the one-time growth of a
    // server that starts taking connections (heap spaces, buffers, code).
    // Each figure is the median of samples a second apart (the heap grows
    // and shrinks with the heartbeats' garbage).
    const half = Math.floor(supervisors.length / 2);
    await inBatches(supervisors.slice(0, half), 50, (s) => s.connect());
    const halfway = { rss: await settledRss(pid) };
    await inBatches(supervisors.slice(half), 50, (s) => s.connect());
    const attached = { rss: await settledRss(pid), cpuMs: (await usage(pid)).cpuMs };
    await new Promise((r) => setTimeout(r, 10_000));
    const after = await usage(pid);
    const perSupervisor = (attached.rss - halfway.rss) / (supervisors.length - half) / 1024;
    report(`memory per idle attached supervisor (${half} -> ${supervisors.length})`, perSupervisor, "KiB");
    report(`  the same, all ${supervisors.length} against none`, (attached.rss - before.rss) / supervisors.length / 1024, "KiB");
    report(`coordinator RSS with ${supervisors.length} idle supervisors`, attached.rss / 2 ** 20, "MiB");
    report(`coordinator CPU with ${supervisors.length} idle supervisors`, ((after.cpuMs - attached.cpuMs) / 10_000) * 100, "% of a core");
    // Keep only the active pool.
    await Promise.all(supervisors.splice(ACTIVE).map((s) => s.close()));

    // (a) Dispatch latency.
    const spec = { image: "bench:v1", hosts: { tags: { pool: "active" } } };
    const dispatch = dispatcher(jobs, (f) => (onStart = f));
    if (PROFILE) await sql`select pg_stat_statements_reset()`;
    const latencies = await dispatch(spec, DISPATCH_JOBS);
    if (PROFILE) await printStatements(sql, "(a)");
    const p50 = percentile(latencies, 50);
    const p99 = percentile(latencies, 99);
    report(`dispatch latency p50 (${DISPATCH_JOBS} jobs, ${ACTIVE} hosts)`, p50, "ms", { name: "SELECT 1", value: pgP50 });
    report(`dispatch latency p99`, p99, "ms", { name: "unary RPC", value: rpcP50 });

    // (b) Assignment throughput.
    await until(async () => (await sql`select count(*)::int as n from jobs where state <> 'finalized'`)[0].n === 0, "dispatch jobs to end");
    await sql`update hosts set admin_state = 'draining' where tags @> '{"pool": "active"}'`;
    const queuedAt = performance.now();
    // The hosts drain: SubmitJob would refuse the jobs without queue_anyway.
    await inBatches(Array.from({ length: QUEUED_JOBS }), 40, () => jobs.submitJob({ spec, queueAnyway: true }));
    report(`SubmitJob rate while queueing ${QUEUED_JOBS}`, QUEUED_JOBS / ((performance.now() - queuedAt) / 1000), "jobs/s");
    if (PROFILE) await sql`select pg_stat_statements_reset()`;
    // The run's start and end are the database's clock: the transaction
    // that enables the hosts, and the last job's finalization. The queue is
    // polled only a few times a second (each count costs the database a few
    // milliseconds it would otherwise give the coordinator).
    const hotBefore = await hotUpdates(sql);
    const metricsBefore = await jobMetrics(url);
    const cpuBefore = { coordinator: (await usage(pid)).cpuMs, bench: process.cpuUsage(), ...(await cpuSplit()) };
    const wallBefore = performance.now();
    const [{ t0Wall }] = await sql<{ t0Wall: Date }[]>`
      with e as (update hosts set admin_state = 'enabled' where tags @> '{"pool": "active"}')
      select now() as "t0Wall", pg_notify('treadmill_schedule', '')`;
    await until(
      async () => (await sql`select count(*)::int as n from jobs where state <> 'finalized'`)[0].n === 0,
      "the queue to drain",
      600_000,
      250,
    );
    const cpuAfter = { coordinator: (await usage(pid)).cpuMs, bench: process.cpuUsage(cpuBefore.bench), ...(await cpuSplit()) };
    const wallMs = performance.now() - wallBefore;
    const share = (ms: number) => `${((ms / wallMs) * 100).toFixed(0)}%`;
    const [{ end }] = await sql<{ end: Date }[]>`select max(finalized_at) as end from jobs where assigned_at >= ${t0Wall}`;
    const seconds = (end.getTime() - t0Wall.getTime()) / 1000;
    report(`assignment throughput (${QUEUED_JOBS} jobs, ${ACTIVE} hosts)`, QUEUED_JOBS / seconds, "jobs/s", {
      name: "1 / SELECT 1",
      value: 1000 / pgP50,
    });
    await printPhases(sql, t0Wall);
    printJobMetrics(metricsBefore, await jobMetrics(url));
    await new Promise((r) => setTimeout(r, 1000)); // backends report their table statistics at least once a second
    const hotAfter = await hotUpdates(sql);
    process.stdout.write(
      `(b) row updates, share HOT (no index entries): ${Object.keys(hotAfter)
        .map((t) => {
          const upd = hotAfter[t].upd - (hotBefore[t]?.upd ?? 0);
          return `${t} ${upd} ${((100 * (hotAfter[t].hot - (hotBefore[t]?.hot ?? 0))) / Math.max(1, upd)).toFixed(0)}%`;
        })
        .join(", ")}\n`,
    );
    process.stdout.write(
      `(b) CPU, share of one core: coordinator ${share(cpuAfter.coordinator - cpuBefore.coordinator)}, ` +
        `PostgreSQL ${share(cpuAfter.postgresMs - cpuBefore.postgresMs)}, ` +
        `this bench (the scripted supervisors) ${share((cpuAfter.bench.user + cpuAfter.bench.system) / 1000)}, ` +
        `whole machine ${share(cpuAfter.busyMs - cpuBefore.busyMs)} of ${availableParallelism() * 100}%\n`,
    );
    if (PROFILE) await printStatements(sql, "(b)");

    // (d) Host health: the same dispatch over HEALTH_HOSTS attached hosts,
    // all healthy, then 10% quarantined and 10% checking, alternated.
    const more = hosts.slice(ACTIVE, HEALTH_HOSTS).map(
      (h) =>
        new ScriptedSupervisor({
          urls: [url],
          credential: h.credential,
          mode: "exit",
          noHistory: true,
          wire: "raw",
          onStartJob: (s) => onStart(s.jobId),
        }),
    );
    supervisors.push(...more);
    await inBatches(more, 50, (s) => s.connect());
    const pool = hosts.slice(0, HEALTH_HOSTS).map((h) => h.id);
    await until(
      async () => (await sql`select count(*)::int as n from hosts where attached_replica is not null`)[0].n >= pool.length,
      "the health pool to attach",
    );
    const unhealthy = { quarantined: pool.filter((_, i) => i % 10 === 3), checking: pool.filter((_, i) => i % 10 === 7) };
    const setHealth = async (degraded: boolean) => {
      await sql`update hosts set health = 'healthy' where id = any(${pool}::uuid[])`;
      if (!degraded) return;
      await sql`update hosts set health = 'quarantined' where id = any(${unhealthy.quarantined}::uuid[])`;
      await sql`update hosts set health = 'checking' where id = any(${unhealthy.checking}::uuid[])`;
    };
    const ROUNDS = 8;
    await alternatingRounds({
      sql,
      url,
      dispatch,
      part: "(d)",
      rounds: ROUNDS,
      roundJobs: Math.max(1, Math.floor((2 * HEALTH_JOBS) / ROUNDS)),
      attached: pool.length,
      set: setHealth,
      misplaced: async (since) =>
        (
          await sql<{ n: number }[]>`
            select count(*)::int as n from job_hosts jh join jobs j on j.id = jh.job_id
            where j.assigned_at >= ${since} and jh.host_id = any(${[...unhealthy.quarantined, ...unhealthy.checking]}::uuid[])`
        )[0].n,
      names: { base: "all healthy", changed: "10% quarantined, 10% checking", misplaced: "on a quarantined or checking host in the degraded rounds" },
    });

    await leaseRounds({ sql, url, jobs, hosts, attached: HEALTH_HOSTS, supervisors, listen: (f) => (onStart = f) });
  } finally {
    await stopBenchCoordinator({ supervisors, coordinator: child, sql, pg, dir });
  }
}
