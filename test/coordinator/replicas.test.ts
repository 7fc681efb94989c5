/**
 * Several coordinator replicas on one database (DESIGN.md §5, §10): jobs
 * submitted to both run exactly once on supervisors attached to either, and
 * a replica killed with SIGKILL loses no job: its supervisors re-attach to
 * the other, which adopts what they run.
 */
import { afterAll, describe, expect, it } from "@jest/globals";
import { fileURLToPath } from "node:url";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { startTestCoordinator } from "../support/coordinator.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";
import { startProcess, type RunningProcess } from "../support/process.js";
import { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, insertImage, uniqueTag, waitUntil } from "../support/jobs.js";

const COORDINATOR_BIN = fileURLToPath(new URL("../../bin/treadmill-coordinator.js", import.meta.url));

/** Counts of each job's physical starts, across supervisors. */
function startsByJob(supervisors: ScriptedSupervisor[]): Map<string, number> {
  const total = new Map<string, number>();
  for (const s of supervisors) for (const [job, n] of s.starts) total.set(job, (total.get(job) ?? 0) + n);
  return total;
}

describe("two coordinator replicas on one database", () => {
  const cleanup: (() => Promise<unknown>)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
  });

  it("runs each of 500 jobs submitted to both replicas exactly once on 50 supervisors split across them", async () => {
    const a = await startTestCoordinator({ config: { ...FAST, supervisorHeartbeatMs: 1000, replicaHeartbeatMs: 1000 } });
    cleanup.push(() => a.stop());
    const b = await startTestCoordinator({ config: { ...FAST, supervisorHeartbeatMs: 1000, replicaHeartbeatMs: 1000 }, db: a.db });
    cleanup.push(() => b.stop());
    const user = await a.createUser();
    const image = await insertImage(a.sql);
    const tag = uniqueTag();
    const supervisors: ScriptedSupervisor[] = [];
    for (let i = 0; i < 50; i++) {
      const host = await a.createHost({ tags: tag });
      const s = new ScriptedSupervisor({ urls: [i % 2 === 0 ? a.url : b.url], credential: host.credential, mode: "exit" });
      supervisors.push(s);
      cleanup.push(() => s.close());
    }
    await Promise.all(supervisors.map((s) => s.connect()));

    const clients = [a.client(JobService, user.token), b.client(JobService, user.token)];
    const ids: string[] = [];
    await Promise.all(
      [0, 1].map(async (side) => {
        for (let batch = 0; batch < 5; batch++) {
          const got = await Promise.all(
            Array.from({ length: 50 }, () => clients[side].submitJob({ spec: { image: image.ref, hosts: { tags: tag } } })),
          );
          ids.push(...got.map((r) => r.job!.id));
        }
      }),
    );
    expect(new Set(ids).size).toBe(500);
    await waitUntil(
      async () => {
        const [r] = await a.sql`select count(*)::int as n from jobs where id = any(${ids}::uuid[]) and state = 'finalized'`;
        return r.n === 500;
      },
      "500 jobs to finish",
      120_000,
    );
    const rows = await a.sql<{ id: string; reason: string; exit_status: string; attempt: number; hosts: number; message: string }[]>`
      select id, reason, exit_status, attempt, status_message as message,
        (select count(*)::int from job_hosts jh where jh.job_id = j.id) as hosts
      from jobs j where id = any(${ids}::uuid[])`;
    const odd = rows.filter((r) => !(r.reason === "workload_exited" && r.exit_status === "success" && r.attempt === 1 && r.hosts === 1));
    expect(odd).toEqual([]);
    const starts = startsByJob(supervisors);
    expect(starts.size).toBe(500);
    expect([...starts.values()].every((n) => n === 1)).toBe(true);
    // Both replicas delivered commands.
    const replicas = await a.sql`
      select distinct details->>'replica' as replica from audit_events where kind = 'command.start_job' and job_id = any(${ids}::uuid[])`;
    expect(replicas.length).toBe(2);
    await Promise.all(supervisors.map((s) => s.close()));
  }, 180_000);

  it("loses no job when a replica holding streams is killed with SIGKILL", async () => {
    const db: TestDatabase = await createTestDatabase();
    cleanup.push(() => db.drop());
    const child: RunningProcess = startProcess(
      COORDINATOR_BIN,
      ["--port", "0", "--database-url", db.url, "--supervisor-heartbeat-ms", "400", "--job-sweep-interval-ms", "50", "--replica-heartbeat-ms", "500", "--grace-ms", "200"],
      { TREADMILL_COORDINATOR_LOG_LEVEL: "info" },
    );
    cleanup.push(async () => {
      child.child.kill("SIGKILL");
      await child.exited;
    });
    const ready = await child.waitForLine(/coordinator ready/, 60_000);
    const childUrl = (JSON.parse(ready) as { url: string }).url;
    const b = await startTestCoordinator({ config: FAST, db });
    cleanup.push(() => b.stop());

    const user = await b.createUser();
    const image = await insertImage(b.sql);
    const tag = uniqueTag();
    const supervisors: ScriptedSupervisor[] = [];
    for (let i = 0; i < 10; i++) {
      const host = await b.createHost({ tags: tag });
      const urls = i < 6 ? [childUrl, b.url] : [b.url, childUrl];
      const s = new ScriptedSupervisor({ urls, credential: host.credential, mode: "manual", reconnect: true });
      supervisors.push(s);
      cleanup.push(() => s.close());
    }
    await Promise.all(supervisors.map((s) => s.connect()));
    const client = b.client(JobService, user.token);
    const first = await Promise.all(
      Array.from({ length: 10 }, async () => (await client.submitJob({ spec: { image: image.ref, hosts: { tags: tag } } })).job!.id),
    );
    // Every job started somewhere and reported running.
    await waitUntil(async () => {
      const held = supervisors.flatMap((s) => [...s.held.values()]);
      return held.length === 10 && held.every((h) => h.start !== undefined);
    }, "10 jobs to start");
    for (const s of supervisors) for (const h of s.held.values()) await s.report(h.jobId, h.attempt, JobState.RUNNING);
    await waitUntil(async () => {
      const [r] = await b.sql`select count(*)::int as n from jobs where id = any(${first}::uuid[]) and state = 'running'`;
      return r.n === 10;
    }, "10 jobs running");

    const survivor = supervisors[9].welcome!.coordinatorId;
    expect(supervisors[0].welcome!.coordinatorId).not.toBe(survivor);
    child.child.kill("SIGKILL");
    await child.exited;
    // The child's supervisors re-attach to the survivor, saying what they hold
    // (the host row may say so before the supervisor has read its welcome).
    await waitUntil(async () => {
      const [r] = await b.sql`select count(*)::int as n from hosts where tags @> ${b.sql.json(tag)} and attached_replica = ${survivor}`;
      return r.n === 10 && supervisors.slice(0, 6).every((s) => s.attaches >= 2 && s.welcome?.coordinatorId === survivor);
    }, "every supervisor to attach to the surviving replica");
    // Each of the child's supervisors re-attached (a loaded machine may add a
    // reconnect; what matters, no job started twice, is checked below).
    expect(supervisors.slice(0, 6).every((s) => s.attaches >= 2)).toBe(true);

    // More work while they finish theirs.
    const second = await Promise.all(
      Array.from({ length: 10 }, async () => (await client.submitJob({ spec: { image: image.ref, hosts: { tags: tag } } })).job!.id),
    );
    for (const s of supervisors) for (const h of [...s.held.values()]) await s.exit(h.jobId, h.attempt);
    await waitUntil(async () => {
      const held = supervisors.flatMap((s) => [...s.held.values()].filter((h) => !h.termination));
      for (const s of supervisors) for (const h of [...s.held.values()]) if (!h.termination && h.start) void s.exit(h.jobId, h.attempt);
      const [r] = await b.sql`select count(*)::int as n from jobs where id = any(${[...first, ...second]}::uuid[]) and state = 'finalized'`;
      return r.n === 20 && held.length === 0;
    }, "all 20 jobs to finish", 60_000);
    const rows = await b.sql<{ reason: string; attempt: number }[]>`
      select reason, attempt from jobs where id = any(${[...first, ...second]}::uuid[])`;
    expect(rows.every((r) => r.reason === "workload_exited" && r.attempt === 1)).toBe(true);
    const starts = startsByJob(supervisors);
    expect(starts.size).toBe(20);
    expect([...starts.values()].every((n) => n === 1)).toBe(true);
    await Promise.all(supervisors.map((s) => s.close()));
  }, 120_000);
});
