/**
 * docs/job-files.md as it is written: its job files are written to the
 * testbed's directory under their names (`yaml file=job` -> job.yaml) and
 * its command blocks run in order against the all-in-one testbed (two
 * process hosts tagged driver=process), with a busybox in ./rootfs and a
 * token in token.txt as the guide says.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { docBlock, docBlocks, runBash, type DocBlock } from "../support/doc-blocks.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";
import { busyboxRootfs, guideShell, type GuideShell } from "./harness.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GUIDE = join(REPO, "docs", "job-files.md");

let tb: RunningTestbed;
let blocks: DocBlock[];
let shell: GuideShell;

/** Runs the guide's blocks `names` as one script. */
function guide(...names: string[]) {
  const script = names.map((n) => docBlock(blocks, GUIDE, "jobfiles", n).text).join("\n");
  return shell.run(script);
}

beforeAll(async () => {
  blocks = await docBlocks(GUIDE);
  tb = await startTestbed({ supervisors: 2 });
  shell = await guideShell(tb);
  await busyboxRootfs(join(tb.dir, "rootfs"), ["sh", "echo", "test"]);
  await writeFile(join(tb.dir, "token.txt"), "s3cret-token");
  for (const b of blocks.filter((b) => b.kind === "file")) await writeFile(join(tb.dir, `${b.name}.yaml`), b.text);
  const push = await guide("push");
  if (push.code !== 0) throw new Error(`the push block failed: ${push.stderr}`);
}, 180_000);

afterAll(async () => {
  await tb?.stop();
}, 60_000);

describe("docs/job-files.md's command blocks", () => {
  it("runs a job file with a variable and a secret from a file", async () => {
    const run = await guide("run");
    expect({ code: run.code, stderr: run.code === 0 ? "" : run.stderr }).toEqual({ code: 0, stderr: "" });
    expect(run.stdout).toContain("testing abc123");
  }, 60_000);

  it("runs the 2x2 matrix, one line per job, and exits 1 because one failed", async () => {
    const run = await guide("matrix");
    expect(run.code).toBe(0);
    expect(run.stdout).toMatch(/^board=a suite=smoke\s+\S+\s+succeeded/m);
    expect(run.stdout).toMatch(/^board=b suite=full\s+\S+\s+failed \(exit code 1\)/m);
    expect(run.stdout).toMatch(/^exit code 1$/m);
  }, 90_000);

  it("prints the schema", async () => {
    const run = await guide("schema");
    expect(run.code).toBe(0);
    const written = await runBash(`jq -r '.["$schema"]' job.schema.json`, { cwd: tb.dir, env: process.env });
    expect(written.stdout.trim()).toBe("https://json-schema.org/draft/2020-12/schema");
  });

  it("saves a job as a file, submits it again, and re-runs the job with a parameter changed", async () => {
    const run = await guide("save", "rerun");
    expect({ code: run.code, stderr: run.code === 0 ? "" : run.stderr }).toEqual({ code: 0, stderr: "" });
    expect(run.stdout).toContain("testing abc123");
    expect(run.stdout).toContain("again");
    expect(run.stdout).toMatch(/rerun\s+\S+\s+\d+\s+re-run as job [0-9a-f-]{36} by admin/);
  }, 90_000);

  it("retries the failing test on another host", async () => {
    const run = await guide("retry");
    expect({ code: run.code, stderr: run.code === 0 ? "" : run.stderr }).toEqual({ code: 0, stderr: "" });
    expect(run.stdout).toContain("attempt 2");
    expect(run.stdout).toMatch(/retried.*attempt 1 ended workload_exited on host sup-[12] \(workload failure\): workload exited with code 1.*retrying as attempt 2 on another host/);
  }, 90_000);
});
