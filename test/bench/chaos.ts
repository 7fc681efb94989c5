// `npm run bench -- chaos`: the chaos benchmark of issue #18 on a site of
// separate processes (docs/site.md: PostgreSQL, coordinator, image store,
// image cache, log server, proxy, two process supervisors, a simulated board
// and its supervisor). Short jobs that print numbered, checksummed lines
// flow steadily, with a restart policy, while
//
//   phase 1 SIGKILLs each component in turn (PostgreSQL in the middle and at
//           the end) and starts it again 5 s later;
//   phase 2 keeps the log server down for 5 minutes, then the cache.
//
// Then every job must finish and every log settle. test/support/chaos.ts
// runs it and says what each figure counts. Each figure is printed beside
// its goal (0 lost, 0 run twice, 0 logs missing or repeating lines, 0 jobs
// failed by an outage, every component back) and, where one applies,
// beside a baseline measured in the same run: the same jobs at the same pace
// with no fault, before the chaos (their run time and turnaround), and each
// component's cold start when the site was assembled (its time back).
//
// Sizes (environment): TREADMILL_BENCH_CHAOS_JOBS (250, spread over the
// faults' expected length; more at the same pace if they take longer),
// TREADMILL_BENCH_CHAOS_LINES (200 per job), TREADMILL_BENCH_CHAOS_DOWN_MS
// (5000, phase 1), TREADMILL_BENCH_CHAOS_OUTAGE_MS (300000, phase 2, each),
// TREADMILL_BENCH_CHAOS_MAX_RESTARTS (3), TREADMILL_BENCH_CHAOS_BOARD_EVERY
// (10: every 10th job runs on the board; 0: none),
// TREADMILL_BENCH_CHAOS_BASELINE_JOBS (20; 0: none),
// TREADMILL_BENCH_CHAOS_JOB_MS (about how long a job runs, 5000),
// TREADMILL_BENCH_CHAOS_SUBMIT_INTERVAL_MS (default: the jobs spread over
// the phases' expected length); TREADMILL_BENCH_CHAOS_KILLS (phase 1's
// components, comma-separated) and an OUTAGE_MS of 0 (no phase 2) make
// partial runs. It takes about 30 minutes at the defaults.
// The site's directory (every component's log) is kept; its path is printed.
import { FULL_KILLS, failedGoals, runChaos, type ChaosResult } from "../support/chaos.js";
import { report } from "./report.js";

const env = (name: string, fallback: number) => Number(process.env[`TREADMILL_BENCH_CHAOS_${name}`] ?? fallback);

/** One figure beside its goal. */
function goal(name: string, value: number, target: number, unit = ""): void {
  const met = value === target ? "met" : "MISSED";
  process.stdout.write(`${name.padEnd(48)} ${`${value}${unit}`.padStart(16)}   goal ${target}${unit}: ${met}\n`);
}

function print(r: ChaosResult): void {
  const s = (ms: number) => ms / 1000;
  process.stdout.write(`\njobs of about ${s(r.jobMs).toFixed(1)} s, one submitted every ${r.submitIntervalMs} ms while the faults lasted\n`);
  goal("jobs accepted by SubmitJob", r.submitted, r.submitted + r.notSubmitted);
  report("  of which sent where a kill strikes, or after", r.probes, "jobs");
  goal("jobs finished (finalized)", r.finished, r.submitted);
  goal("jobs lost (never finalized, or gone)", r.lost.length, 0);
  goal("attempts run twice (of starts counted)", r.runTwice.length, 0);
  report("  workload starts counted in supervisors' logs", r.starts, "starts");
  goal("jobs whose log misses or repeats lines", new Set(r.logProblems.map((p) => p.jobId)).size, 0);
  goal("jobs failed by an outage", r.failed.length, 0);
  const logs = Object.entries(r.logNotComplete);
  report("jobs whose log is not COMPLETE", logs.reduce((a, [, n]) => a + n, 0), "jobs");
  for (const [status, n] of logs) report(`  ${status}`, n, "jobs");
  report("jobs restarted by their policy", r.restartedJobs, "jobs");
  report("attempts ended by infrastructure", Object.values(r.infraEnds).reduce((a, b) => a + b, 0), "attempts");
  for (const [reason, n] of Object.entries(r.infraEnds).sort()) report(`  ${reason}`, n, "attempts");

  const back = r.bounces.filter((b) => b.backMs !== undefined).length;
  goal("components back serving (of kills)", back, r.bounces.length);
  process.stdout.write("\ntime back to SERVING, from its start (down on purpose before it):\n");
  for (const b of r.bounces) {
    const label = `  phase ${b.phase}: ${b.name}, down ${s(b.downMs).toFixed(0)} s`;
    if (b.backMs === undefined) {
      process.stdout.write(`${label.padEnd(48)} ${"NOT BACK".padStart(16)}\n`);
      continue;
    }
    report(label, s(b.backMs), "s", { name: `cold start of ${b.name}`, value: s(r.coldStartMs[b.name]) });
    if (b.coordinatorBackMs !== undefined) {
      report("    coordinator SERVING again", s(b.coordinatorBackMs), "s", { name: "cold start of coordinator", value: s(r.coldStartMs.coordinator) });
    }
    report("    then a job assigned since succeeded", b.flowMs === undefined ? NaN : s(b.flowMs), "s");
    report("    jobs running when killed (a host's: its own)", b.runningAtKill, "jobs");
    report("    jobs finalized while it was down", b.finishedWhileDown, "jobs");
  }

  process.stdout.write("\n");
  const base = r.baseline;
  const versus = (name: string, value: number) => (base ? { name, value } : undefined);
  report(`wall time of ${r.chaos.jobs} jobs under chaos`, s(r.chaos.wallMs), "s");
  report("job run time p50 (assigned to finalized)", s(r.chaos.runP50Ms), "s", versus("no fault", s(base?.runP50Ms ?? 0)));
  report("job run time p95", s(r.chaos.runP95Ms), "s", versus("no fault", s(base?.runP95Ms ?? 0)));
  report("job turnaround p50 (submitted to finalized)", s(r.chaos.turnaroundP50Ms), "s", versus("no fault", s(base?.turnaroundP50Ms ?? 0)));
  report("job turnaround p95", s(r.chaos.turnaroundP95Ms), "s", versus("no fault", s(base?.turnaroundP95Ms ?? 0)));

  const missed = failedGoals(r);
  process.stdout.write(missed.length === 0 ? "\nevery goal met\n" : `\ngoals missed:\n${missed.map((m) => `  - ${m}\n`).join("")}`);
  process.stdout.write(`the run's logs: ${r.dir}/logs (one file per component)\n`);
}

export async function run(): Promise<void> {
  const jobs = env("JOBS", 250);
  const outageMs = env("OUTAGE_MS", 300_000);
  const result = await runChaos({
    jobs,
    lines: env("LINES", 200),
    kills: process.env.TREADMILL_BENCH_CHAOS_KILLS?.split(",").filter((k) => k !== "") ?? FULL_KILLS,
    killDownMs: env("DOWN_MS", 5000),
    outages:
      outageMs > 0
        ? [
            { name: "log-server", downMs: outageMs },
            { name: "image-cache", downMs: outageMs },
          ]
        : [],
    maxRestarts: env("MAX_RESTARTS", 3),
    boardEvery: env("BOARD_EVERY", 10),
    baselineJobs: env("BASELINE_JOBS", 20),
    jobMs: process.env.TREADMILL_BENCH_CHAOS_JOB_MS ? env("JOB_MS", 0) : undefined,
    submitIntervalMs: process.env.TREADMILL_BENCH_CHAOS_SUBMIT_INTERVAL_MS ? env("SUBMIT_INTERVAL_MS", 0) : undefined,
    serveTimeoutMs: 180_000,
    flowTimeoutMs: 300_000,
    finishTimeoutMs: 30 * 60_000,
    keepDir: true,
    progress: (line) => process.stdout.write(`${line}\n`),
  });
  print(result);
}
