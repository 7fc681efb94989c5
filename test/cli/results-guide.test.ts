/**
 * docs/results.md as it is written, against a coordinator with an image
 * store, a log server and a process supervisor: a job prints TAP on its
 * console and writes two JUnit files (a failure, a skip), its counts and
 * cases come back, filtered and exported as JUnit that reads back the same;
 * a series of three labelled jobs shows a new failure, then its fix. Then
 * what cannot be read (malformed XML, TAP garbage, a file over the cap) is
 * said on the job's timeline while the job and its supervisor carry on.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { mkdir, readFile, symlink } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { JobEventKind, JobState, TestOutcome } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { parseJunit } from "../../lib/results/junit.js";
import { parsedCase } from "../../lib/results/wire.js";
import { docBlock, docBlocks, runBash, type DocBlock } from "../support/doc-blocks.js";
import { waitUntil } from "../support/wait.js";
import { busyboxRootfs, startWorld, tml, type CliWorld } from "./harness.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GUIDE = join(REPO, "docs", "results.md");

let world: CliWorld;
let blocks: DocBlock[];
let work: string;
let config: string;
let bins: string;
const flakyHosts = new Map<string, Awaited<ReturnType<CliWorld["startSupervisor"]>>>();

/** Runs the named blocks of the guide one after the other in one shell (later blocks use the variables of earlier ones). */
function guide(...names: string[]) {
  const env = { ...process.env, PATH: `${bins}:${process.env.PATH}`, TML_CONFIG: config, NO_COLOR: "1" };
  const script = names.map((n) => docBlock(blocks, GUIDE, "results", n).text).join("\n");
  return runBash(`set -eo pipefail\n${script}`, { cwd: work, env });
}

let client: ReturnType<typeof createClient<typeof JobService>> | undefined;
/** JobService as the admin, over one connection. */
const jobs = () => (client ??= createClient(JobService, createGrpcTransport({ baseUrl: world.url, interceptors: [bearerInterceptor(() => world.adminToken)] })));

/** The id of the newest job with label commit=`commit`. */
async function jobOf(commit: string): Promise<string> {
  const { jobs: found } = await jobs().listJobs({ filter: { tags: { commit } }, pageSize: 1 });
  return found[0]!.id;
}

beforeAll(async () => {
  blocks = await docBlocks(GUIDE);
  world = await startWorld();
  await world.startStores();
  await world.startSupervisor("runner-1", { pool: "tests" });
  // A host with a small results cap, for the file over it.
  await world.startSupervisor("runner-small", { pool: "small" }, { resultsMaxBytes: 4096 });
  // Two hosts for the flaky job: the first attempt's host goes away, the second attempt runs on the other.
  for (const name of ["runner-f1", "runner-f2"]) flakyHosts.set(name, await world.startSupervisor(name, { pool: "flaky" }));
  config = await world.adminConfig("results");
  bins = join(world.dir, "bin");
  await mkdir(bins);
  await symlink(join(REPO, "bin", "tml.js"), join(bins, "tml"));
  work = join(world.dir, "work");
  await busyboxRootfs(join(work, "tests-rootfs"), ["sh", "cat", "echo"]);
}, 180_000);

afterAll(async () => {
  await world?.stop();
}, 60_000);

describe("docs/results.md's command blocks", () => {
  it("push the test image", async () => {
    const pushed = await guide("image");
    expect(pushed.code).toBe(0);
    expect(pushed.stdout).toMatch(/example\/tests:v1/);
  }, 60_000);

  it("run a job whose TAP and two JUnit files come back as its cases and counts; filter them; export JUnit that reads back the same", async () => {
    const result = await guide("run", "filter");
    expect(result.code).toBe(0);
    const jobId = await jobOf("1a2b3c");
    const tables = result.stdout.split(/^(?=SUITE)/m);
    expect(tables[0]).toBe(`Job ${jobId} succeeded (exit code 0).\n`);
    expect(tables[1]!.split("\n").filter((l) => l !== "")).toEqual([
      "SUITE   NAME             OUTCOME  TIME   MESSAGE",
      "-       boots            pass     -      -",
      "-       serial echo      skip     -      SKIP no loopback plug",
      "net     dhcp             fail     1.50s  no lease within 1 s",
      "net     ipv6             skip     -      no ipv6 in the lab",
      "parser  parses numbers   pass     4ms    -",
      "parser  rejects garbage  pass     2ms    -",
      "Attempt 1: 6 cases: 3 passed, 1 failed, 2 skipped.",
    ]);
    expect(tables[2]!.split("\n").filter((l) => l !== "")).toEqual([
      "SUITE  NAME  OUTCOME  TIME   MESSAGE",
      "net    dhcp  fail     1.50s  no lease within 1 s",
      "Attempt 1: 6 cases: 3 passed, 1 failed, 2 skipped (1 shown).",
    ]);
    expect(tables[3]!.split("\n").filter((l) => l !== "")).toEqual([
      "SUITE   NAME             OUTCOME  TIME  MESSAGE",
      "parser  rejects garbage  pass     2ms   -",
      "Attempt 1: 6 cases: 3 passed, 1 failed, 2 skipped (1 shown).",
    ]);
    expect(result.stderr).toContain(`Wrote 6 cases of job ${jobId} to results.xml.`);

    const job = (await jobs().getJob({ jobId })).job!;
    expect(job.results).toMatchObject({ attempt: 1, total: 6n, passed: 3n, failed: 1n, skipped: 2n, errored: 0n, complete: true });
    // The console's cases point into the console log; JUnit's do not.
    const listed = await jobs().listJobResults({ jobId });
    expect(listed.cases[0]!.log).toMatchObject({ channel: "console" });
    expect(listed.cases[0]!.log!.endOffset).toBeGreaterThan(listed.cases[0]!.log!.startOffset);
    expect(listed.cases[2]!.log).toBeUndefined();
    const exported = parseJunit(await readFile(join(work, "results.xml"), "utf8"));
    expect(exported).toEqual(listed.cases.map(parsedCase));

    const list = await tml(config, ["job", "list", "--label", "commit=1a2b3c"]);
    expect(list.stdout).toMatch(/\s3\/6 passed\s/);
  }, 90_000);

  it("compare a series of three jobs: the second's new failure, the third's fix", async () => {
    const result = await guide("series");
    expect(result.code).toBe(0);
    const [first, broken, fixed] = [await jobOf("1a2b3c"), await jobOf("4d5e6f"), await jobOf("7a8b9c")];
    const [waited, regression, waitedAgain, fix] = result.stdout.split(/^(?=Compared with|Job )/m);
    expect(waited).toBe(`Job ${broken} succeeded (exit code 0).\n`);
    expect(waitedAgain).toBe(`Job ${fixed} succeeded (exit code 0).\n`);
    expect(regression!.trim().split("\n")).toEqual([
      `Compared with job ${first} (attempt 1), the previous of the series board=x86,suite=smoke:`,
      "",
      "Newly failing: 1",
      "  parser / rejects garbage  (pass -> fail): expected an error",
      "",
      "Newly passing: 0",
      "",
      "Still failing: 1",
      "  net / dhcp  (fail -> fail): no lease within 1 s",
    ]);
    expect(fix!.trim().split("\n")).toEqual([
      `Compared with job ${broken} (attempt 1), the previous of the series board=x86,suite=smoke:`,
      "",
      "Newly failing: 0",
      "",
      "Newly passing: 1",
      "  parser / rejects garbage  (fail -> pass)",
      "",
      "Still failing: 1",
      "  net / dhcp  (fail -> fail): no lease within 1 s",
    ]);
  }, 90_000);
});

describe("results that cannot be read", () => {
  it("puts malformed JUnit, TAP garbage and a file over the cap on the job's timeline; the job succeeds and its supervisor takes the next job", async () => {
    const script = [
      "echo 'TAP version 13'",
      "echo '1..3'",
      "echo 'ok 1 - first'",
      "echo 'ok 7 - seventh'",
      "printf 'garbage \\001\\002 not tap\\n'",
      "printf '<testsuite name=\"s\"><testcase name=\"kept\"/><testcase name=\"x\"></testsuite>' > $TREADMILL_RESULTS_DIR/broken.xml",
      "i=0; while [ $i -lt 100 ]; do echo '<!-- padding padding padding padding padding padding -->'; i=$((i+1)); done > $TREADMILL_RESULTS_DIR/zz-huge.xml",
    ].join("; ");
    const bad = await tml(config, ["image", "push", join(work, "tests-rootfs"), "--name", "example/bad:v1", "--entrypoint", JSON.stringify(["/bin/sh", "-c", script])]);
    expect(bad.code).toBe(0);
    const job = await tml(config, ["job", "run", "example/bad:v1", "--tag", "pool=small", "--detach"]);
    const jobId = job.stdout.trim();
    await waitUntil(async () => (await jobs().getJob({ jobId })).job!.state === JobState.FINALIZED, "the bad job's end", 60_000);
    const ended = (await jobs().getJob({ jobId })).job!;
    expect(ended.exitCode).toBe(0);
    const events = ended.timeline.filter((e) => e.kind === JobEventKind.RESULTS).map((e) => e.message);
    expect(events).toEqual([
      "results: console line 4: test number 7 is out of sequence (expected 2)",
      "results: console line 5: the plan said 3 tests, 2 ran",
      "results: broken.xml: line 1, column 63: </testsuite> closes <testcase> (the 1 case before it are kept)",
      expect.stringMatching(/^results: zz-huge\.xml: 5\.\d KiB, over the results size cap \(4 KiB per job\): not read$/),
      "results: 3 test cases: 3 passed, 0 failed, 0 skipped, 0 errored",
    ]);
    const cases = await jobs().listJobResults({ jobId });
    expect(cases.cases.map((c) => [c.name, c.outcome])).toEqual([
      ["first", TestOutcome.PASS],
      ["seventh", TestOutcome.PASS],
      ["kept", TestOutcome.PASS],
    ]);
    // The host takes the next job as usual.
    const next = await tml(config, ["job", "run", "example/tests:v1", "--tag", "pool=small", "--quiet"]);
    expect(next.code).toBe(0);
  }, 120_000);
});

describe("a canceled job's results", () => {
  it("are collected when the job is stopped: its console's cases and the JUnit file it wrote before the cancel", async () => {
    const script = [
      "echo 'TAP version 13'",
      "printf '<testsuite name=\"c\"><testcase name=\"written before the cancel\"/></testsuite>' > $TREADMILL_RESULTS_DIR/c.xml",
      "echo 'ok 1 - file written'",
      "sleep 120",
    ].join("; ");
    const pushed = await tml(config, ["image", "push", join(work, "tests-rootfs"), "--name", "example/slow:v1", "--entrypoint", JSON.stringify(["/bin/sh", "-c", script])]);
    expect(pushed.code).toBe(0);
    const run = await tml(config, ["job", "run", "example/slow:v1", "--tag", "pool=tests", "--detach"]);
    const jobId = run.stdout.trim();
    // The console's case arrives while the job runs: the file is written by then.
    await waitUntil(async () => (await jobs().listJobResults({ jobId })).cases.length === 1, "the console's case", 60_000);
    await jobs().cancelJob({ jobId });
    await waitUntil(async () => (await jobs().getJob({ jobId })).job!.state === JobState.FINALIZED, "the canceled job's end", 60_000);
    const ended = (await jobs().getJob({ jobId })).job!;
    expect(ended.results).toMatchObject({ total: 2n, passed: 2n, complete: true });
    const { cases } = await jobs().listJobResults({ jobId });
    expect(cases.map((c) => c.name)).toEqual(["file written", "written before the cancel"]);
  }, 120_000);
});

describe("a flaky case", () => {
  it("is marked when it failed on an attempt its host's end cut short and passed on the restarted attempt", async () => {
    // The first attempt fails the case and hangs; the second passes it (TREADMILL_ATTEMPT tells them apart).
    const script = [
      "echo 'TAP version 13'",
      'if [ "$TREADMILL_ATTEMPT" = 1 ]; then echo "not ok 1 - dhcp"; sleep 120; fi',
      "echo 'ok 1 - dhcp'",
    ].join("; ");
    const pushed = await tml(config, ["image", "push", join(work, "tests-rootfs"), "--name", "example/flaky:v1", "--entrypoint", JSON.stringify(["/bin/sh", "-c", script])]);
    expect(pushed.code).toBe(0);
    const run = await tml(config, ["job", "run", "example/flaky:v1", "--tag", "pool=flaky", "--restarts", "1", "--detach"]);
    const jobId = run.stdout.trim();
    await waitUntil(async () => (await jobs().listJobResults({ jobId })).cases.length === 1, "the first attempt's failing case", 60_000);
    // Its supervisor stops: the attempt ends INTERNAL_ERROR (the infrastructure's), and the restart policy runs it again.
    const first = (await jobs().getJob({ jobId })).job!;
    const host = [...flakyHosts.values()].find((h) => h.hostId === first.hostIds[0])!;
    await host.supervisor.stop();
    await waitUntil(async () => (await jobs().getJob({ jobId })).job!.state === JobState.FINALIZED, "the second attempt's end", 90_000);
    const ended = (await jobs().getJob({ jobId })).job!;
    expect(ended).toMatchObject({ attempt: 2, exitCode: 0, flaky: true });
    expect(ended.hostIds).not.toEqual(first.hostIds);
    const latest = await jobs().listJobResults({ jobId });
    expect(latest.cases.map((c) => [c.attempt, c.name, c.outcome, c.flaky])).toEqual([[2, "dhcp", TestOutcome.PASS, true]]);
    const earlier = await jobs().listJobResults({ jobId, attempt: 1 });
    expect(earlier.cases.map((c) => [c.name, c.outcome])).toEqual([["dhcp", TestOutcome.FAIL]]);
    const shown = await tml(config, ["job", "results", jobId]);
    expect(shown.stdout).toContain("dhcp (flaky)");
  }, 150_000);
});
