// `npm run bench -- events`: the event feed (issue #24 item 1) under the
// coordinator benchmark's assignment load, with its machinery
// (test/bench/shared/job-system.ts: the coordinator as a child process on an
// embedded PostgreSQL, scripted supervisors that run each job to its end at
// once): jobs are queued while the 200 hosts drain, then every host is
// enabled at once, and the figure is finalized jobs per second, as in part
// (b) of `npm run bench -- coordinator`.
//
// Rounds alternate the feed off and on (TREADMILL_BENCH_EVENTS_ROUNDS, even;
// TREADMILL_BENCH_EVENTS_JOBS jobs each), so that the machine's drift falls
// on both alike. Off: the feed's triggers are disabled (no event is
// written). On: every job's state changes are written to the feed and an
// admin follows it with WatchEvents (every event, no filter) from a process
// of its own (children/event-follower.ts), as a client would.
//
// Delivery latency is from the commit of the transaction that wrote an
// event to the event's arrival at the follower: PostgreSQL records commit
// times here (track_commit_timestamp), and the bench adds a column to
// feed_pending (and feed_events, which the sequencer copies it to) that
// records each event's writing transaction (its default,
// pg_current_xact_id(), the only change to the schema), read afterwards;
// both clocks are this machine's. So the figure includes the sequencer's
// hop (numbering committed events) and the reader's. Baselines in the same
// run: a bare NOTIFY's commit to a LISTEN connection's receipt on an idle
// machine, and the same under the load of the feed-on rounds: the bench
// sends a NOTIFY every 20 ms while they run and the follower's process
// LISTENs for it beside its stream. That last one is the floor for any feed
// on this machine: how soon the follower's process can learn of a commit
// at all while the coordinator, PostgreSQL and the supervisors share the
// cores.
//
// Profiling: TREADMILL_BENCH_PROFILE=<dir> writes a CPU profile of the
// coordinator there (node --cpu-prof).
import { chmod, mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import postgres from "postgres";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { startProcess } from "../support/process.js";
import { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { freePort } from "../support/net.js";
import { percentile, report } from "./report.js";
import { assignmentRound, startBenchCoordinator, inBatches, insertFixtures, roundTripBaselines, serving, sizeFromEnv as env, startBenchDatabase, stopBenchCoordinator, until } from "./shared/job-system.js";

const FOLLOWER = fileURLToPath(new URL("./children/event-follower.ts", import.meta.url));
const JOBS = env("TREADMILL_BENCH_EVENTS_JOBS", 2000);
const ROUNDS = env("TREADMILL_BENCH_EVENTS_ROUNDS", 4);
const HOSTS = 200;
const TRIGGERS = ["jobs_feed_insert", "jobs_feed_update"];

/** Wall-clock milliseconds with sub-millisecond precision (comparable with PostgreSQL's clock on this machine). */
const wallNow = () => performance.timeOrigin + performance.now();


/** Commit of a NOTIFY to its receipt on a LISTEN connection, `n` times one after another, in ms. */
async function notifyLatencies(url: string, sql: postgres.Sql, n = 500): Promise<number[]> {
  const listener = postgres(url, { max: 1, onnotice: () => undefined });
  const samples: number[] = [];
  let got: ((at: number) => void) | undefined;
  await listener.listen("bench_baseline", () => got?.(wallNow()));
  for (let i = 0; i < n; i++) {
    const arrived = new Promise<number>((resolve) => (got = resolve));
    const [{ xid }] = await sql<{ xid: string }[]>`select pg_current_xact_id()::text as xid, pg_notify('bench_baseline', '')`;
    const at = await arrived;
    const [{ committed }] = await sql<{ committed: number }[]>`
      select extract(epoch from pg_xact_commit_timestamp(${xid}::xid8::xid)) * 1000 as committed`;
    samples.push(at - committed);
  }
  await listener.end({ timeout: 5 });
  return samples;
}

/** A NOTIFY on `bench_probe` every 20 ms (its payload its transaction's id) until stopped; `done` resolves with the ids. */
function probe(sql: postgres.Sql): { stop(): void; done: Promise<string[]> } {
  let stopped = false;
  const done = (async () => {
    const xids: string[] = [];
    while (!stopped) {
      const [{ xid }] = await sql<{ xid: string }[]>`select pg_current_xact_id()::text as xid, pg_notify('bench_probe', pg_current_xact_id()::text)`;
      xids.push(xid);
      await new Promise((r) => setTimeout(r, 20));
    }
    return xids;
  })();
  return { stop: () => (stopped = true), done };
}

export async function run(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-bench-events-"));
  await chmod(dir, 0o755); // the server's OS user must reach its directory
  const { pg, sql } = await startBenchDatabase(dir, { track_commit_timestamp: "on" });
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const child = startBenchCoordinator(port, pg.url);
  const supervisors: ScriptedSupervisor[] = [];
  try {
    await serving(url);
    process.stdout.write(`sizes: ${ROUNDS} rounds of ${JOBS} jobs on ${HOSTS} hosts, feed off and on alternately\n`);
    const { pgP50 } = await roundTripBaselines(sql, url, 500);
    report("baseline: PostgreSQL SELECT 1 round trip p50", pgP50, "ms");
    const notify = await notifyLatencies(pg.url, sql);
    report("baseline: NOTIFY commit -> LISTEN p50", percentile(notify, 50), "ms");
    report("baseline: NOTIFY commit -> LISTEN p99", percentile(notify, 99), "ms");

    const { token, hosts } = await insertFixtures(
      sql,
      Array.from({ length: HOSTS }, (_, i) => ({ name: `bench-${i}`, tags: { pool: "active" } })),
    );
    const transport = createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => token)] });
    const jobs = createClient(JobService, transport);
    for (const h of hosts) {
      supervisors.push(new ScriptedSupervisor({ urls: [url], credential: h.credential, mode: "exit", noHistory: true, wire: "raw" }));
    }
    await inBatches(supervisors, 50, (s) => s.connect());
    await until(async () => (await sql`select count(*)::int as n from hosts where attached_replica is not null`)[0].n === HOSTS, "the hosts to attach");
    await sql`update hosts set health = 'healthy'`;
    await sql`alter table feed_pending add column bench_xid xid8 default pg_current_xact_id()`;
    await sql`alter table feed_events add column bench_xid xid8`;

    // The follower: every event, from the head, for the whole run.
    const follower = startProcess("--import", ["tsx", FOLLOWER, url, token, pg.url]);
    await follower.waitForLine(/^ready$/, 60_000);
    const spec = { image: "bench:v1", hosts: { tags: { pool: "active" } } };
    const rates = { off: [] as number[], on: [] as number[] };
    const probeXids: string[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      const on = round % 2 === 1;
      for (const t of TRIGGERS) await sql.unsafe(`alter table jobs ${on ? "enable" : "disable"} trigger ${t}`);
      const probing = on ? probe(sql) : undefined;
      const rate = await assignmentRound(sql, JOBS, () => jobs.submitJob({ spec, queueAnyway: true })).finally(() => probing?.stop());
      if (probing) probeXids.push(...(await probing.done));
      (on ? rates.on : rates.off).push(rate);
      process.stdout.write(`round ${round + 1} feed ${on ? "on " : "off"}: ${rate.toFixed(0)} jobs/s\n`);
    }
    // Everything written has arrived: the follower has the newest event.
    const [{ n: written }] = await sql<{ n: number }[]>`select count(*)::int as n from feed_events where kind like 'job.%'`;
    const eventLines = () => follower.lines.filter((l) => l !== "ready" && !l.startsWith("probe "));
    await until(async () => eventLines().length >= written, "the follower to receive every event", 60_000);
    follower.child.kill("SIGTERM");
    await follower.exited;
    const received = eventLines().map((l) => {
      const [cursor, at] = l.split(" ");
      return { cursor: BigInt(cursor), at: Number(at) };
    });
    const probeArrivals = new Map(follower.lines.filter((l) => l.startsWith("probe ")).map((l) => [l.split(" ")[1], Number(l.split(" ")[2])]));
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    report("assignment throughput, feed off", mean(rates.off), "jobs/s");
    report("assignment throughput, feed on and followed", mean(rates.on), "jobs/s", { name: "feed off", value: mean(rates.off) });

    const commits = new Map<bigint, number>();
    const cursors = received.map((r) => r.cursor.toString());
    for (let i = 0; i < cursors.length; i += 5000) {
      const rows = await sql<{ cursor: string; committed: number }[]>`
        select cursor::text, extract(epoch from pg_xact_commit_timestamp(bench_xid::xid)) * 1000 as committed
        from feed_events where cursor = any(${cursors.slice(i, i + 5000)}::bigint[])`;
      for (const r of rows) commits.set(BigInt(r.cursor), r.committed);
    }
    const latencies = received.map((r) => r.at - commits.get(r.cursor)!);
    process.stdout.write(`events delivered: ${received.length} (${written} written)\n`);
    report("feed delivery, commit -> follower p50", percentile(latencies, 50), "ms", { name: "NOTIFY p50", value: percentile(notify, 50) });
    report("feed delivery, commit -> follower p99", percentile(latencies, 99), "ms", { name: "NOTIFY p99", value: percentile(notify, 99) });
    const probeCommits = await sql<{ xid: string; committed: number }[]>`
      select x as xid, extract(epoch from pg_xact_commit_timestamp(x::xid8::xid)) * 1000 as committed from unnest(${probeXids}::text[]) as x`;
    const underLoad = probeCommits.filter((p) => probeArrivals.has(p.xid)).map((p) => probeArrivals.get(p.xid)! - p.committed);
    process.stdout.write(`probes under load: ${underLoad.length} of ${probeXids.length} received\n`);
    report("NOTIFY commit -> follower's process under load p50", percentile(underLoad, 50), "ms");
    report("feed delivery p99 against a NOTIFY under the same load", percentile(latencies, 99), "ms", { name: "NOTIFY under load p99", value: percentile(underLoad, 99) });
    report("feed delivery p99 against its goal", percentile(latencies, 99), "ms", { name: "goal", value: 50 });
  } finally {
    await stopBenchCoordinator({ supervisors, coordinator: child, sql, pg, dir });
  }
}
