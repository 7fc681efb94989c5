/**
 * docs/clients.md as it is written: its blocks (generating Python with
 * Debian's protoc, with libprotobuf-dev or through a buf descriptor set; its
 * Python program; buf curl; Connect JSON with curl) run against a coordinator
 * holding a job, and test/interop/python/client.py checks health and an
 * error's code and message with the stubs they made.
 */
import { spawn } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { insertImage } from "../support/jobs.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { docBlock, docBlocks, runBash, type DocBlock } from "../support/doc-blocks.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const DOC = join(REPO, "docs", "clients.md");
const PASSWORD = "python client's admin password";

describe("docs/clients.md against a coordinator", () => {
  let c: TestCoordinator;
  let dir: string;
  let out: string;
  let blocks: DocBlock[];
  let jobId: string;

  /** Runs a `sh step=NAME` block of the doc with bash, after its variables; Debian's python3 first on PATH. */
  function step(name: string) {
    const script = `set -euo pipefail\n${docBlock(blocks, DOC, "vars").text}\n${docBlock(blocks, DOC, "step", name).text}`;
    const vars = { TREADMILL: REPO, C: c.url, PASSWORD_FILE: join(dir, "admin-password"), OUT: out };
    return runBash(script, { cwd: dir, env: { ...process.env, PATH: `/usr/bin:${process.env.PATH}`, ...vars } });
  }

  beforeAll(async () => {
    blocks = await docBlocks(DOC);
    c = await startTestCoordinator({ config: { adminName: "admin", adminPassword: PASSWORD } });
    dir = await mkdtemp(join(tmpdir(), "treadmill-clients-"));
    out = join(dir, "treadmill-python");
    await writeFile(join(dir, "admin-password"), `${PASSWORD}\n`, { mode: 0o600 });
    await writeFile(join(dir, "list_jobs.py"), docBlock(blocks, DOC, "program", "list-jobs").text);
    const { token } = await c.client(AuthService).login({ name: "admin", password: PASSWORD });
    const image = await insertImage(c.sql, { name: "example/python" });
    const { job } = await c.client(JobService, token).submitJob({ spec: { image: image.ref, hosts: { hostCount: 1 } } });
    jobId = job!.id;
  }, 60_000);

  afterAll(async () => {
    await c?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("generates Python with Debian's protoc and libprotobuf-dev, and its program lists the jobs", async () => {
    const generate = await step("python-generate");
    expect(generate).toMatchObject({ code: 0, stderr: "" });
    const run = await step("python-run");
    expect(run.stderr).toBe("");
    expect(run.stdout.trim()).toBe(`${jobId} example/python:v1 JOB_STATE_QUEUED`);
  }, 120_000);

  it("generates the same Python through a buf descriptor set, without libprotobuf-dev", async () => {
    await rm(out, { recursive: true, force: true });
    const generate = await step("python-generate-with-buf");
    expect(generate.code).toBe(0);
    const run = await step("python-run");
    expect(run.stdout.trim()).toBe(`${jobId} example/python:v1 JOB_STATE_QUEUED`);
  }, 120_000);

  it("checks health and is refused a job without a token, the code and message reaching Python", async () => {
    expect((await step("python-health")).code).toBe(0);
    const check = await new Promise<string>((resolve, reject) => {
      const child = spawn("/usr/bin/python3", [join(REPO, "test/interop/python/client.py"), out, c.url.replace(/^http:\/\//, "")], {
        stdio: ["ignore", "pipe", "inherit"],
      });
      let stdout = "";
      child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
      child.once("error", reject);
      child.once("close", () => resolve(stdout));
    });
    const result = JSON.parse(check);
    expect(result.health).toBe("SERVING");
    expect(result.job_service_health).toBe("SERVING");
    // JobService.GetJob needs an API token: the status and its message reach the client.
    expect(result.get_job.code).toBe("UNAUTHENTICATED");
    expect(result.get_job.details).toContain("api token");
  }, 60_000);

  it("lists services and methods with buf curl on the base URL, then logs in and lists jobs", async () => {
    const result = await step("buf-curl");
    expect(result.code).toBe(0);
    expect(result.stdout).toContain("treadmill.coordinator.v1.JobService\n");
    expect(result.stdout).toContain("treadmill.coordinator.v1.JobService/SubmitJob\n");
    expect(result.stdout).toContain(`"id": "${jobId}"`);
  }, 120_000);

  it("checks health, logs in and lists jobs with Connect JSON over curl", async () => {
    const result = await step("curl");
    expect(result.code).toBe(0);
    expect(result.stdout).toContain('{"status":"SERVING"}');
    expect(result.stdout).toContain(`"id":"${jobId}"`);
  }, 60_000);
});
