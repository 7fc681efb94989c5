// `npm run bench -- supervisor`: job start overhead of the process driver,
// from StartJob received by the supervisor to the workload's first
// instruction, against spawning the same command directly in the same run;
// and jobs per minute through one host running empty jobs back to back.
//
// The workload's first instruction reads /proc/uptime (10 ms resolution;
// busybox's date has no sub-second format), turned into wall-clock time
// with this process's own reading of the same clock.
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { promisify } from "node:util";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { ExitStatus } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { startTestbed } from "../support/testbed.js";
import { percentile, report } from "./report.js";

const exec = promisify(execFile);
const FIRST_INSTRUCTION = 'read up rest < /proc/uptime; echo "T=$up"';
const JOBS = Number(process.env.TREADMILL_BENCH_SUPERVISOR_JOBS ?? 20);

/**
 * Milliseconds since the epoch at boot, from /proc/uptime: the median of many
 * synchronous readings right after the clock (an asynchronous read can lag
 * its clock reading by a lot on a busy machine, and /proc/uptime is cut to
 * 10 ms: the median averages that out as the workload's own readings do).
 */
function bootEpochMs(): number {
  const samples: number[] = [];
  for (let i = 0; i < 101; i++) {
    const now = Date.now();
    const uptime = Number(readFileSync("/proc/uptime", "utf8").split(" ")[0]);
    samples.push(now - uptime * 1000);
    const until = Date.now() + 1;
    while (Date.now() < until) {
      // Spread the samples over the 10 ms steps of /proc/uptime.
    }
  }
  return percentile(samples, 50);
}

function workloadTimeMs(output: string, boot: number): number {
  const m = /T=([\d.]+)/.exec(output);
  if (!m) throw new Error(`no timestamp in ${JSON.stringify(output)}`);
  return boot + Number(m[1]) * 1000;
}

export async function run(): Promise<void> {
  const boot = bootEpochMs();
  // Baseline: the same first instruction, spawned directly.
  const direct: number[] = [];
  for (let i = 0; i < JOBS; i++) {
    const t0 = Date.now();
    const { stdout } = await exec("/bin/busybox", ["sh", "-c", FIRST_INSTRUCTION]);
    direct.push(workloadTimeMs(stdout, boot) - t0);
  }

  const tb = await startTestbed({ supervisors: 1 });
  try {
    await tb.pushShellImage("bench/sh:1");
    const jobs = tb.client(JobService);
    const submit = async (script: string) =>
      (await jobs.submitJob({ spec: { image: "bench/sh:1", hosts: { hostCount: 1 }, parameters: [{ name: "script", value: script }] } }))
        .job!.id;

    // Warm the cache and the layer unpacking.
    await tb.waitFinalized(await submit("true"));

    const overhead: number[] = [];
    for (let i = 0; i < JOBS; i++) {
      const id = await submit(FIRST_INSTRUCTION);
      const done = await tb.waitFinalized(id);
      if (done.exitStatus !== ExitStatus.SUCCESS) throw new Error(`job ${id} failed`);
      const started = tb.logLines
        .map((l) => JSON.parse(l) as { msg?: string; jobId?: string; time: number })
        .find((l) => l.msg === "job started" && l.jobId === id);
      if (!started) throw new Error(`no "job started" log line for ${id}`);
      overhead.push(workloadTimeMs(await tb.readLog(id, "console"), boot) - started.time);
    }
    const p50 = percentile(overhead, 50);
    const base = percentile(direct, 50);
    report("start overhead p50 (StartJob -> first instruction)", p50, "ms", { name: "direct spawn", value: base });
    report("start overhead p99", percentile(overhead, 99), "ms", { name: "direct spawn p99", value: percentile(direct, 99) });
    report("  above the baseline (goal <= 150 ms)", p50 - base, "ms");

    const n = Math.max(10, JOBS);
    const t0 = Date.now();
    const ids = [];
    for (let i = 0; i < n; i++) ids.push(await submit("true"));
    for (const id of ids) await tb.waitFinalized(id, 300000);
    const perMinute = (n / (Date.now() - t0)) * 60000;
    report(`empty jobs back to back on one host (${n})`, perMinute, "jobs/min");
  } finally {
    await tb.stop();
  }
}

