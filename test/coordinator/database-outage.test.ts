/**
 * The coordinator across PostgreSQL restarts (issue #18 defect 1): a server of
 * the test's own (the run's shared one must not be killed) is SIGKILLed and
 * started again on the same port, more than once; after each restart jobs are
 * scheduled again, notifications wake the scheduler again, and what a
 * supervisor reported while the database was down is applied.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus as ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { ExitStatus, FinalizeReason, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { startEmbeddedPostgres, type EmbeddedPostgres } from "../../coordinator/db/embedded.js";
import { silentLogger } from "../../lib/logger.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { TestDatabase } from "../support/db.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { attach, codeOf, FAST, insertImage, jobInState, uniqueTag, waitUntil } from "../support/jobs.js";
import { freePort } from "../support/net.js";


describe("the coordinator when PostgreSQL restarts", () => {
  let root: string;
  let port: number;
  let pg: EmbeddedPostgres;
  let c: TestCoordinator;
  const cleanup: (() => Promise<unknown>)[] = [];

  const startPg = async () => {
    // Commits are durable across a kill of the server (synchronous_commit on);
    // fsync is off: the machine does not crash here.
    pg = await startEmbeddedPostgres({ dataDir: join(root, "pg"), logger: silentLogger(), port, settings: { fsync: "off" } });
  };

  /** SIGKILLs the postmaster (its backends follow), waits `downMs`, starts it again on the same port. */
  const crashPg = async (downMs: number) => {
    process.kill(pg.pid, "SIGKILL");
    await pg.exited;
    await new Promise((r) => setTimeout(r, downMs));
    await startPg();
  };

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), "treadmill-pg-outage-"));
    await chmod(root, 0o755); // the server's OS user must reach its directory
    port = await freePort();
    await startPg();
    const sql = postgres(pg.url, { max: 3, onnotice: () => undefined });
    const db: TestDatabase = { url: pg.url, name: "treadmill", sql, drop: () => sql.end({ timeout: 1 }) };
    c = await startTestCoordinator({ db, config: { ...FAST, supervisorGraceMs: 1000 }, ...(process.env.OUTAGE_LOG ? { logger: (await import("../../lib/logger.js")).createLogger({ level: "debug", destination: (await import("pino")).pino.destination(process.env.OUTAGE_LOG) }) } : {}) });
    cleanup.push(() => rm(root, { recursive: true, force: true }), () => pg.stop(), () => sql.end({ timeout: 1 }), () => c.stop());
  });

  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
  });

  /** Submits (retrying while the coordinator says Unavailable) and returns the job id. */
  async function submit(user: { token: string }, image: string, tags: Record<string, string>): Promise<string> {
    const jobs = c.client(JobService, user.token);
    return waitUntil(async () => {
      try {
        const { job } = await jobs.submitJob({ spec: { image, hosts: { tags } } }, { timeoutMs: 5000 });
        return job!.id;
      } catch (err) {
        if (ConnectError.from(err).code === Code.Unavailable) return undefined;
        throw err;
      }
    }, "a submit to succeed", 30000);
  }

  it("schedules jobs again after each of two restarts, and applies a job end reported while the database was down", async () => {
    const user = await c.createUser();
    const image = await insertImage(c.sql);
    const tags = uniqueTag();
    const runner = await c.createHost({ tags });
    const auto: ScriptedSupervisor = await attach(c, runner, { mode: "exit", reconnect: true });
    cleanup.push(() => auto.close());

    const first = await submit(user, image.ref, tags);
    await jobInState(c.sql, first, "finalized");

    // A job running on a manual supervisor when the database goes down.
    const manualTags = uniqueTag();
    const holder = await c.createHost({ tags: manualTags });
    const manual = await attach(c, holder, { reconnect: true });
    cleanup.push(() => manual.close());
    const held = await submit(user, image.ref, manualTags);
    const start = await manual.startJob(held);
    await manual.report(start.jobId, start.attempt, JobState.RUNNING);
    await jobInState(c.sql, held, "running");

    const health = createClient(Health, c.transport());
    for (let round = 1; round <= 2; round++) {
      const outage = crashPg(3000);
      if (round === 2) {
        // While it is down the coordinator says so, and answers at once.
        await waitUntil(async () => (await health.check({})).status === ServingStatus.NOT_SERVING, "health to say NOT_SERVING");
        const started = Date.now();
        const code = await codeOf(c.client(JobService, user.token).submitJob({ spec: { image: image.ref, hosts: { tags } } }));
        expect(code).toBe("Unavailable");
        expect(Date.now() - started).toBeLessThan(1000);
      }
      if (round === 1) {
        // The workload ends while PostgreSQL is down.
        await new Promise((r) => setTimeout(r, 500));
        // Its report is acknowledged only once applied: not awaited here.
        void manual.terminate(start.jobId, start.attempt, {
          reason: FinalizeReason.WORKLOAD_EXITED,
          exitStatus: ExitStatus.SUCCESS,
          exitCode: 0,
          message: "done",
        }).catch(() => undefined);
      }
      await outage;
      const after = await submit(user, image.ref, tags);
      const row = await jobInState(c.sql, after, "finalized", 30000);
      expect(row.reason).toBe("workload_exited");
      expect(row.exit_status).toBe("success");
    }
    const ended = await jobInState(c.sql, held, "finalized", 30000);
    const [{ status_message }] = await c.sql`select status_message from jobs where id = ${held}`;
    expect({ reason: ended.reason, exit: ended.exit_status, status_message }).toEqual({ reason: "workload_exited", exit: "success", status_message: "done" });
    expect((await health.check({})).status).toBe(ServingStatus.SERVING);
  }, 120000);

  it("detaches a host whose stream ended while the database was down, so that its job is dropped after the grace period", async () => {
    const user = await c.createUser();
    const image = await insertImage(c.sql);
    const tags = uniqueTag();
    const host = await c.createHost({ tags });
    const gone = await attach(c, host);
    const id = await submit(user, image.ref, tags);
    const start = await gone.startJob(id);
    await gone.report(start.jobId, start.attempt, JobState.RUNNING);
    const outage = crashPg(2000);
    // The supervisor dies during the outage and never comes back.
    await gone.close();
    await outage;
    const row = await jobInState(c.sql, id, "finalized", 30000);
    expect(row.reason).toBe("host_dropped");
  }, 60000);

  it("fails a transaction whose server dies in the middle of it, and the process lives on", async () => {
    // postgres.js 3.4 wrote the transaction's ROLLBACK to the closed socket from a timer: an uncaught TypeError (porsager/postgres#1208).
    const sql = postgres(pg.url, { max: 2, onnotice: () => undefined });
    cleanup.push(() => sql.end({ timeout: 1 }));
    const transaction = sql.begin(async (tx) => {
      await tx`select 1`;
      await tx`select pg_sleep(30)`;
    });
    const outcome = transaction.then(
      () => "committed",
      (err: { code?: string }) => err.code,
    );
    await new Promise((r) => setTimeout(r, 300));
    const restarted = crashPg(0);
    expect(await outcome).toBe("CONNECTION_CLOSED");
    await restarted;
    // The pool works again once the server is back.
    expect(await waitUntil(() => sql`select 1 as one`.then(([r]) => r.one, () => undefined), "the pool to work again")).toBe(1);
  }, 60000);

  it("stops within its grace period while the database is down", async () => {
    const other = await startTestCoordinator({ db: { url: pg.url, name: "treadmill", sql: c.sql, drop: async () => undefined }, config: FAST });
    process.kill(pg.pid, "SIGKILL");
    await pg.exited;
    const started = Date.now();
    await other.stop();
    expect(Date.now() - started).toBeLessThan(10000);
    await startPg();
  }, 60000);
});
