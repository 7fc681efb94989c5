// `npm run bench -- webhooks`: subscriptions and webhooks (issue #24 item 2)
// under the coordinator benchmark's assignment load, on the machinery of
// `npm run bench -- events` (test/bench/shared/job-system.ts: the
// coordinator as a child process on an embedded PostgreSQL, 200 scripted
// supervisors that run each job to its end at once; jobs queued while the
// hosts drain, then every host enabled at once; the figure is finalized
// jobs per second).
//
// 1,000 subscriptions of one admin, each on a label `bucket` (100 buckets,
// 10 subscriptions each), kind job.state and state finalized, all to one
// local receiver (an HTTP server in this process that answers 204): every
// job (in one bucket) thus has one event that 10 subscriptions match, while
// every event of every job is considered against all 1,000. Rounds
// alternate subscriptions off (disabled) and on (TREADMILL_BENCH_WEBHOOKS_ROUNDS,
// even; TREADMILL_BENCH_WEBHOOKS_JOBS jobs each), so that the machine's
// drift falls on both alike.
//
// Dispatch latency: from the commit of the transaction that wrote the event
// to the receiver's receipt of the POST (PostgreSQL records commit times,
// track_commit_timestamp; the bench adds a column recording each event's
// writing transaction, as the events bench does). Baselines in the same run:
// the assignment throughput with subscriptions off, and a bare POST from
// this process to the same receiver. The ceiling, also of this run: the
// CPU of 10,000 bare POSTs (sender and receiver both in this process),
// ten per job, beside the machine's CPU per job without subscriptions,
// bounds the throughput ratio of any design that sends one POST per
// delivery while assignment keeps the machine busy.
//
// Where the machine's time goes: CPU per job of the coordinator, PostgreSQL
// and this process (the supervisors and the receiver), per kind of round,
// from the round's first submission to its last webhook's arrival.
//
// Profiling: TREADMILL_BENCH_PROFILE=<dir> writes a CPU profile of the
// coordinator there (node --cpu-prof).
import http, { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { chmod, mkdtemp } from "node:fs/promises";
import { randomUUID } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { freePort } from "../support/net.js";
import { percentile, report } from "./report.js";
import { PROFILE, assignmentRound, cpuSplit, printStatements, startBenchCoordinator, inBatches, usage, insertFixtures, serving, sizeFromEnv as env, startBenchDatabase, stopBenchCoordinator, until } from "./shared/job-system.js";

const JOBS = env("TREADMILL_BENCH_WEBHOOKS_JOBS", 2000);
const ROUNDS = env("TREADMILL_BENCH_WEBHOOKS_ROUNDS", 4);
const HOSTS = 200;
const SUBSCRIPTIONS = 1000;
const BUCKETS = 100;

/** One bare POST of an empty JSON object through `agent`. */
function post(url: string, agent: http.Agent): Promise<void> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: "POST", agent, headers: { "content-type": "application/json", "content-length": 2 } }, (res) => {
      res.resume();
      res.on("end", resolve);
    });
    req.on("error", reject);
    req.end("{}");
  });
}

const wallNow = () => performance.timeOrigin + performance.now();

export async function run(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-bench-webhooks-"));
  await chmod(dir, 0o755);
  const { pg, sql } = await startBenchDatabase(dir, { track_commit_timestamp: "on" });
  // The receiver: arrival time per (event id, delivery id).
  const arrivals: { eventId: string; at: number }[] = [];
  const receiver = createServer((req, res) => {
    const at = wallNow();
    req.resume();
    req.on("end", () => {
      const eventId = String(req.headers["x-treadmill-event-id"] ?? "");
      if (eventId !== "") arrivals.push({ eventId, at });
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((resolve) => receiver.listen(0, "127.0.0.1", resolve));
  const hookUrl = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hook`;
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const child = startBenchCoordinator(port, pg.url);
  const supervisors: ScriptedSupervisor[] = [];
  try {
    await serving(url);
    process.stdout.write(`sizes: ${ROUNDS} rounds of ${JOBS} jobs on ${HOSTS} hosts; ${SUBSCRIPTIONS} subscriptions (${SUBSCRIPTIONS / BUCKETS} per job) off and on alternately\n`);
    // Baseline: a bare POST to the receiver from this process.
    const posts: number[] = [];
    for (let i = 0; i < 500; i++) {
      const t = performance.now();
      const res = await fetch(hookUrl, { method: "POST", body: "{}", headers: { "content-type": "application/json" } });
      await res.arrayBuffer();
      posts.push(performance.now() - t);
    }
    // The cost of POSTs alone: this process sends them at the worker's
    // concurrency over keep-alive connections to its own receiver, so its CPU
    // is that of both ends. No implementation that makes one POST per
    // delivery spends less of the machine on them.
    const agent = new http.Agent({ keepAlive: true, maxSockets: 64, maxFreeSockets: 64 });
    const bare = { n: 10_000, cpu: process.cpuUsage(), wall: performance.now() };
    await inBatches(Array.from({ length: bare.n }), 128, () => post(hookUrl, agent));
    const bareWallMs = performance.now() - bare.wall;
    const bareCpu = process.cpuUsage(bare.cpu);
    agent.destroy();
    const postCpuUs = (bareCpu.user + bareCpu.system) / bare.n;
    process.stdout.write(`bare POSTs, 128 at once: ${((bare.n / bareWallMs) * 1000).toFixed(0)}/s on one thread, ${postCpuUs.toFixed(0)} us of CPU each (sender and receiver)\n`);
    arrivals.length = 0;

    const { token, hosts } = await insertFixtures(
      sql,
      Array.from({ length: HOSTS }, (_, i) => ({ name: `bench-${i}`, tags: { pool: "active" } })),
    );
    const [{ id: owner }] = await sql<{ id: string }[]>`select id from users where name = 'bench'`;
    for (let i = 0; i < SUBSCRIPTIONS; i += 100) {
      const chunk = Array.from({ length: Math.min(100, SUBSCRIPTIONS - i) }, (_, k) => ({ id: randomUUID(), dest: randomUUID(), bucket: String((i + k) % BUCKETS) }));
      await sql`
        insert into subscriptions (id, name, owner_id, filter, secret, enabled)
        select v.id, 'bench', ${owner}, jsonb_build_object('kinds', '["job.state"]'::jsonb, 'labels', jsonb_build_object('bucket', v.bucket),
          'images', '[]'::jsonb, 'owner_ids', '[]'::jsonb, 'states', '["finalized"]'::jsonb, 'outcomes', '[]'::jsonb, 'regressions_only', false),
          'whsec_bench', false
        from jsonb_to_recordset(${sql.json(chunk)}::jsonb) as v(id uuid, dest uuid, bucket text)`;
      await sql`
        insert into subscription_destinations (id, subscription_id, position, kind, url)
        select v.dest, v.id, 0, 'webhook', ${hookUrl} from jsonb_to_recordset(${sql.json(chunk)}::jsonb) as v(id uuid, dest uuid, bucket text)`;
    }
    const transport = createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => token)] });
    const jobs = createClient(JobService, transport);
    for (const h of hosts) supervisors.push(new ScriptedSupervisor({ urls: [url], credential: h.credential, mode: "exit", noHistory: true, wire: "raw" }));
    await inBatches(supervisors, 50, (s) => s.connect());
    await until(async () => (await sql`select count(*)::int as n from hosts where attached_replica is not null`)[0].n === HOSTS, "the hosts to attach");
    await sql`update hosts set health = 'healthy'`;
    await sql`alter table feed_pending add column bench_xid xid8 default pg_current_xact_id()`;
    await sql`alter table feed_events add column bench_xid xid8`;

    const rates = { off: [] as number[], on: [] as number[] };
    const zero = () => ({ coordinator: 0, postgres: 0, bench: 0, machine: 0 });
    const cpu = { off: zero(), on: zero() };
    const pid = child.child.pid!;
    let expected = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const on = round % 2 === 1;
      await sql`update subscriptions set enabled = ${on}`;
      if (PROFILE) await sql`select pg_stat_statements_reset()`;
      const before = { coordinator: (await usage(pid)).cpuMs, bench: process.cpuUsage(), ...(await cpuSplit()) };
      let n = 0;
      const rate = await assignmentRound(sql, JOBS, () =>
        jobs.submitJob({ spec: { image: "bench:v1", hosts: { tags: { pool: "active" } }, tags: { bucket: String(n++ % BUCKETS) } }, queueAnyway: true }),
      );
      (on ? rates.on : rates.off).push(rate);
      if (on) expected += JOBS * (SUBSCRIPTIONS / BUCKETS);
      // The round's webhooks are all in before the next round starts.
      await until(async () => arrivals.length >= expected, "the round's webhooks to arrive", 120_000, 100).catch(async (err: unknown) => {
        const states = await sql`select state, count(*)::int as n, max(attempt_count) as attempts, max(error) as error from subscription_deliveries group by state`;
        throw new Error(`${String(err)}: ${arrivals.length} of ${expected} arrived; deliveries ${JSON.stringify(states)}`);
      });
      const spent = process.cpuUsage(before.bench);
      const after = await cpuSplit();
      const c = cpu[on ? "on" : "off"];
      c.coordinator += (await usage(pid)).cpuMs - before.coordinator;
      c.postgres += after.postgresMs - before.postgresMs;
      c.bench += (spent.user + spent.system) / 1000;
      c.machine += after.busyMs - before.busyMs;
      process.stdout.write(`round ${round + 1} subscriptions ${on ? "on " : "off"}: ${rate.toFixed(0)} jobs/s\n`);
      if (PROFILE) await printStatements(sql, `round ${round + 1}`);
    }
    for (const kind of ["off", "on"] as const) {
      const c = cpu[kind];
      const perJob = (ms: number) => `${((ms / (JOBS * (ROUNDS / 2))) * 1000).toFixed(0)} us`;
      process.stdout.write(
        `CPU per job, subscriptions ${kind}: coordinator ${perJob(c.coordinator)}, postgres ${perJob(c.postgres)}, this process (supervisors, receiver) ${perJob(c.bench)}, machine ${perJob(c.machine)}\n`,
      );
    }
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    report("assignment throughput, no subscriptions", mean(rates.off), "jobs/s");
    report("assignment throughput, 1000 subscriptions", mean(rates.on), "jobs/s", { name: "no subscriptions", value: mean(rates.off) });

    const commits = new Map<string, number>();
    const ids = [...new Set(arrivals.map((a) => a.eventId))];
    for (let i = 0; i < ids.length; i += 5000) {
      const rows = await sql<{ cursor: string; committed: number }[]>`
        select cursor::text, extract(epoch from pg_xact_commit_timestamp(bench_xid::xid)) * 1000 as committed
        from feed_events where cursor = any(${ids.slice(i, i + 5000)}::bigint[])`;
      for (const r of rows) commits.set(r.cursor, r.committed);
    }
    const latencies = arrivals.map((a) => a.at - commits.get(a.eventId)!).filter((x) => Number.isFinite(x));
    process.stdout.write(`webhooks received: ${arrivals.length} (${expected} expected), ${ids.length} events\n`);
    report("webhook dispatch, commit -> receiver p50", percentile(latencies, 50), "ms", { name: "bare POST p50", value: percentile(posts, 50) });
    report("webhook dispatch, commit -> receiver p99", percentile(latencies, 99), "ms", { name: "bare POST p99", value: percentile(posts, 99) });
    // Where the time goes: commit -> queued (matched), queued -> acknowledged (waiting to be sent, and the request).
    const [split] = await sql<{ queued_p50: number; queued_p99: number; sent_p50: number; sent_p99: number; request_p50: number; request_p99: number }[]>`
      with x as (
        select extract(epoch from d.created_at) * 1000 - extract(epoch from pg_xact_commit_timestamp(e.bench_xid::xid)) * 1000 as queued,
          extract(epoch from d.last_attempt_at - d.created_at) * 1000 as sent, (d.attempts -> -1 ->> 'ms')::int as request
        from subscription_deliveries d join feed_events e on e.cursor = d.event_id::bigint)
      select percentile_cont(0.5) within group (order by queued) as queued_p50, percentile_cont(0.99) within group (order by queued) as queued_p99,
        percentile_cont(0.5) within group (order by sent) as sent_p50, percentile_cont(0.99) within group (order by sent) as sent_p99,
        percentile_cont(0.5) within group (order by request) as request_p50, percentile_cont(0.99) within group (order by request) as request_p99 from x`;
    report("of which commit -> queued p50", split.queued_p50, "ms");
    report("of which commit -> queued p99", split.queued_p99, "ms");
    report("of which queued -> acknowledged p50", split.sent_p50, "ms");
    report("of which queued -> acknowledged p99", split.sent_p99, "ms");
    report("of that, the request itself p50", split.request_p50, "ms");
    report("of that, the request itself p99", split.request_p99, "ms");
    // The ceiling: the machine's CPU per job without subscriptions, plus the
    // bare POSTs' CPU for the job's webhooks, bounds the throughput ratio of
    // any implementation on this machine while assignment keeps it busy.
    const perJobOff = cpu.off.machine / (JOBS * (ROUNDS / 2));
    const perJobPosts = ((SUBSCRIPTIONS / BUCKETS) * postCpuUs) / 1000;
    report("assignment throughput ratio, ceiling from the POSTs' CPU alone", (perJobOff / (perJobOff + perJobPosts)) * 100, "%");
    report("webhook dispatch p99 against its goal", percentile(latencies, 99), "ms", { name: "goal", value: 200 });
  } finally {
    receiver.closeAllConnections();
    receiver.close();
    await stopBenchCoordinator({ supervisors, coordinator: child, sql, pg, dir });
  }
}
