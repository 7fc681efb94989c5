// `npm run bench -- failover`: how long the coordinators take to serve
// writes again after a PostgreSQL failover (issue #20's goal: at most 10 s
// after the standby is promoted, with 0 jobs lost), beside baselines
// measured in the same run.
//
// Each run assembles docs/ha.md afresh (a primary, a synchronous standby,
// two coordinator replicas on the multi-host DATABASE_URL: test/support/ha.ts),
// submits a job through each replica every 100 ms (retrying a failed one
// with its request_id), SIGKILLs the primary (postmaster and backends),
// waits 3 s, and promotes the standby with the doc's command. Figures:
//  - writes served again: ms from the end of `pg_ctl promote` to the first
//    SubmitJob acknowledged after it, on the slower replica (worst run);
//  - baseline `pg_ctl promote -w` itself (the database's own share);
//  - baseline a coordinator's cold restart (SIGKILL, then its doc command
//    again, to health SERVING): what replacing a replica would cost;
//  - jobs lost: acknowledged SubmitJobs whose job the new primary lacks,
//    and jobs it holds that no acknowledgement named twice (duplicates).
//
// Runs: TREADMILL_BENCH_FAILOVER_RUNS (default 3).
import postgres from "postgres";
import { insertImage, uniqueTag } from "../support/jobs.js";
import { startHa, startSubmitter } from "../support/ha.js";
import { waitUntil } from "../support/wait.js";
import { report } from "./report.js";

const RUNS = Number(process.env.TREADMILL_BENCH_FAILOVER_RUNS ?? 3);
const OUTAGE_MS = 3000;

interface Run {
  writesBackMs: number;
  promoteMs: number;
  restartMs: number;
  acknowledged: number;
  lost: number;
  duplicates: number;
  failed: Record<string, number>;
}

async function once(): Promise<Run> {
  const ha = await startHa({ quiet: true });
  try {
    const sql = postgres(ha.databaseUrl, { max: 1, onnotice: () => undefined });
    const image = await insertImage(sql);
    await sql.end({ timeout: 1 });
    // Hosts nobody has: the jobs stay queued, the writes are what is measured.
    const tags = uniqueTag();
    const submitters = await Promise.all(
      ha.urls.map(async (url) => startSubmitter(url, await ha.admin(url), () => ({ image: image.ref, hosts: { tags } }), 100)),
    );
    await waitUntil(() => submitters.every((s) => s.acknowledged.length >= 5), "jobs submitted through both replicas", 30_000);

    await ha.kill("primary");
    await new Promise((resolve) => setTimeout(resolve, OUTAGE_MS)); // the operator's reaction time, not a wait for an event
    const started = performance.now();
    const promoted = await ha.run("promote");
    const promoteMs = performance.now() - started;
    const promotedAt = Date.now();
    if (promoted.code !== 0) throw new Error(`pg_ctl promote exited ${promoted.code}: ${promoted.stderr}`);
    const back = await Promise.all(
      submitters.map((s) => waitUntil(() => s.acknowledged.find((a) => a.at >= promotedAt), "a write after the promotion", 60_000)),
    );
    const writesBackMs = Math.max(...back.map((a) => a.at - promotedAt));
    await Promise.all(submitters.map((s) => s.stop()));

    const acknowledged = submitters.flatMap((s) => s.acknowledged.map((a) => a.jobId));
    const check = postgres(ha.databaseUrl, { max: 1, onnotice: () => undefined });
    const held = new Set((await check<{ id: string }[]>`select id from jobs`).map((r) => r.id));
    await check.end({ timeout: 1 });
    const failed: Record<string, number> = {};
    for (const s of submitters) for (const [code, n] of s.failures) failed[code] = (failed[code] ?? 0) + n;

    // A replica's cold restart on the new primary.
    await ha.kill("coordinator-1");
    const restarted = performance.now();
    await ha.start("coordinator-1");
    await ha.waitServing("coordinator-1");
    const restartMs = performance.now() - restarted;

    return {
      writesBackMs,
      promoteMs,
      restartMs,
      acknowledged: acknowledged.length,
      lost: acknowledged.filter((id) => !held.has(id)).length,
      duplicates: held.size - new Set(acknowledged).size,
      failed,
    };
  } finally {
    await ha.stop();
  }
}

export async function run(): Promise<void> {
  const runs: Run[] = [];
  for (let i = 0; i < RUNS; i++) {
    const r = await once();
    runs.push(r);
    process.stdout.write(
      `run ${i + 1}: writes back ${r.writesBackMs} ms after a ${r.promoteMs.toFixed(0)} ms promotion; restart ${r.restartMs.toFixed(0)} ms; ${r.acknowledged} acknowledged, ${r.lost} lost, ${r.duplicates} duplicated; failed attempts ${JSON.stringify(r.failed)}\n`,
    );
  }
  const worst = (f: (r: Run) => number) => Math.max(...runs.map(f)) / 1000;
  const writesBack = worst((r) => r.writesBackMs);
  report("writes served again after promotion (worst)", writesBack, "s", { name: "pg_ctl promote -w", value: worst((r) => r.promoteMs) });
  report("writes served again after promotion (worst)", writesBack, "s", { name: "coordinator cold restart", value: worst((r) => r.restartMs) });
  report("jobs lost (acknowledged, missing after failover)", runs.reduce((n, r) => n + r.lost, 0), "jobs", {
    name: "jobs acknowledged",
    value: runs.reduce((n, r) => n + r.acknowledged, 0),
  });
  report("jobs duplicated", runs.reduce((n, r) => n + r.duplicates, 0), "jobs");
  process.stdout.write(`goal: writes served again <= 10 s after promotion with 0 jobs lost: ${writesBack <= 10 && runs.every((r) => r.lost === 0) ? "met" : "NOT met"}\n`);
}
