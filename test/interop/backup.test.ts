/**
 * docs/deploy.md's backups, as written: a testbed on Debian's PostgreSQL 15
 * runs a job; the doc's blocks back up its database (pg_dump, the testbed
 * running), its image store (running) and its log server (stopped); the
 * database, the store's and the log server's directories (and the cache's)
 * are then lost, the doc's restore block brings them back, and the testbed
 * started again shows the job, serves its log, and runs a new job whose
 * image the empty cache fetches from the restored store.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { ExitStatus } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { startDebianPostgres, PG15_BIN, type DebianPostgres } from "../support/debian-postgres.js";
import { docBlock, docBlocks, runBash } from "../support/doc-blocks.js";
import { freePortRange } from "../support/net.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const DOC = join(REPO, "docs", "deploy.md");

describe("the backups of docs/deploy.md", () => {
  let pg: DebianPostgres;
  let dir: string;
  let backups: string;
  let tb: RunningTestbed | undefined;
  beforeAll(async () => {
    pg = await startDebianPostgres();
    dir = await mkdtemp(join(tmpdir(), "treadmill-backup-"));
    backups = await mkdtemp(join(tmpdir(), "treadmill-backups-"));
  }, 60000);
  afterAll(async () => {
    await tb?.stop();
    await pg?.stop();
    await rm(dir, { recursive: true, force: true });
    await rm(backups, { recursive: true, force: true });
  });

  it("restore the database, the image store and the log server, so that jobs, logs and images come back", async () => {
    const blocks = await docBlocks(DOC);
    const vars = docBlock(blocks, DOC, "vars", "backup").text;
    const env = { ...process.env, BACKUP: backups, STATE: join(dir, "data"), DATABASE_URL: pg.url, PATH: `${PG15_BIN}:${process.env.PATH}` };
    const step = async (name: string) => {
      const result = await runBash(`set -e\n${vars}\n${docBlock(blocks, DOC, "step", name).text}`, { cwd: dir, env });
      expect({ name, ...result }).toMatchObject({ name, code: 0, stderr: "" });
    };
    // Fixed ports, as a deployment has: the job's log is where the log server was.
    const config = { databaseUrl: pg.url, basePort: await freePortRange(5) };

    tb = await startTestbed({ dir, supervisors: 1, config });
    await tb.pushShellImage("backup/sh:1");
    const jobs = tb.client(JobService);
    const { job } = await jobs.submitJob({
      spec: { image: "backup/sh:1", hosts: { hostCount: 1 }, parameters: [{ name: "script", value: "echo before the backup" }] },
    });
    expect((await tb.waitFinalized(job!.id)).exitStatus).toBe(ExitStatus.SUCCESS);
    await step("backup-database");
    await step("backup-image-store");
    await tb.stop();
    tb = undefined;
    await step("backup-log-server");

    // Everything worth a backup is lost: the database, the store, the log server; and the cache.
    pg.psql("drop database treadmill");
    pg.psql("create database treadmill owner treadmill");
    for (const lost of ["image-store", "log-server", "image-cache"]) await rm(join(dir, "data", lost), { recursive: true, force: true });
    await step("restore");

    tb = await startTestbed({ dir, supervisors: 1, config });
    const restored = await tb.client(JobService).getJob({ jobId: job!.id });
    expect(restored.job?.exitStatus).toBe(ExitStatus.SUCCESS);
    expect(await tb.readLog(job!.id, "console")).toContain("before the backup");
    const { job: again } = await tb.client(JobService).submitJob({
      spec: { image: "backup/sh:1", hosts: { hostCount: 1 }, parameters: [{ name: "script", value: "echo after the restore" }] },
    });
    expect((await tb.waitFinalized(again!.id)).exitStatus).toBe(ExitStatus.SUCCESS);
    expect(await tb.readLog(again!.id, "console")).toContain("after the restore");
  }, 240000);
});
