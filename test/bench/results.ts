// `npm run bench -- results`: result ingestion (issue #23, docs/results.md).
// The coordinator runs as a real child process (bin/treadmill-coordinator.js)
// on an embedded PostgreSQL; a scripted supervisor attached over a real gRPC
// stream holds a running job; this process plays the supervisor's results
// part with the supervisor's own code (supervisor/job-results.ts): it reads
// a JUnit file of 100,000 cases (~30 MB, 10% failures with a message) from
// a results directory, sends the batches over the stream and waits for
// their acknowledgements. It drives the ingestion path directly rather than
// a full job (no process driver, no log shipping): the job's end adds
// nothing to it.
//
//  (a) ingestion: from the start of the collection to the cases being
//      queryable (ListJobResults answers with the complete counts); goal
//      <= 10 s. Baselines in the same run: reading and parsing the same
//      file alone (JunitReader, no sending), and one INSERT ... unnest of
//      the same 100,000 rows straight into the table (the database's floor).
//  (b) listing one page (100) of the job's failures, p50 and p99 over
//      sequential calls (TREADMILL_BENCH_RESULTS_CALLS, default 500), and a
//      deep page (the last page of failures, by its keyset token); goal p99
//      <= 50 ms. Baseline: GetJob of the same job, p99, same run. Also the
//      first page for a client that accepts no compression (the server
//      gzips answers over 1 KiB, a page of failures is ~200 KB).
//
// Sizes: TREADMILL_BENCH_RESULTS_CASES (default 100,000).
import { createReadStream } from "node:fs";
import { chmod, mkdir, mkdtemp, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { JobState, TestOutcome } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { silentLogger } from "../../lib/logger.js";
import { JunitReader } from "../../lib/results/junit.js";
import { JobResults } from "../../supervisor/job-results.js";
import { freePort } from "../support/net.js";
import { startProcess } from "../support/process.js";
import { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { percentile, report } from "./report.js";
import { PROFILE, insertFixtures, serving, sizeFromEnv as env, startBenchDatabase, until } from "./shared/job-system.js";

const BIN = fileURLToPath(new URL("../../bin/treadmill-coordinator.js", import.meta.url));
const CASES = env("TREADMILL_BENCH_RESULTS_CASES", 100_000);
const CALLS = env("TREADMILL_BENCH_RESULTS_CALLS", 500);

/** A JUnit file of `n` cases in 100 suites, every tenth a failure with a ~1.5 KB message (a stack trace). */
async function writeReport(path: string, n: number): Promise<void> {
  const trace = Array.from({ length: 28 }, (_, i) => `    at module_${i}.function_name_${i} (src/module_${i}.py:${100 + i})`).join("\n");
  const parts: string[] = ['<?xml version="1.0" encoding="UTF-8"?>\n<testsuites name="bench">\n'];
  const perSuite = Math.ceil(n / 100);
  for (let s = 0; s < 100 && s * perSuite < n; s++) {
    parts.push(`  <testsuite name="suite_${s}" tests="${perSuite}">\n`);
    for (let i = s * perSuite; i < Math.min(n, (s + 1) * perSuite); i++) {
      const head = `    <testcase classname="tests.suite_${s}.test_module" name="test_case_${i}_checks_a_descriptive_property" time="0.0${i % 1000}"`;
      if (i % 10 === 3) {
        parts.push(`${head}>\n      <failure message="AssertionError: expected ${i} to equal ${i + 1}" type="AssertionError">Traceback (most recent call last):\n${trace}\nAssertionError: expected ${i} == ${i + 1}</failure>\n    </testcase>\n`);
      } else {
        parts.push(`${head}/>\n`);
      }
    }
    parts.push("  </testsuite>\n");
  }
  parts.push("</testsuites>\n");
  await writeFile(path, parts.join(""));
}

/** Reads and parses the file alone, the way the supervisor does; returns [ms, cases]. */
async function parseAlone(path: string): Promise<[number, number]> {
  const started = performance.now();
  let cases = 0;
  const reader = new JunitReader(() => cases++);
  for await (const chunk of createReadStream(path, { encoding: "utf8", highWaterMark: 256 * 1024 })) reader.write(chunk as string);
  reader.end();
  return [performance.now() - started, cases];
}

export async function run(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-bench-results-"));
  await chmod(dir, 0o755); // the server's OS user must reach its directory
  const { pg, sql } = await startBenchDatabase(dir);
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const args = ["--port", String(port), "--database-url", pg.url, "--log-level", "warn", "--health-sweep-interval-ms", "3600000"];
  // TREADMILL_BENCH_PROFILE=<dir>: a CPU profile of the coordinator there (node's flags go before the script).
  const child = PROFILE ? startProcess("--cpu-prof", [`--cpu-prof-dir=${PROFILE}`, BIN, ...args]) : startProcess(BIN, args);
  let supervisor: ScriptedSupervisor | undefined;
  try {
    await serving(url);
    const resultsDir = join(dir, "results");
    await mkdir(resultsDir);
    const file = join(resultsDir, "report.xml");
    await writeReport(file, CASES);
    const { size } = await stat(file);
    process.stdout.write(`sizes: ${CASES} cases, a JUnit file of ${(size / 1e6).toFixed(1)} MB, ${CALLS} listing calls\n`);

    const { token, hosts } = await insertFixtures(sql, [{ name: "bench-results", tags: { pool: "results" } }]);
    const jobs = createClient(JobService, createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => token)] }));
    const results = new JobResults({
      logger: silentLogger(),
      send: (payload) => supervisor!.send(payload),
      changed: () => undefined,
      limits: { maxCases: 250_000, maxBytes: 256 << 20, collectMs: 60_000 },
    });
    supervisor = new ScriptedSupervisor({
      urls: [url],
      credential: hosts[0]!.credential,
      mode: "manual",
      noHistory: true,
      onResponse: (m) => {
        if (m.payload.case === "ackReport") results.acknowledged(m.payload.value.reportId);
      },
    });
    await supervisor.connect();
    const { job } = await jobs.submitJob({ spec: { image: "bench:v1", hosts: { tags: { pool: "results" } }, tags: { suite: "bench" } } });
    const jobId = job!.id;
    await until(async () => (await jobs.getJob({ jobId })).job!.state === JobState.ASSIGNED, "the job's assignment");
    await supervisor.report(jobId, 1, JobState.RUNNING);

    // Baselines of (a).
    const [parseMs, parsed] = await parseAlone(file);
    if (parsed !== CASES) throw new Error(`the file parsed to ${parsed} cases, not ${CASES}`);
    report("baseline: read and parse the file alone", parseMs, "ms");
    const rows = Array.from({ length: CASES }, (_, i) => i);
    const insertStarted = performance.now();
    await sql`
      insert into job_result_cases (job_id, attempt, idx, suite, name, outcome, duration_us, message)
      select ${jobId}, 99, i, 'tests.suite_' || (i / 1000) || '.test_module', 'test_case_' || i || '_checks_a_descriptive_property',
        case when i % 10 = 3 then 2 else 1 end, 1000, case when i % 10 = 3 then repeat('x', 1500) else '' end
      from unnest(${rows}::int[]) as u(i)`;
    const insertMs = performance.now() - insertStarted;
    await sql`delete from job_result_cases where job_id = ${jobId} and attempt = 99`;
    report("baseline: one INSERT ... unnest of the same rows", insertMs, "ms");

    // (a) Ingestion through the supervisor's collection and the stream.
    const attempt = results.open(jobId, 1, { console: false });
    const started = performance.now();
    await attempt.collect(resultsDir);
    const sentMs = performance.now() - started;
    await attempt.settled();
    if (attempt.pending() > 0) {
      throw new Error(`${attempt.pending()} reports were not acknowledged (stream: ${supervisor.lastError?.message ?? "open"}; coordinator: ${child.lines.slice(-5).join(" | ")})`);
    }
    const ackedMs = performance.now() - started;
    await until(async () => {
      const page = await jobs.listJobResults({ jobId, outcomes: [TestOutcome.FAIL], pageSize: 100 });
      return page.counts?.complete === true && page.counts.total === BigInt(CASES) && page.cases.length === 100;
    }, "the cases to be queryable", 120_000, 5);
    const queryableMs = performance.now() - started;
    if (attempt.pending() > 0) throw new Error(`${attempt.pending()} reports were not acknowledged`);
    report("(a) parsed and sent (collection start -> last batch sent)", sentMs, "ms", { name: "parse alone", value: parseMs });
    report("(a) acknowledged (-> last AckReport)", ackedMs, "ms", { name: "parse alone", value: parseMs });
    report("(a) stored and queryable (goal <= 10,000 ms)", queryableMs, "ms", { name: "parse alone", value: parseMs });
    report("(a) stored and queryable, against the bare INSERT", queryableMs, "ms", { name: "INSERT ... unnest", value: insertMs });
    report("(a) ingestion rate", CASES / (queryableMs / 1000), "cases/s");

    // (b) Listing a page of failures, beside GetJob.
    const timed = async (call: () => Promise<unknown>) => {
      const samples: number[] = [];
      for (let i = 0; i < CALLS; i++) {
        const t = performance.now();
        await call();
        samples.push(performance.now() - t);
      }
      return samples;
    };
    // Warm both paths (connections, plans) before measuring.
    for (let i = 0; i < 20; i++) {
      await jobs.getJob({ jobId });
      await jobs.listJobResults({ jobId, outcomes: [TestOutcome.FAIL] });
    }
    const getJob = await timed(() => jobs.getJob({ jobId }));
    const firstPage = await timed(() => jobs.listJobResults({ jobId, outcomes: [TestOutcome.FAIL] }));
    // The token of the last page of failures (walked once, untimed).
    let token2 = "";
    let last = "";
    do {
      last = token2;
      token2 = (await jobs.listJobResults({ jobId, outcomes: [TestOutcome.FAIL], pageSize: 1000, pageToken: token2 })).nextPageToken;
    } while (token2 !== "");
    const deepPage = await timed(() => jobs.listJobResults({ jobId, outcomes: [TestOutcome.FAIL], pageSize: 1000, pageToken: last }));
    // The same page without response compression (the server gzips answers over 1 KiB for clients that accept it).
    const plain = createClient(JobService, createGrpcTransport({ baseUrl: url, acceptCompression: [], interceptors: [bearerInterceptor(() => token)] }));
    const plainPage = await timed(() => plain.listJobResults({ jobId, outcomes: [TestOutcome.FAIL] }));
    const getJob99 = percentile(getJob, 99);
    report("baseline: GetJob p50", percentile(getJob, 50), "ms");
    report("(b) a page of 100 failures p50", percentile(firstPage, 50), "ms", { name: "GetJob p50", value: percentile(getJob, 50) });
    report("(b) a page of 100 failures p99 (goal <= 50 ms)", percentile(firstPage, 99), "ms", { name: "GetJob p99", value: getJob99 });
    report("(b) a page of 100 failures, uncompressed, p99", percentile(plainPage, 99), "ms", { name: "GetJob p99", value: getJob99 });
    report("(b) the last page of 1,000 failures p99", percentile(deepPage, 99), "ms", { name: "GetJob p99", value: getJob99 });
  } finally {
    await supervisor?.close();
    child.child.kill("SIGTERM");
    await child.exited;
    await sql.end();
    await pg.stop();
    await rm(dir, { recursive: true, force: true });
  }
}
