/**
 * docs/deploy.md's rolling upgrade: a release's migrations only add, so a
 * coordinator of the previous release keeps working on a database the next
 * release has migrated (it warns, and runs jobs as before), beside a replica
 * that is already upgraded.
 */
import { afterAll, describe, expect, it } from "@jest/globals";
import { Writable } from "node:stream";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { loadMigrations, migrate, migration } from "../../coordinator/db/migrate.js";
import { createLogger, silentLogger } from "../../lib/logger.js";
import { startTestCoordinator } from "../support/coordinator.js";
import { createTestDatabase } from "../support/db.js";
import { FAST, insertImage, uniqueTag, waitUntil } from "../support/jobs.js";
import { ScriptedSupervisor } from "../support/scripted-supervisor.js";

/** What a next release might add: a column with a default on jobs, and a table. */
const NEXT_RELEASE = migration(
  "9000_next_release.sql",
  "alter table jobs add column next_release_note text not null default '';\ncreate table next_release_things (id bigint primary key, job_id uuid references jobs(id));",
);

describe("a rolling upgrade", () => {
  const cleanup: (() => Promise<unknown>)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
  });

  it("leaves a coordinator of the previous release running jobs on the migrated database, saying the schema is newer", async () => {
    const db = await createTestDatabase();
    cleanup.push(() => db.drop());
    // The upgraded replica migrates first.
    await expect(migrate(db.sql, { logger: silentLogger(), migrations: [...(await loadMigrations()), NEXT_RELEASE] })).resolves.toMatchObject({
      applied: [9000],
    });

    const lines: string[] = [];
    const logger = createLogger({ level: "warn", destination: new Writable({ write: (chunk, _e, done) => (lines.push(String(chunk)), done()) }) });
    const previous = await startTestCoordinator({ db, logger, config: FAST });
    cleanup.push(() => previous.stop());
    expect(lines.join("")).toMatch(/"versions":\[9000\],"msg":"database has migrations newer than this build"/);

    const user = await previous.createUser();
    const image = await insertImage(previous.sql);
    const tags = uniqueTag();
    const host = await previous.createHost({ tags });
    const supervisor = new ScriptedSupervisor({ urls: [previous.url], credential: host.credential, mode: "exit" });
    cleanup.push(() => supervisor.close());
    await supervisor.connect();
    const { job } = await previous.client(JobService, user.token).submitJob({ spec: { image: image.ref, hosts: { tags } } });
    await waitUntil(
      async () => (await previous.sql`select state from jobs where id = ${job!.id}`)[0]?.state === "finalized",
      "the job to finish on the previous release",
      30_000,
    );
    const [row] = await previous.sql`select exit_status, next_release_note from jobs where id = ${job!.id}`;
    expect(row).toEqual({ exit_status: "success", next_release_note: "" });
  }, 60_000);
});
