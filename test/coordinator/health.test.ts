import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { HealthService } from "../../gen/treadmill/coordinator/v1/health_service_pb.js";
import { HostHealth } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { FinalizeReason, JobEventKind, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, attach, codeOf, insertImage, jobInState, uniqueTag, waitUntil } from "../support/jobs.js";

describe("host health", () => {
  let c: TestCoordinator;
  let image: string;
  let admin: { id: string; token: string };
  let user: { id: string; token: string };
  const open: ScriptedSupervisor[] = [];

  beforeAll(async () => {
    c = await startTestCoordinator({
      config: { ...FAST, healthSweepIntervalMs: 50, healthRetryInitialMs: 300, healthRetryMaxMs: 2000 },
    });
    image = (await insertImage(c.sql)).ref;
    admin = await c.createUser({ role: "admin" });
    user = await c.createUser();
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  const health = () => c.client(HealthService, admin.token);
  const jobs = (token = user.token) => c.client(JobService, token);

  async function hostWith(tags: Record<string, string>) {
    const host = await c.createHost({ tags });
    const s = await attach(c, host);
    open.push(s);
    return { host, s };
  }
  async function hostHealth(hostId: string): Promise<{ health: string; health_reason: string; infra_failures: number }> {
    const [row] = await c.sql<{ health: string; health_reason: string; infra_failures: number }[]>`
      select health, health_reason, infra_failures from hosts where id = ${hostId}`;
    return row;
  }
  function healthIs(hostId: string, state: string) {
    return waitUntil(async () => {
      const h = await hostHealth(hostId);
      return h.health === state ? h : undefined;
    }, `host ${hostId} to be ${state}`);
  }
  /** The next health job queued for the host after `after` (ids are ordered by time). */
  function healthJobOf(hostId: string, after = "") {
    return waitUntil(async () => {
      const [row] = await c.sql<{ id: string }[]>`
        select id from jobs where pinned_host_id = ${hostId} and id::text > ${after} order by id limit 1`;
      return row?.id;
    }, `a health job for host ${hostId}`);
  }
  async function check(name: string, tags: Record<string, string>, extra: Record<string, unknown> = {}) {
    const { healthCheck } = await health().createHealthCheck({ healthCheck: { name, image, hostTags: tags, ...extra } });
    return healthCheck!;
  }
  async function submit(tags: Record<string, string>, options: { queueAnyway?: boolean } = {}): Promise<string> {
    const { job } = await jobs().submitJob({ spec: { image, hosts: { tags } }, queueAnyway: options.queueAnyway });
    return job!.id;
  }
  /** Runs the host's next health job to the exit code given; returns its id. */
  async function runCheck(s: ScriptedSupervisor, hostId: string, exitCode: number, after = ""): Promise<string> {
    const id = await healthJobOf(hostId, after);
    await s.startJob(id);
    await s.exit(id, 1, exitCode);
    await jobInState(c.sql, id, "finalized");
    return id;
  }

  it("burns a host in at its first registration: CHECKING with its check queued, HEALTHY once the check passes", async () => {
    const tag = uniqueTag();
    const hc = await check("burn-in", tag);
    const { host, s } = await hostWith(tag);
    await healthIs(host.id, "checking");
    const id = await healthJobOf(host.id);
    const { job } = await jobs(admin.token).getJob({ jobId: id });
    expect(job).toMatchObject({ healthCheckId: hc.id, ownerUserId: admin.id });
    // No user job goes to a host under check.
    const userJob = await submit(tag);
    await s.startJob(id);
    await s.exit(id, 1, 0);
    await healthIs(host.id, "healthy");
    await s.startJob(userJob);
    // Health jobs are marked and can be listed apart.
    const listed = await jobs(admin.token).listJobs({ filter: { hostId: host.id, healthJobs: true } });
    expect(listed.jobs.map((j) => [j.id, j.healthCheckId])).toEqual([[id, hc.id]]);
    const others = await jobs(admin.token).listJobs({ filter: { hostId: host.id, healthJobs: false } });
    expect(others.jobs.map((j) => j.id)).toEqual([userJob]);
    const { host: h } = await c.client(HostService, user.token).getHost({ host: { case: "hostId", value: host.id } });
    expect(h?.health).toBe(HostHealth.HEALTHY);
  });

  it("quarantines a host after K infrastructure failures in a row, and sends user jobs to a healthy host instead", async () => {
    const tag = uniqueTag();
    const { host: a, s: sa } = await hostWith(tag);
    const failed: string[] = [];
    for (let i = 0; i < 3; i++) {
      const id = await submit(tag);
      await sa.startJob(id);
      await sa.terminate(id, 1, { reason: FinalizeReason.HOST_START_FAILURE, message: "flashing failed" });
      await jobInState(c.sql, id, "finalized");
      failed.push(id);
    }
    const quarantined = await healthIs(a.id, "quarantined");
    expect(quarantined.health_reason).toContain("3 infrastructure failures in a row");
    for (const id of failed) expect(quarantined.health_reason).toContain(id);
    const [event] = await c.sql`select actor, job_id from host_health_events where host_id = ${a.id} and health = 'quarantined'`;
    expect(event).toEqual({ actor: "system", job_id: failed[2] });
    const [audited] = await c.sql`select details from audit_events where host_id = ${a.id} and kind = 'host.health' order by at desc limit 1`;
    expect(audited.details).toMatchObject({ to: "quarantined", failedJobs: failed });
    // The job that decided says so on its timeline.
    const { job: decider } = await jobs().getJob({ jobId: failed[2] });
    const said = decider!.timeline.find((e) => e.kind === JobEventKind.HOST_HEALTH);
    expect(said?.message).toMatch(new RegExp(`^host ${a.name} is now quarantined: 3 infrastructure failures in a row`));

    // A healthy host joins: it takes the user jobs, the quarantined one none.
    const { s: sb } = await hostWith(tag);
    const next = [await submit(tag), await submit(tag)];
    for (const id of next) {
      await sb.startJob(id);
      await sb.exit(id, 1, 0);
      await jobInState(c.sql, id, "finalized");
    }
    expect(sa.received.filter((m) => m.payload.case === "startJob")).toHaveLength(3);
  });

  it("never counts a workload's own failure, and a success clears the failures in a row", async () => {
    const tag = uniqueTag();
    const { host, s } = await hostWith(tag);
    const run = async (end: "exit1" | "infra") => {
      const id = await submit(tag);
      await s.startJob(id);
      if (end === "exit1") await s.exit(id, 1, 1);
      else await s.terminate(id, 1, { reason: FinalizeReason.HOST_DROPPED, message: "" });
      await jobInState(c.sql, id, "finalized");
    };
    await run("infra");
    await run("infra");
    expect((await hostHealth(host.id)).infra_failures).toBe(2);
    for (let i = 0; i < 4; i++) await run("exit1");
    expect(await hostHealth(host.id)).toMatchObject({ health: "unknown", infra_failures: 0 });
    await run("infra");
    await run("infra");
    expect(await hostHealth(host.id)).toMatchObject({ health: "unknown", infra_failures: 2 });
  });

  it("quarantines a host whose check fails, retries the check with backoff, and returns the host when it passes", async () => {
    const tag = uniqueTag();
    await check("retried", tag);
    const { host, s } = await hostWith(tag);
    const burnIn = await runCheck(s, host.id, 1);
    const q = await healthIs(host.id, "quarantined");
    expect(q.health_reason).toContain(`health check retried failed (job ${burnIn}`);
    // The first retry comes by itself after the backoff; it fails too, the second passes.
    const retry1 = await runCheck(s, host.id, 1, burnIn);
    const [{ check_retries }] = await c.sql`select check_retries from hosts where id = ${host.id}`;
    expect(check_retries).toBe(1);
    await runCheck(s, host.id, 0, retry1);
    await healthIs(host.id, "healthy");
    const timeline = await c.sql`select health from host_health_events where host_id = ${host.id} order by id`;
    expect(timeline.map((r) => r.health)).toEqual(["checking", "quarantined", "healthy"]);
  });

  it("waits for an admin to return a quarantined host whose check passed when the check says so", async () => {
    const tag = uniqueTag();
    await check("needs-admin", tag, { returnNeedsAdmin: true });
    const { host, s } = await hostWith(tag);
    const burnIn = await runCheck(s, host.id, 1);
    await healthIs(host.id, "quarantined");
    await runCheck(s, host.id, 0, burnIn);
    await waitUntil(async () => (await hostHealth(host.id)).health_reason.includes("waits for an admin"), "the pass to be recorded");
    expect((await hostHealth(host.id)).health).toBe("quarantined");
    const { host: returned, jobs: queued } = await health().returnHost({ hostId: host.id });
    expect(returned?.health).toBe(HostHealth.CHECKING);
    expect(queued).toHaveLength(1);
    await s.startJob(queued[0].id);
    await s.exit(queued[0].id, 1, 0);
    await healthIs(host.id, "healthy");
  });

  it("runs health jobs ahead of the user jobs queued for their host", async () => {
    const tag = uniqueTag();
    await check("ahead", tag);
    const { host, s } = await hostWith(tag);
    await runCheck(s, host.id, 0);
    await healthIs(host.id, "healthy");
    const running = await submit(tag);
    await s.startJob(running);
    const waiting = [await submit(tag), await submit(tag)];
    const { jobs: queued } = await health().runHealthCheck({ hostId: host.id });
    expect(queued).toHaveLength(1);
    await s.exit(running, 1, 0);
    await s.startJob(queued[0].id);
    const starts = () => s.received.filter((m) => m.payload.case === "startJob").map((m) => (m.payload.value as { jobId: string }).jobId);
    expect(starts()).not.toContain(waiting[0]);
    await s.exit(queued[0].id, 1, 0);
    await s.startJob(waiting[0]);
    expect(starts().indexOf(queued[0].id)).toBeLessThan(starts().indexOf(waiting[0]));
    await s.exit(waiting[0], 1, 0);
    await s.startJob(waiting[1]);
    await s.exit(waiting[1], 1, 0);
  });

  it("runs a check on its schedule, and another after every N jobs", async () => {
    const scheduledTag = uniqueTag();
    await check("scheduled", scheduledTag, { interval: { seconds: 1n } });
    const { host: a, s: sa } = await hostWith(scheduledTag);
    const burnIn = await runCheck(sa, a.id, 0);
    await healthIs(a.id, "healthy");
    // The interval passes: the host goes CHECKING with the check queued again.
    await runCheck(sa, a.id, 0, burnIn);
    await healthIs(a.id, "healthy");

    const countedTag = uniqueTag();
    await check("every-2", countedTag, { everyJobs: 2 });
    const { host: b, s: sb } = await hostWith(countedTag);
    const first = await runCheck(sb, b.id, 0);
    await healthIs(b.id, "healthy");
    for (let i = 0; i < 2; i++) {
      const id = await submit(countedTag);
      await sb.startJob(id);
      await sb.exit(id, 1, 0);
      await jobInState(c.sql, id, "finalized");
    }
    const after = await healthIs(b.id, "checking");
    expect(after.health_reason).toContain("2 jobs since its last check");
    await runCheck(sb, b.id, 0, first);
    await healthIs(b.id, "healthy");
  });

  it("answers FAILED_PRECONDITION to a job only quarantined hosts match, saying why, and queues it when asked to", async () => {
    const tag = uniqueTag();
    const { host, s } = await hostWith(tag);
    // Quarantine never stops a running job.
    const running = await submit(tag);
    await s.startJob(running);
    await health().quarantineHost({ hostId: host.id, reason: "replacing its USB hub" });
    const err = await jobs()
      .submitJob({ spec: { image, hosts: { tags: tag } } })
      .catch((e: unknown) => ConnectError.from(e));
    expect(err).toBeInstanceOf(ConnectError);
    expect((err as ConnectError).code).toBe(Code.FailedPrecondition);
    expect((err as ConnectError).rawMessage).toContain(`${host.name} quarantined (quarantined by user:`);
    expect((err as ConnectError).rawMessage).toContain("replacing its USB hub");
    const queued = await submit(tag, { queueAnyway: true });
    await s.exit(running, 1, 0);
    expect(await jobInState(c.sql, running, "finalized")).toMatchObject({ reason: "workload_exited", exit_status: "success" });
    expect((await jobs().getJob({ jobId: queued })).job?.state).toBe(JobState.QUEUED);
    // Returned (no check applies): healthy at once, and the queued job runs.
    const { host: back } = await health().returnHost({ hostId: host.id });
    expect(back?.health).toBe(HostHealth.HEALTHY);
    await s.startJob(queued);
    await s.exit(queued, 1, 0);
  });

  it("answers FAILED_PRECONDITION naming an offline or disabled host, and queues a job a host under check will take", async () => {
    const tag = uniqueTag();
    const offline = await c.createHost({ tags: tag });
    const disabled = await hostWith(tag);
    await c.sql`update hosts set admin_state = 'disabled', admin_state_reason = 'bench repair' where id = ${disabled.host.id}`;
    const err = ConnectError.from(await jobs().submitJob({ spec: { image, hosts: { tags: tag } } }).catch((e: unknown) => e));
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(err.rawMessage).toContain(`${offline.name} offline`);
    expect(err.rawMessage).toContain(`${disabled.host.name} disabled (bench repair)`);
    // A third host running its burn-in: the job waits for it.
    await check("soon", { ...tag, soon: "yes" });
    const { host: checking } = await hostWith({ ...tag, soon: "yes" });
    await healthIs(checking.id, "checking");
    const queued = await submit(tag);
    expect((await jobs().getJob({ jobId: queued })).job?.state).toBe(JobState.QUEUED);
    await jobs().cancelJob({ jobId: queued });
  });

  it("retires a host for good and keeps its history", async () => {
    const tag = uniqueTag();
    const { host, s } = await hostWith(tag);
    const done = await submit(tag);
    await s.startJob(done);
    await s.exit(done, 1, 0);
    await jobInState(c.sql, done, "finalized");
    const { host: retired } = await health().retireHost({ hostId: host.id, reason: "end of life" });
    expect(retired).toMatchObject({ health: HostHealth.RETIRED, healthReason: expect.stringContaining("end of life") });
    expect(await codeOf(jobs().submitJob({ spec: { image, hosts: { tags: tag } } }))).toBe("FailedPrecondition");
    expect(await codeOf(health().returnHost({ hostId: host.id }))).toBe("FailedPrecondition");
    const listed = await jobs(admin.token).listJobs({ filter: { hostId: host.id } });
    expect(listed.jobs.map((j) => j.id)).toEqual([done]);
    const timeline = await c.sql`select health, reason from host_health_events where host_id = ${host.id}`;
    expect(timeline).toEqual([{ health: "retired", reason: expect.stringContaining("end of life") }]);
  });

  it("validates health checks and names the field", async () => {
    const bad = async (hc: Record<string, unknown>) => {
      const e = await health()
        .createHealthCheck({ healthCheck: { name: "ok-name", image, ...hc } })
        .catch((x: unknown) => ConnectError.from(x));
      return e instanceof ConnectError ? `${Code[e.code]} ${e.rawMessage}` : "ok";
    };
    expect(await bad({ name: "Bad Name" })).toMatch(/^InvalidArgument health_check.name/);
    expect(await bad({ image: "" })).toMatch(/^InvalidArgument health_check.image/);
    expect(await bad({ image: "missing:v1" })).toMatch(/^NotFound image missing:v1/);
    expect(await bad({ parameters: [{ name: "TOKEN", value: "x", secret: true }] })).toMatch(/^InvalidArgument health_check.parameters/);
    expect(await bad({ interval: { nanos: 1_000_000 } })).toMatch(/^InvalidArgument health_check.interval/);
    expect(await bad({ quarantineAfterFailures: 101 })).toMatch(/^InvalidArgument health_check.quarantine_after_failures/);
    expect(await bad({ everyJobs: -1 })).toMatch(/^InvalidArgument health_check.every_jobs/);
    await check("dup", uniqueTag());
    expect(await bad({ name: "dup" })).toMatch(/^AlreadyExists health check dup/);
  });

  it("lists, gets, updates and deletes health checks", async () => {
    const hc = await check("crud", uniqueTag(), { quarantineAfterFailures: 5, description: "smoke test" });
    expect(hc).toMatchObject({ quarantineAfterFailures: 5, ownerUserId: admin.id, description: "smoke test" });
    const { healthCheck: byName } = await c.client(HealthService, user.token).getHealthCheck({ healthCheck: { case: "name", value: "crud" } });
    expect(byName?.id).toBe(hc.id);
    const { healthCheck: updated } = await health().updateHealthCheck({
      healthCheckId: hc.id,
      healthCheck: { everyJobs: 7, quarantineAfterFailures: 0, hostTags: { rack: "b" }, parameters: [{ name: "LEVEL", value: "full" }] },
      updateMask: { paths: ["every_jobs", "quarantine_after_failures", "host_tags", "parameters"] },
    });
    expect(updated).toMatchObject({ everyJobs: 7, quarantineAfterFailures: 3, description: "smoke test", hostTags: { rack: "b" } });
    expect(updated?.parameters.map((p) => [p.name, p.value])).toEqual([["LEVEL", "full"]]);
    const listed = await c.client(HealthService, user.token).listHealthChecks({});
    expect(listed.healthChecks.map((x) => x.name)).toContain("crud");
    await health().deleteHealthCheck({ healthCheckId: hc.id });
    expect(await codeOf(health().getHealthCheck({ healthCheck: { case: "healthCheckId", value: hc.id } }))).toBe("NotFound");
  });

  it("refuses every HealthService RPC without a token or with a credential of the wrong scope, and every change to a user or another user", async () => {
    const tag = uniqueTag();
    const target = await c.createHost({ tags: tag });
    const hc = await check("guarded", tag);
    const service = await c.createServiceToken(admin.token);
    const other = await c.createUser();
    const calls = (token?: string) => {
      const h = c.client(HealthService, token);
      return {
        createHealthCheck: () => h.createHealthCheck({ healthCheck: { name: "x-new", image } }),
        listHealthChecks: () => h.listHealthChecks({}),
        getHealthCheck: () => h.getHealthCheck({ healthCheck: { case: "healthCheckId", value: hc.id } }),
        updateHealthCheck: () => h.updateHealthCheck({ healthCheckId: hc.id, healthCheck: { everyJobs: 1 }, updateMask: { paths: ["every_jobs"] } }),
        deleteHealthCheck: () => h.deleteHealthCheck({ healthCheckId: hc.id }),
        runHealthCheck: () => h.runHealthCheck({ hostId: target.id }),
        quarantineHost: () => h.quarantineHost({ hostId: target.id }),
        returnHost: () => h.returnHost({ hostId: target.id }),
        retireHost: () => h.retireHost({ hostId: target.id }),
      };
    };
    const reads = new Set(["listHealthChecks", "getHealthCheck"]);
    for (const [name, call] of Object.entries(calls())) expect([name, await codeOf(call())]).toEqual([name, "Unauthenticated"]);
    // A service token (an admin's, of scope service) and a host credential: the wrong kinds.
    for (const wrong of [service, target.credential]) {
      for (const [name, call] of Object.entries(calls(wrong))) expect([name, await codeOf(call())]).toEqual([name, "PermissionDenied"]);
    }
    for (const token of [user.token, other.token]) {
      for (const [name, call] of Object.entries(calls(token))) {
        expect([name, await codeOf(call())]).toEqual([name, reads.has(name) ? "OK" : "PermissionDenied"]);
      }
    }
    // Nothing changed.
    expect((await hostHealth(target.id)).health).not.toBe("retired");
    expect((await health().getHealthCheck({ healthCheck: { case: "healthCheckId", value: hc.id } })).healthCheck?.everyJobs).toBe(0);
  });
});
