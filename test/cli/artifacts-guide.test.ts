/**
 * docs/artifacts.md as it is written: its command blocks run in order with
 * the real `tml` against the all-in-one testbed (a process host, the
 * simulated board), `$JOB` carried from the first block to the others as a
 * shell session would. The console block runs as the firmware of a board
 * job, after a line that writes the file it sends.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { ExitStatus, JobEventKind } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { buildFirmwareImage } from "../../testbed/images.js";
import { pushTestImage } from "../../testbed/provision.js";
import { docBlock, docBlocks, type DocBlock } from "../support/doc-blocks.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";
import { guideShell, type GuideShell } from "./harness.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GUIDE = join(REPO, "docs", "artifacts.md");

let tb: RunningTestbed;
let blocks: DocBlock[];
let shell: GuideShell;
let job = "";

const text = (name: string) => docBlock(blocks, GUIDE, "artifacts", name).text;

const guide = (name: string) => shell.run(text(name), { JOB: job });

beforeAll(async () => {
  blocks = await docBlocks(GUIDE);
  tb = await startTestbed({ supervisors: 1 });
  shell = await guideShell(tb);
  await tb.pushShellImage("ci/sh:1");
}, 180_000);

afterAll(async () => {
  await tb?.stop();
});

describe("docs/artifacts.md", () => {
  it("runs a failing job whose artifacts are uploaded, lists and downloads them, and feeds one to the next job", async () => {
    const produce = await shell.run(`${text("produce")}\necho "JOB=$JOB"`);
    expect(produce.stderr).toBe("");
    expect(produce.code).toBe(0);
    job = /^JOB=(\S+)$/m.exec(produce.stdout)![1];
    expect(produce.stdout).toContain(`job ${job} failed; its artifacts were uploaded all the same`);

    const list = await guide("list");
    expect(list.code).toBe(0);
    expect(list.stdout).toMatch(/logs\/test\.log\s+575 KiB\s+sha256:[0-9a-f]{64}/);
    expect(list.stdout).toMatch(/summary\.txt\s+20 B\s+sha256:[0-9a-f]{64}/);

    const get = await guide("get");
    expect(get.stderr).toBe("");
    expect(get.code).toBe(0);
    expect(get.stdout).toContain("41 passed, 1 failed\n1\n2\n");
    expect(await readFile(join(tb.dir, "results", "logs", "test.log"), "utf8")).toBe(`${Array.from({ length: 100000 }, (_, i) => i + 1).join("\n")}\n`);

    const input = await guide("input");
    expect(input.code).toBe(0);
    expect(input.stdout).toContain("100000 /run/treadmill/inputs/test.log");
  }, 180_000);

  it("takes a board's file sent over its console as the guide shows", async () => {
    const firmware = `cd "$(mktemp -d)"\necho '<testsuite tests="1"/>' > results.xml\n${text("console")}echo TREADMILL_EXIT=0\n`;
    await pushTestImage(tb.admin, await buildFirmwareImage({ dir: join(tb.dir, "images"), script: firmware }), "ci/board-report:1");
    const jobs = createClient(JobService, tb.admin);
    const { job: submitted } = await jobs.submitJob({ spec: { image: "ci/board-report:1", hosts: { hostCount: 1, tags: { board: "sim" } } } });
    const done = await tb.waitFinalized(submitted!.id, 120_000);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
    const { artifacts } = await jobs.listJobArtifacts({ jobId: submitted!.id });
    const bytes = Buffer.from('<testsuite tests="1"/>\n');
    expect(artifacts.map((a) => [a.name, Number(a.sizeBytes), a.digest])).toEqual([
      ["results.xml", bytes.length, `sha256:${createHash("sha256").update(bytes).digest("hex")}`],
    ]);
    expect(done.timeline.find((e) => e.kind === JobEventKind.ARTIFACTS)?.message).toMatch(/^artifacts: 1 file \(23 bytes\) uploaded from host /);
  }, 180_000);
});
