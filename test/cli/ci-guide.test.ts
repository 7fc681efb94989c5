/**
 * docs/ci.md as it is written: the `run:` steps of its GitHub Actions
 * workflows and the `before_script`/`script`/`after_script` lines of its
 * GitLab CI jobs, read from the doc's YAML, run in order as the runners run
 * them (GitHub: each step in `bash -eo pipefail`, `${{ secrets.* }}` and
 * `${{ vars.* }}` filled in, `$GITHUB_ENV` carried to later steps,
 * `if: always()` steps after a failure or a cancel, GITHUB_STEP_SUMMARY a
 * file; GitLab: before_script and script in one shell, after_script in
 * another, GITLAB_CI=true) against the all-in-one testbed. `uses:` steps do
 * not run here: the files they name are checked instead. A cancelled
 * pipeline is a SIGTERM to the running step's process group, as a runner
 * sends it; its job must end canceled, and a leased board come back.
 *
 * `TML_PACKAGE` is a stand-in package whose `tml` runs this tree's
 * bin/tml.js, installed by the doc's own `npm install --global` step into
 * a prefix of the test's: packing the real one takes minutes, and
 * test/interop/package.test.ts installs and runs that one.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readFile, readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { parse } from "yaml";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { FinalizeReason, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LeaseEndReason, LeaseService } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { pushImage } from "../../lib/image/push.js";
import { buildBusyboxImage } from "../../testbed/images.js";
import { docBlock, docBlocks, type DocBlock } from "../support/doc-blocks.js";
import { watchLines } from "../support/process.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GUIDE = join(REPO, "docs", "ci.md");

let tb: RunningTestbed;
let blocks: DocBlock[];
let token: string;
let packageFile: string;
let runs = 0;

/** The tests' image: run-tests reports two passing cases of $SUITE and an artifact, or (`hang`) starts and hangs. */
async function pushTestsImage(hang: boolean) {
  const script = hang
    ? `echo started\nsleep 120\n`
    : [
        `suite=\${TREADMILL_PARAM_SUITE:-smoke}`,
        `echo "running the $suite tests"`,
        `cat > "$TREADMILL_RESULTS_DIR/$suite.xml" <<XML`,
        `<testsuite name="$suite"><testcase name="boots"/><testcase name="blinks"/></testsuite>`,
        `XML`,
        `echo "uart: $suite ok" > "$TREADMILL_ARTIFACTS_DIR/uart.log"`,
        ``,
      ].join("\n");
  const image = await buildBusyboxImage({
    dir: join(tb.dir, "images"),
    title: `ci/tests ${hang ? "hanging" : "passing"}`,
    entrypoint: ["/bin/sh", "/bin/run-tests"],
    files: { "bin/run-tests": { content: script, mode: 0o755 } },
  });
  // The cancel tests move the tag to the hanging one: the doc's commands stay the same.
  await pushImage(
    tb.admin,
    {
      manifestDigest: image.manifestDigest,
      manifestJson: image.manifestJson,
      blobs: image.layers.map((l) => ({ digest: l.digest, size: l.size, path: l.path })),
      mediaTypes: image.layers.map((l) => l.mediaType),
    },
    { name: "ci/tests", tag: "latest", replace: true },
  );
}

/** A step's shell, as a process group of its own; `cancelOn` sends the group SIGTERM once a line matches. */
function step(script: string, cwd: string, env: NodeJS.ProcessEnv, cancelOn?: RegExp) {
  const child = spawn("bash", ["--noprofile", "--norc", "-eo", "pipefail", "-c", script], { cwd, env, stdio: ["ignore", "pipe", "pipe"], detached: true });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
  // "close": every process holding the step's output ended (tml outlives a killed shell).
  const result = new Promise<{ code: number | string; stdout: string; stderr: string }>((resolve) =>
    child.once("close", (code, signal) => resolve({ code: code ?? signal ?? "unknown", stdout, stderr })),
  );
  const watcher = watchLines(child, result);
  if (cancelOn) void watcher.waitForLine(cancelOn, 120_000).then(() => process.kill(-child.pid!, "SIGTERM"), () => undefined);
  return result;
}

/** What every CI job's shell gets: the test's npm prefix first on PATH, no saved tml context. */
function baseEnv(work: string): NodeJS.ProcessEnv {
  const prefix = join(work, "npm-prefix");
  return {
    PATH: `${join(prefix, "bin")}:${process.env.PATH}`,
    HOME: work,
    npm_config_prefix: prefix,
    npm_config_cache: join(work, "npm-cache"),
    npm_config_update_notifier: "false",
    npm_config_offline: "true",
    TML_CONFIG: join(work, "no-such-tml.json"),
    CI: "true",
  };
}

interface GithubStep {
  name?: string;
  run?: string;
  uses?: string;
  if?: string;
  with?: Record<string, string>;
}

/** Runs the workflow's only job as GitHub's runner would; `cancelOn` cancels the run at that line. */
async function runGithub(name: string, cancelOn?: RegExp) {
  const workflow = parse(docBlock(blocks, GUIDE, "ci", name).text) as { jobs: Record<string, { env: Record<string, string>; steps: GithubStep[] }> };
  const [job] = Object.values(workflow.jobs);
  const work = join(tb.dir, `github-${++runs}`);
  await mkdir(work);
  const secrets: Record<string, string> = { TML_TOKEN: token };
  const vars: Record<string, string> = { TML_SERVER: tb.coordinatorUrl, TML_PACKAGE: packageFile };
  const fill = (text: string) =>
    text.replace(/\$\{\{\s*(secrets|vars)\.(\w+)\s*\}\}/g, (_, kind: string, key: string) => (kind === "secrets" ? secrets : vars)[key] ?? "");
  const summary = join(work, "step-summary.md");
  const githubEnv = join(work, "github-env");
  await writeFile(summary, "");
  await writeFile(githubEnv, "");
  const env: NodeJS.ProcessEnv = {
    ...baseEnv(work),
    ...Object.fromEntries(Object.entries(job.env).map(([k, v]) => [k, fill(v)])),
    GITHUB_ACTIONS: "true",
    GITHUB_SHA: "1a2b3c4d",
    GITHUB_RUN_ID: "4242",
    GITHUB_REPOSITORY: "lab/firmware",
    GITHUB_STEP_SUMMARY: summary,
    GITHUB_ENV: githubEnv,
  };
  const ran: { name: string; code: number | string; stdout: string; stderr: string }[] = [];
  const used: GithubStep[] = [];
  let failed = false;
  for (const s of job.steps) {
    if ((failed && s.if !== "always()") || (s.if !== undefined && s.if !== "always()")) continue;
    if (s.run === undefined) {
      used.push(s);
      continue;
    }
    // $GITHUB_ENV's lines are the next steps' variables.
    for (const line of (await readFile(githubEnv, "utf8")).split("\n").filter((l) => l.includes("="))) {
      env[line.slice(0, line.indexOf("="))] = line.slice(line.indexOf("=") + 1);
    }
    const result = await step(s.run, work, env, s.run.includes("tml job run") ? cancelOn : undefined);
    ran.push({ name: s.name ?? s.run, ...result });
    if (result.code !== 0) failed = true;
  }
  return { work, ran, used, summary: await readFile(summary, "utf8"), env };
}

/** Runs the GitLab job as its runner would; `cancelOn` cancels it at that line. */
async function runGitlab(name: string, cancelOn?: RegExp) {
  const doc = parse(docBlock(blocks, GUIDE, "ci", name).text) as Record<
    string,
    { before_script: string[]; script: string[]; after_script?: string[]; artifacts: { paths: string[]; reports: { junit: string } } }
  >;
  const [job] = Object.values(doc);
  const work = join(tb.dir, `gitlab-${++runs}`);
  await mkdir(work);
  const env: NodeJS.ProcessEnv = {
    ...baseEnv(work),
    TML_SERVER: tb.coordinatorUrl,
    TML_TOKEN: token,
    TML_PACKAGE: packageFile,
    GITLAB_CI: "true",
    CI_JOB_ID: "777",
    CI_COMMIT_SHA: "1a2b3c4d",
  };
  const main = await step([...job.before_script, ...job.script].join("\n"), work, env, cancelOn);
  const after = job.after_script === undefined ? undefined : await step(job.after_script.join("\n"), work, env);
  return { work, main, after, artifacts: job.artifacts };
}

const submittedIds = (text: string) => [...text.matchAll(/--> job (\S+) submitted/g)].map((m) => m[1]);

beforeAll(async () => {
  blocks = await docBlocks(GUIDE);
  tb = await startTestbed({ supervisors: 1, config: { boards: 0 } });
  const auth = createClient(AuthService, createGrpcTransport({ baseUrl: tb.coordinatorUrl }));
  ({ token } = await auth.login({ name: "admin", password: tb.testbed.admin().password }));
  const pkg = join(tb.dir, "tml-package");
  await mkdir(pkg);
  await writeFile(join(pkg, "package.json"), JSON.stringify({ name: "treadmill", version: "0.1.0", type: "module", bin: { tml: "tml.js" } }));
  await writeFile(join(pkg, "tml.js"), `#!/usr/bin/env node\nawait import(${JSON.stringify(join(REPO, "bin", "tml.js"))});\n`, { mode: 0o755 });
  const pack = spawnSync("npm", ["pack", "--pack-destination", tb.dir], { cwd: pkg, encoding: "utf8", env: { ...process.env, npm_config_update_notifier: "false" } });
  if (pack.status !== 0) throw new Error(`npm pack failed: ${pack.stderr}`);
  packageFile = join(tb.dir, "treadmill-0.1.0.tgz");
  await pushTestsImage(false);
}, 180_000);

afterAll(async () => {
  await tb?.stop();
}, 60_000);

describe("docs/ci.md", () => {
  it("GitHub Actions: the workflow's steps install tml, run the job, and leave the JUnit report, the artifacts and the step summary", async () => {
    const { work, ran, used, summary } = await runGithub("github");
    expect(ran.map((r) => [r.name, r.code, r.code === 0 ? "" : r.stderr])).toEqual([
      ["Install tml", 0, ""],
      ["Run the tests on a board", 0, ""],
    ]);
    const run = ran[1];
    expect(run.stdout).toContain("running the smoke tests");
    const [id] = submittedIds(run.stderr);
    expect((await tb.client(JobService).getJob({ jobId: id })).job!.spec!.tags).toEqual({ commit: "1a2b3c4d" });
    // What the upload and report steps read.
    expect(used.map((s) => s.uses)).toEqual(["actions/setup-node@v4", "actions/upload-artifact@v4", "mikepenz/action-junit-report@v4"]);
    expect(used[1].with).toMatchObject({ path: "results/" });
    const xml = await readFile(join(work, used[2].with!.report_paths), "utf8");
    expect(xml).toMatch(/<testcase [^>]*name="boots"/);
    expect(await readFile(join(work, "results", "artifacts", "uart.log"), "utf8")).toBe("uart: smoke ok\n");
    expect(summary).toContain("### Treadmill job succeeded (exit code 0)");
    expect(summary).toContain(`| Job | [\`${id}\`](${tb.coordinatorUrl}/jobs/${id}) |`);
    expect(summary).toContain("| Tests | 2 cases: 2 passed |");
  }, 180_000);

  it("GitLab CI: the job's script runs the job with its log and summary in sections, and leaves the JUnit report it names", async () => {
    const { work, main, artifacts } = await runGitlab("gitlab");
    expect({ code: main.code, stderr: main.code === 0 ? "" : main.stderr }).toEqual({ code: 0, stderr: "" });
    // GitLab's markers (ESC is \u001b): ESC[0Ksection_start:TIME:NAME CR ESC[0K header, ESC[0Ksection_end:TIME:NAME CR ESC[0K.
    const section = (name: string, header: string, body: string) =>
      new RegExp(String.raw`\u001b\[0Ksection_start:\d+:${name}\r\u001b\[0K${header}\n[^]*${body}[^]*\u001b\[0Ksection_end:\d+:${name}\r\u001b\[0K\n`);
    expect(main.stdout).toMatch(section("treadmill_1", String.raw`Treadmill job \S+: log`, "running the smoke tests"));
    expect(main.stdout).toMatch(section("treadmill_2", String.raw`Treadmill job \S+: succeeded \(exit code 0\)`, String.raw`Tests: {5}2 cases: 2 passed\n`));
    expect(await readFile(join(work, artifacts.reports.junit), "utf8")).toMatch(/<testsuite [^>]*name="smoke"/);
    expect(existsSync(join(work, artifacts.paths[0], "artifacts", "uart.log"))).toBe(true);
  }, 180_000);

  describe("a cancelled pipeline", () => {
    beforeAll(async () => {
      await pushTestsImage(true);
    }, 60_000);

    it("GitHub Actions, leased board: SIGTERM to the running step cancels its job, the release step runs, and the board comes back", async () => {
      const { work, ran, env } = await runGithub("github-lease", /^started\r?$/);
      expect(ran.map((r) => [r.name, r.code])).toEqual([
        ["Install tml", 0],
        ["Reserve a board", 0],
        ["Run the tests on it", "SIGTERM"],
        ["Release the board", 0],
      ]);
      const run = ran[2];
      expect(run.stderr).toMatch(/--> canceling job \S+ \(SIGTERM\)/);
      const [id] = submittedIds(run.stderr);
      const job = await tb.waitFinalized(id);
      expect(job.finalizeReason).toBe(FinalizeReason.CANCELED);
      expect(job.leaseId).toBe(env.LEASE);
      // The canceled job's results file is still there for the report step.
      expect(await readdir(join(work, "results"))).toContain("smoke.xml");
      const { lease } = await tb.client(LeaseService).getLease({ leaseId: env.LEASE! });
      expect(lease!.endReason).toBe(LeaseEndReason.RELEASED);
      await boardComesBack();
    }, 180_000);

    it("GitLab CI, leased board: SIGTERM cancels the job, after_script releases the lease, and the board comes back", async () => {
      const { work, main, after } = await runGitlab("gitlab-lease", /^started\r?$/);
      expect(main.code).toBe("SIGTERM");
      expect(main.stderr).toMatch(/--> canceling job \S+ \(SIGTERM\)/);
      expect(after?.code).toBe(0);
      const [id] = submittedIds(main.stderr);
      const job = await tb.waitFinalized(id);
      expect(job.finalizeReason).toBe(FinalizeReason.CANCELED);
      const leaseId = (await readFile(join(work, "lease.id"), "utf8")).trim();
      expect(job.leaseId).toBe(leaseId);
      const { lease } = await tb.client(LeaseService).getLease({ leaseId });
      expect(lease!.endReason).toBe(LeaseEndReason.RELEASED);
      await boardComesBack();
    }, 180_000);
  });
});

/** The testbed's one process host runs a job outside any lease: it is no longer held. */
async function boardComesBack() {
  const { job } = await tb.client(JobService).submitJob({ spec: { image: "ci/tests:latest", hosts: { hostCount: 1, tags: { driver: "process" } } } });
  const running = await tb.waitState(job!.id, JobState.RUNNING, 60_000);
  expect(running.leaseId).toBe("");
  await tb.client(JobService).cancelJob({ jobId: job!.id });
  await tb.waitFinalized(job!.id);
}
