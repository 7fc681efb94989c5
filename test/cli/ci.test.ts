/**
 * `tml job run` inside a CI pipeline (cli/ci.ts, docs/ci.md) against the
 * all-in-one testbed: its exit codes, --junit and --artifacts for a failed
 * job and per job of a matrix, the GitHub step summary and GitLab sections,
 * and what SIGINT and SIGTERM do without a terminal (cancel and wait for
 * the end, or detach). Signals go to the real bin (spawnTml), as a CI
 * runner sends them.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { readFile, readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { PassThrough } from "node:stream";
import { createClient } from "@connectrpc/connect";
import { FinalizeReason, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { interactive } from "../../cli/ci.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";
import { spawnTml, startTml, tml } from "./harness.js";

let tb: RunningTestbed;
let config: string;
let n = 0;
const dir = (name: string) => join(tb.dir, `${name}-${++n}`);

/** A job script that reports two cases (one failing), writes an artifact and exits `code`. */
const reporting = (code: number) =>
  [
    `cat > "$TREADMILL_RESULTS_DIR/unit.xml" <<'XML'`,
    `<testsuite name="unit"><testcase name="adds"/><testcase name="divides"><failure message="division by zero"/></testcase></testsuite>`,
    `XML`,
    `mkdir -p "$TREADMILL_ARTIFACTS_DIR/logs"; echo "serial says hi" > "$TREADMILL_ARTIFACTS_DIR/logs/serial.txt"`,
    `exit ${code}`,
  ].join("\n");

const jobIdOf = (stderr: string) => /--> job (\S+) submitted/.exec(stderr)![1];

beforeAll(async () => {
  tb = await startTestbed({ supervisors: 1 });
  config = join(tb.dir, "tml.json");
  const login = await tml(config, ["login", tb.coordinatorUrl, "--user", "admin", "--password-stdin"], { input: `${tb.testbed.admin().password}\n` });
  if (login.code !== 0) throw new Error(`login failed: ${login.stderr}`);
  await tb.pushShellImage("ci/sh:1");
}, 180_000);

afterAll(async () => {
  await tb?.stop();
}, 60_000);

describe("tml job run in a pipeline", () => {
  it("writes a failed job's results as JUnit and downloads its artifacts, appends the GitHub summary, and exits 1", async () => {
    const out = dir("failed");
    const summary = join(tb.dir, "step-summary.md");
    await writeFile(summary, "earlier step\n");
    const run = await tml(
      config,
      ["job", "run", "ci/sh:1", "--tag", "driver=process", "--param", `script=${reporting(1)}`, "--junit", join(out, "report.xml"), "--artifacts", join(out, "artifacts")],
      { env: { GITHUB_STEP_SUMMARY: summary } },
    );
    expect(run.code).toBe(1);
    const id = jobIdOf(run.stderr);
    const xml = await readFile(join(out, "report.xml"), "utf8");
    expect(xml).toMatch(/<testcase [^>]*name="adds"/);
    expect(xml).toMatch(/<testcase [^>]*name="divides">\s*<failure>division by zero<\/failure>/);
    expect(await readFile(join(out, "artifacts", "logs", "serial.txt"), "utf8")).toBe("serial says hi\n");
    const md = await readFile(summary, "utf8");
    expect(md.startsWith("earlier step\n### Treadmill job failed (exit code 1)\n")).toBe(true);
    expect(md).toContain(`| Job | [\`${id}\`](${tb.coordinatorUrl}/jobs/${id}) |`);
    expect(md).toContain("| Image | `ci/sh:1` |");
    expect(md).toContain("| State | finalized |");
    expect(md).toMatch(/\| Duration \| \d+\.\d s \|/);
    expect(md).toContain("| Tests | 2 cases: 1 passed, 1 failed |");
    expect(md).toContain(`| Artifacts | 1 file (15 B) in ${join(out, "artifacts")} |`);
    expect(md).toContain("**Failing cases**:\n\n- `unit / divides`: division by zero\n");
  }, 120_000);

  it("exits 0 for a job that succeeded, 2 for a usage mistake and 3 when Treadmill cannot be reached", async () => {
    const ok = await tml(config, ["job", "run", "ci/sh:1", "--param", "script=true", "--junit", join(dir("ok"), "report.xml")]);
    expect(ok.code).toBe(0);
    const usage = await tml(config, ["job", "run", "ci/sh:1", "--detach", "--junit", "report.xml"]);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toContain("--junit and --artifacts need the job followed to its end, not --detach");
    const badWait = await tml(config, ["job", "run", "ci/sh:1", "--cancel-wait", "soon"]);
    expect(badWait.code).toBe(2);
    const down = await spawnTml(config, ["job", "run", "ci/sh:1"], { env: { TML_SERVER: "http://127.0.0.1:1", TML_TOKEN: "t" } }).result;
    expect(down.stderr).toContain("Cannot reach the server");
    expect(down.code).toBe(3);
  }, 120_000);

  it("on SIGTERM cancels the job, waits for its end, still writes its results, and exits 143", async () => {
    const out = dir("term");
    const run = spawnTml(config, ["job", "run", "ci/sh:1", "--param", "script=echo started; sleep 120", "--junit", join(out, "report.xml")]);
    await run.waitForLine(/^started\r?$/);
    run.child.kill("SIGTERM");
    const result = await run.result;
    expect(result.stderr).toMatch(/--> canceling job \S+ \(SIGTERM\); waiting up to 30s for it to end/);
    expect(result.stderr).toMatch(/--> job \S+ canceled/);
    expect(result.code).toBe(143);
    const job = await tb.waitFinalized(jobIdOf(result.stderr));
    expect(job.finalizeReason).toBe(FinalizeReason.CANCELED);
    expect(job.timeline.map((e) => e.message)).toContainEqual(expect.stringContaining("canceled from tml (SIGTERM)"));
    // No results: still a JUnit file, for the CI's report step.
    expect(await readFile(join(out, "report.xml"), "utf8")).toContain("<testsuites");
  }, 120_000);

  it("stops waiting after --cancel-wait when the canceled job is slow to end, says so, and exits 143", async () => {
    // The workload ignores the polite stop: the supervisor kills it after its stop grace (10 s).
    const run = spawnTml(config, ["job", "run", "ci/sh:1", "--param", `script=trap "" HUP INT TERM; echo started; sleep 120`, "--cancel-wait", "1s"]);
    await run.waitForLine(/^started\r?$/);
    run.child.kill("SIGTERM");
    const result = await run.result;
    const id = jobIdOf(result.stderr);
    expect(result.stderr).toContain(`--> canceling job ${id} (SIGTERM); waiting up to 1s for it to end`);
    expect(result.stderr).toContain(`tml: job ${id} did not end within 1s of its cancel; it ends on its own: \`tml job get ${id}\` shows it.`);
    expect(result.code).toBe(143);
    expect((await tb.waitFinalized(id, 60_000)).finalizeReason).toBe(FinalizeReason.CANCELED);
  }, 120_000);

  it("with --detach-on-signal leaves the job running on SIGINT, says how to follow it, and exits 130", async () => {
    const run = spawnTml(config, ["job", "run", "ci/sh:1", "--param", "script=echo started; sleep 120", "--detach-on-signal"]);
    await run.waitForLine(/^started\r?$/);
    run.child.kill("SIGINT");
    const result = await run.result;
    const id = jobIdOf(result.stderr);
    expect(result.stderr).toContain(`Detached; job ${id} goes on. Follow it with \`tml job logs --follow ${id}\``);
    expect(result.code).toBe(130);
    const jobs = createClient(JobService, tb.admin);
    expect((await jobs.getJob({ jobId: id })).job!.state).toBe(JobState.RUNNING);
    await jobs.cancelJob({ jobId: id });
    await tb.waitFinalized(id);
  }, 120_000);

  it("never prompts without a terminal: Ctrl-C cancels at once, and so it does under CI=true on a terminal", async () => {
    const run = startTml(config, ["job", "run", "ci/sh:1", "--param", "script=echo started; sleep 120"]);
    await run.waitForLine(/^started\r?$/);
    run.interrupt("SIGINT");
    const result = await run.result;
    expect(result.stderr).not.toContain("Cancel it [c]");
    expect(result.stderr).toMatch(/--> canceling job \S+ \(SIGINT\)/);
    expect(result.code).toBe(130);
    const terminal = Object.assign(new PassThrough(), { isTTY: true, setRawMode: () => undefined });
    expect(interactive({ stdin: terminal, stdout: terminal, stderr: terminal, env: {} })).toBe(true);
    expect(interactive({ stdin: terminal, stdout: terminal, stderr: terminal, env: { CI: "true" } })).toBe(false);
    expect(interactive({ stdin: new PassThrough(), stdout: terminal, stderr: terminal, env: {} })).toBe(false);
  }, 120_000);

  it("under GitLab CI prints the log and the summary in collapsible sections", async () => {
    const run = await tml(config, ["job", "run", "ci/sh:1", "--param", `script=echo hello from the job; ${reporting(0)}`], { env: { GITLAB_CI: "true" } });
    expect(run.code).toBe(0);
    // GitLab's markers: ESC[0K section_start:UNIX_TIME:NAME CR ESC[0K header.
    const starts = [...run.stdout.matchAll(new RegExp(String.raw`\u001b\[0Ksection_start:(\d+):(treadmill_\d+)\r\u001b\[0K([^\n]*)\n`, "g"))];
    const ends = [...run.stdout.matchAll(new RegExp(String.raw`\u001b\[0Ksection_end:(\d+):(treadmill_\d+)\r\u001b\[0K\n`, "g"))];
    expect(starts.map((m) => m[2])).toEqual(["treadmill_1", "treadmill_2"]);
    expect(ends.map((m) => m[2])).toEqual(["treadmill_1", "treadmill_2"]);
    const id = jobIdOf(run.stderr);
    expect(starts.map((m) => m[3])).toEqual([`Treadmill job ${id}: log`, `Treadmill job ${id}: succeeded (exit code 0)`]);
    const log = run.stdout.slice(starts[0].index, ends[0].index);
    expect(log).toContain("hello from the job");
    const summary = run.stdout.slice(starts[1].index, ends[1].index);
    expect(summary).toContain(`Job:       ${id} (${tb.coordinatorUrl}/jobs/${id})`);
    expect(summary).toContain("Tests:     2 cases: 1 passed, 1 failed");
    expect(summary).toContain("Artifacts: 1 file (15 B)");
    expect(summary).toContain("Failing cases:\n  unit / divides: division by zero\n");
    // With -o json stdout is the job's record alone.
    const data = await tml(config, ["job", "run", "ci/sh:1", "--param", "script=true", "-o", "json"], { env: { GITLAB_CI: "true" } });
    expect(data.code).toBe(0);
    expect(JSON.parse(data.stdout)).toMatchObject({ state: "JOB_STATE_FINALIZED", exitStatus: "EXIT_STATUS_SUCCESS" });
  }, 120_000);

  it("writes one JUnit file and one artifacts directory per job of a matrix, named after its values", async () => {
    const out = dir("matrix");
    const file = join(tb.dir, "matrix.yaml");
    await writeFile(
      file,
      [
        "image: ci/sh:1",
        "matrix:",
        "  suite: [smoke, full]",
        "parameters:",
        "  script: |",
        ...reporting(0)
          .replaceAll("unit", "${suite}")
          .split("\n")
          .map((l) => `    ${l}`),
      ].join("\n") + "\n",
    );
    const run = await tml(config, ["job", "run", "-f", file, "--junit", join(out, "report.xml"), "--artifacts", join(out, "artifacts")]);
    expect(run.code).toBe(0);
    expect((await readdir(out)).sort()).toEqual(["artifacts", "report.suite=full.xml", "report.suite=smoke.xml"]);
    expect(await readFile(join(out, "report.suite=full.xml"), "utf8")).toContain('name="full"');
    expect((await readdir(join(out, "artifacts"))).sort()).toEqual(["suite=full", "suite=smoke"]);
    expect(await readFile(join(out, "artifacts", "suite=smoke", "logs", "serial.txt"), "utf8")).toBe("serial says hi\n");
  }, 120_000);

  it("on SIGTERM cancels every job of a matrix, still writes a JUnit file for each, and exits 143", async () => {
    const out = dir("matrix-term");
    const file = join(tb.dir, "matrix-hang.yaml");
    await writeFile(file, ["image: ci/sh:1", "matrix:", "  suite: [smoke, full]", "parameters:", "  script: echo started ${suite}; sleep 120", ""].join("\n"));
    const run = spawnTml(config, ["job", "run", "-f", file, "--junit", join(out, "report.xml")]);
    // One host: the first job runs, the other waits in the queue.
    await run.waitForLine(/^--> suite=\S+\s+\S+\s+running$/);
    run.child.kill("SIGTERM");
    const result = await run.result;
    expect(result.stderr).toContain("--> canceling 2 jobs (SIGTERM); waiting up to 30s for them to end");
    expect(result.code).toBe(143);
    const ids = [...result.stderr.matchAll(/^--> suite=\S+\s+(\S+)\s+submitted$/gm)].map((m) => m[1]);
    expect(ids).toHaveLength(2);
    for (const id of ids) expect((await tb.waitFinalized(id)).finalizeReason).toBe(FinalizeReason.CANCELED);
    expect((await readdir(out)).sort()).toEqual(["report.suite=full.xml", "report.suite=smoke.xml"]);
  }, 120_000);
});
