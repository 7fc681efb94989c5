import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import type { Sql } from "postgres";
import type { Duration } from "@bufbuild/protobuf/wkt";
import { setHostHealth, type Health } from "../../coordinator/db/queries/health.js";
import { hostColumns, type HostRow } from "../../coordinator/db/queries/hosts.js";
import { hostStats } from "../../coordinator/services/host-stats.js";
import { HostHealth } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostService, type HostStatsWindow } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { FinalizeReason, ExitStatus } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { HealthService } from "../../gen/treadmill/coordinator/v1/health_service_pb.js";
import type { StartJob } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { FAST, attach, codeOf, insertImage, jobInState, uniqueTag } from "../support/jobs.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";

const HOUR = 3_600_000;
const DAY = 24 * HOUR;
/** The instant the seeded statistics are computed at. */
const NOW = Date.parse("2026-06-01T12:00:00Z");
const at = (agoMs: number) => new Date(NOW - agoMs);

const hours = (d: Duration | undefined) => Number(d?.seconds ?? 0n) / 3600;
/** A window's health durations as { state: hours }. */
const healthHours = (w: HostStatsWindow) => Object.fromEntries(w.healthDurations.map((d) => [HostHealth[d.health].toLowerCase(), hours(d.duration)]));

async function hostRow(sql: Sql, id: string): Promise<HostRow> {
  const [row] = await sql<HostRow[]>`select ${hostColumns(sql)} from hosts h where h.id = ${id}`;
  return row;
}

describe("a host's statistics over seeded history", () => {
  let db: TestDatabase;
  let owner: string;
  beforeAll(async () => {
    db = await createTestDatabase();
    owner = randomUUID();
    await db.sql`insert into users (id, name, role) values (${owner}, 'stats-owner', 'user')`;
  });
  afterAll(async () => {
    await db?.drop();
  });

  async function host(name: string, createdAgoMs: number): Promise<string> {
    const id = randomUUID();
    await db.sql`insert into hosts (id, name, driver_kind, created_at) values (${id}, ${name}, 'board', ${at(createdAgoMs)})`;
    return id;
  }

  /** An attempt on `hostId` that ended `agoMs` before NOW (null: still running). */
  async function attempt(hostId: string, agoMs: number, reason: string | null, exitStatus: string | null = null): Promise<string> {
    const jobId = randomUUID();
    await db.sql`insert into jobs (id, owner_id, spec) values (${jobId}, ${owner}, ${db.sql.json({ image: "x:1" })})`;
    const termination = reason === null ? null : db.sql.json({ reason, exitStatus, exitCode: null, message: reason });
    await db.sql`
      insert into job_hosts (job_id, host_id, attempt, termination, terminated_at, released_at)
      values (${jobId}, ${hostId}, 1, ${termination}, ${reason === null ? null : at(agoMs)}, ${reason === null ? null : at(agoMs)})`;
    return jobId;
  }

  async function health(hostId: string, agoMs: number, state: Health, jobId?: string, reason = ""): Promise<void> {
    await db.sql`insert into host_health_events (host_id, health, reason, actor, job_id, at) values (${hostId}, ${state}, ${reason}, 'system', ${jobId ?? null}, ${at(agoMs)})`;
  }

  it("counts jobs, failures by class, online time and time in each health state within 24 hours and 7 days", async () => {
    const id = await host("seeded-1", 30 * DAY);
    // Within 24 hours: a success, a workload failure, an infrastructure and a user end.
    await attempt(id, 2 * HOUR, "workload_exited", "success");
    await attempt(id, 3 * HOUR, "workload_exited", "failure");
    await attempt(id, 5 * HOUR, "host_start_failure");
    await attempt(id, 10 * HOUR, "canceled");
    // Within 7 days only.
    await attempt(id, 2 * DAY, "host_dropped");
    await attempt(id, 3 * DAY, "workload_exited", "success");
    await attempt(id, 6 * DAY, "job_timeout");
    // Outside both, after NOW, and still running: not counted.
    await attempt(id, 8 * DAY, "internal_error");
    await attempt(id, -HOUR, "internal_error");
    await attempt(id, 0, null);

    // Online 30 h to 20 h ago, 8 days to 7 days less 1 h ago, and for the last 6 hours.
    await db.sql`
      insert into host_presence (host_id, online_from, online_until) values
        (${id}, ${at(30 * HOUR)}, ${at(20 * HOUR)}),
        (${id}, ${at(8 * DAY)}, ${at(7 * DAY - HOUR)}),
        (${id}, ${at(6 * HOUR)}, null)`;

    // Its health checks: one failed 12 hours ago, one passed an hour ago (and a user job since).
    const check = randomUUID();
    const healthJob = async (agoMs: number, exitStatus: string, message: string) => {
      const jobId = randomUUID();
      await db.sql`
        insert into jobs (id, owner_id, spec, state, reason, exit_status, status_message, finalized_at, health_check_id, pinned_host_id)
        values (${jobId}, ${owner}, ${db.sql.json({ image: "checks/boot:1" })}, 'finalized', 'workload_exited', ${exitStatus}, ${message},
          ${at(agoMs)}, ${check}, ${id})`;
      return jobId;
    };
    const failedCheck = await healthJob(12 * HOUR, "failure", "exit code 1");
    const passedCheck = await healthJob(HOUR, "success", "exit code 0");
    await db.sql`
      insert into jobs (id, owner_id, spec, state, reason, exit_status, finalized_at)
      values (${randomUUID()}, ${owner}, ${db.sql.json({ image: "x:1" })}, 'finalized', 'workload_exited', 'failure', ${at(HOUR / 2)})`;
    await health(id, 10 * DAY, "healthy");
    await health(id, 3 * DAY, "quarantined", undefined, "3 infrastructure failures in a row");
    await health(id, 2 * DAY, "checking");
    await health(id, 47 * HOUR, "healthy");
    await health(id, 12 * HOUR, "quarantined", failedCheck, "health check failed");
    await health(id, HOUR, "healthy", passedCheck);

    const stats = await hostStats(db.sql, await hostRow(db.sql, id), NOW);
    const [day, week] = stats.windows;
    expect(stats.host?.name).toBe("seeded-1");
    expect(hours(day.length)).toBe(24);
    expect(hours(week.length)).toBe(168);
    expect(day.startTime?.seconds).toBe(BigInt((NOW - DAY) / 1000));

    expect(day).toMatchObject({ jobsRun: 4n, jobsSucceeded: 1n, jobFailures: 1n, userFailures: 1n, infrastructureFailures: 1n, infrastructureFailureRate: 0.25 });
    expect(week).toMatchObject({ jobsRun: 7n, jobsSucceeded: 2n, jobFailures: 2n, userFailures: 1n, infrastructureFailures: 2n });
    expect(week.infrastructureFailureRate).toBeCloseTo(2 / 7, 12);

    expect(day.onlineShare).toBeCloseTo(10 / 24, 12);
    expect(week.onlineShare).toBeCloseTo(17 / 168, 12);

    expect(healthHours(day)).toEqual({ healthy: 13, quarantined: 11 });
    expect(healthHours(week)).toEqual({ checking: 1, healthy: 132, quarantined: 35 });
    expect(week.healthDurations.map((d) => d.health)).toEqual([HostHealth.CHECKING, HostHealth.HEALTHY, HostHealth.QUARANTINED]);

    // The timeline: the changes of the last 7 days, newest first.
    expect(stats.healthChanges.map((e) => [HostHealth[e.health], Number(e.time?.seconds) * 1000 - NOW, e.jobId])).toEqual([
      ["HEALTHY", -HOUR, passedCheck],
      ["QUARANTINED", -12 * HOUR, failedCheck],
      ["HEALTHY", -47 * HOUR, ""],
      ["CHECKING", -2 * DAY, ""],
      ["QUARANTINED", -3 * DAY, ""],
    ]);
    expect(stats.healthChanges[1]).toMatchObject({ reason: "health check failed", actor: "system" });

    expect(stats.lastHealthCheck).toMatchObject({ jobId: passedCheck, passed: true, message: "exit code 0" });
    expect(stats.lastHealthCheck?.time?.seconds).toBe(BigInt((NOW - HOUR) / 1000));
    // As it was 2 hours ago: the failed one.
    const before = await hostStats(db.sql, await hostRow(db.sql, id), NOW - 2 * HOUR);
    expect(before.lastHealthCheck).toMatchObject({ jobId: failedCheck, passed: false, message: "exit code 1" });
  });

  it("clips the windows to a new host's life and gives it no check and no rate", async () => {
    const id = await host("seeded-new", 2 * HOUR);
    await db.sql`insert into host_presence (host_id, online_from, online_until) values (${id}, ${at(HOUR)}, ${at(HOUR / 2)})`;
    const stats = await hostStats(db.sql, await hostRow(db.sql, id), NOW);
    for (const w of stats.windows) {
      expect(w.startTime?.seconds).toBe(BigInt((NOW - 2 * HOUR) / 1000));
      expect(w).toMatchObject({ jobsRun: 0n, infrastructureFailureRate: 0 });
      expect(w.onlineShare).toBeCloseTo(0.25, 12);
      expect(healthHours(w)).toEqual({ unknown: 2 });
    }
    expect(stats.lastHealthCheck).toBeUndefined();
    const never = await hostStats(db.sql, await hostRow(db.sql, await host("seeded-never-online", 3 * HOUR)), NOW);
    expect(never.windows.map((w) => w.onlineShare)).toEqual([0, 0]);
  });

  it("records a host's presence when its supervisor attaches and detaches, whatever statement does it", async () => {
    const id = await host("presence-1", DAY);
    await db.sql`update hosts set attached_replica = 'r1', attach_session = ${randomUUID()}, attached_at = ${at(3 * HOUR)} where id = ${id}`;
    // A newer stream on another replica, and a heartbeat: still the same attachment.
    await db.sql`update hosts set attached_replica = 'r2', attach_session = ${randomUUID()}, attached_at = ${at(2 * HOUR)} where id = ${id}`;
    await db.sql`update hosts set last_seen_at = now() where id = ${id}`;
    // A dead replica's host goes offline at the replica's last heartbeat (detached_at).
    await db.sql`update hosts set attached_replica = null, attach_session = null, detached_at = ${at(HOUR)} where id = ${id}`;
    const rows = await db.sql`select online_from, online_until from host_presence where host_id = ${id}`;
    expect(rows).toEqual([{ online_from: at(3 * HOUR), online_until: at(HOUR) }]);
  });
});

describe("HostService.GetHostStats, the health filter and the hosts' metrics", () => {
  let c: TestCoordinator;
  let user: { id: string; token: string };
  let admin: { id: string; token: string };
  let image: { ref: string };
  const open: ScriptedSupervisor[] = [];
  beforeAll(async () => {
    c = await startTestCoordinator({ config: FAST });
    user = await c.createUser();
    admin = await c.createUser({ role: "admin" });
    image = await insertImage(c.sql);
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  it("answers the statistics of a scripted series of jobs through the RPC and on /metrics", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ name: "stats-e2e", tags: tag });
    const s = await attach(c, host);
    open.push(s);
    const jobs = c.client(JobService, user.token);
    const run = async (end: (jobId: string) => Promise<unknown>) => {
      const { job } = await jobs.submitJob({ spec: { image: image.ref, hosts: { tags: tag }, restartPolicy: { maxRestarts: 0 } } });
      await s.startJob(job!.id);
      await end(job!.id);
      await jobInState(c.sql, job!.id, "finalized");
    };
    await run((id) => s.exit(id, 1, 0));
    await run((id) => s.exit(id, 1, 1));
    await run((id) => s.exit(id, 1, 0));
    await run((id) => s.terminate(id, 1, { reason: FinalizeReason.HOST_START_FAILURE, exitStatus: ExitStatus.UNSPECIFIED, message: "flash failed" }));

    const stats = await c.client(HostService, user.token).getHostStats({ host: { case: "name", value: "stats-e2e" } });
    expect(stats.host?.id).toBe(host.id);
    for (const w of stats.windows) {
      expect(w).toMatchObject({ jobsRun: 4n, jobsSucceeded: 2n, jobFailures: 1n, userFailures: 0n, infrastructureFailures: 1n, infrastructureFailureRate: 0.25 });
      // Attached since just after its creation (the trigger of migration 0015).
      expect(w.onlineShare).toBeGreaterThan(0.5);
      expect(w.healthDurations.map((d) => d.health)).toEqual([HostHealth.UNKNOWN]);
    }
    const byId = await c.client(HostService, admin.token).getHostStats({ host: { case: "hostId", value: host.id } });
    expect(byId.windows[1].jobsRun).toBe(4n);

    await c.sql.begin((tx) => setHostHealth(tx, { hostId: host.id, health: "quarantined", reason: "test", actor: "system" }));
    const text = await (await fetch(`${c.url}/metrics`)).text();
    const series = (name: string, labels: string) => new RegExp(`^${name}\\{${labels}[^}]*\\} (\\S+)$`, "m").exec(text)?.[1];
    expect(series("treadmill_host_health", 'host="stats-e2e",state="quarantined"')).toBe("1");
    expect(series("treadmill_host_health", 'host="stats-e2e",state="unknown"')).toBe("0");
    expect(series("treadmill_host_jobs_total", 'host="stats-e2e"')).toBe("4");
    expect(series("treadmill_host_failures_total", 'host="stats-e2e",class="job"')).toBe("1");
    expect(series("treadmill_host_failures_total", 'host="stats-e2e",class="infrastructure"')).toBe("1");
    expect(series("treadmill_host_failures_total", 'host="stats-e2e",class="user"')).toBeUndefined();
  });

  it("answers a host's last health check from the health job that ran on it", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ name: `checked-${tag.t}`, tags: tag });
    const s = await attach(c, host);
    open.push(s);
    await c.client(HealthService, admin.token).createHealthCheck({ healthCheck: { name: `smoke-${tag.t}`, image: image.ref, hostTags: tag } });
    const start = await s.waitFor((m) => m.payload.case === "startJob");
    const jobId = (start.payload.value as StartJob).jobId;
    await s.exit(jobId, 1, 0);
    await jobInState(c.sql, jobId, "finalized");
    const stats = await c.client(HostService, user.token).getHostStats({ host: { case: "hostId", value: host.id } });
    expect(stats.lastHealthCheck).toMatchObject({ jobId, passed: true });
    expect(stats.host?.health).toBe(HostHealth.HEALTHY);
    // Its timeline: checking while the check ran, then healthy by that job.
    expect(stats.healthChanges.map((e) => [e.health, e.jobId])).toEqual([
      [HostHealth.HEALTHY, jobId],
      [HostHealth.CHECKING, expect.any(String)],
    ]);
  });

  it("refuses GetHostStats without a token or with a token of the wrong kind, before reading the request", async () => {
    const host = await c.createHost();
    const service = await c.createServiceToken(admin.token);
    const ask = (token?: string) => c.client(HostService, token).getHostStats({ host: { case: "hostId", value: host.id } });
    expect(await codeOf(ask())).toBe("Unauthenticated");
    expect(await codeOf(c.client(HostService).getHostStats({ host: { case: "hostId", value: "not-a-uuid" } }))).toBe("Unauthenticated");
    expect(await codeOf(ask("tmu_not-a-token"))).toBe("Unauthenticated");
    expect(await codeOf(ask(service))).toBe("PermissionDenied");
    expect(await codeOf(ask(host.credential))).toBe("PermissionDenied");
    const hosts = c.client(HostService, user.token);
    expect(await codeOf(hosts.getHostStats({ host: { case: "hostId", value: "not-a-uuid" } }))).toBe("InvalidArgument");
    expect(await codeOf(hosts.getHostStats({}))).toBe("InvalidArgument");
    expect(await codeOf(hosts.getHostStats({ host: { case: "name", value: "no-such-host" } }))).toBe("NotFound");
  });

  it("lists only the hosts of one health, and refuses a health that is not one", async () => {
    const pool = uniqueTag();
    const [a, b, d] = [await c.createHost({ tags: pool }), await c.createHost({ tags: pool }), await c.createHost({ tags: pool })];
    await c.sql.begin((tx) => setHostHealth(tx, { hostId: a.id, health: "quarantined", reason: "failed its check", actor: "system" }));
    await c.sql.begin((tx) => setHostHealth(tx, { hostId: b.id, health: "healthy", reason: "", actor: "system" }));
    const hosts = c.client(HostService, user.token);
    const names = async (health: HostHealth) => (await hosts.listHosts({ filter: { tags: pool, health } })).hosts.map((h) => h.name);
    expect(await names(HostHealth.QUARANTINED)).toEqual([a.name]);
    expect(await names(HostHealth.HEALTHY)).toEqual([b.name]);
    expect(await names(HostHealth.UNKNOWN)).toEqual([d.name]);
    expect((await names(HostHealth.UNSPECIFIED)).sort()).toEqual([a.name, b.name, d.name].sort());
    const quarantined = await hosts.listHosts({ filter: { tags: pool, health: HostHealth.QUARANTINED } });
    expect(quarantined.hosts[0]).toMatchObject({ health: HostHealth.QUARANTINED, healthReason: "failed its check" });
    expect(await codeOf(hosts.listHosts({ filter: { health: 99 as HostHealth } }))).toBe("InvalidArgument");
  });
});
