/**
 * Hold on failure (issue #22, JobSpec.hold_on_failure) on the coordinator's
 * side, with a scripted supervisor and real PostgreSQL: validation,
 * StartJob's flag, the hold lease a HELD report creates, the sweep leaving
 * a held job alone, and the end of the hold (the workload's exit stands,
 * the lease ends, the host goes back).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { type Client } from "@connectrpc/connect";
import { FinalizeReason, JobEventKind, JobStage, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LeaseEndReason, LeaseKind, LeaseService, LeaseState } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { jobTimedOut } from "../../coordinator/db/queries/jobs.js";
import { settleEnd } from "../../coordinator/jobs/reconciliation.js";
import { holdRefusal } from "../../coordinator/jobs/holds.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, attach, codeOf, insertImage, jobInState, jobRow, uniqueTag, waitUntil } from "../support/jobs.js";

describe("hold on failure in the coordinator", () => {
  let c: TestCoordinator;
  let alice: { id: string; token: string };
  let image: { ref: string; digest: string };
  let jobs: Client<typeof JobService>;
  const open: ScriptedSupervisor[] = [];

  beforeAll(async () => {
    c = await startTestCoordinator({ config: { ...FAST, leaseMaxDurationMs: 3600_000, leaseMaxConcurrentPerUser: 2 } });
    alice = await c.createUser();
    image = await insertImage(c.sql);
    jobs = c.client(JobService, alice.token);
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  /** A job of alice's with a hold of 10 minutes, running on a host of its own. */
  async function runningHeldJob(hold = true) {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = await attach(c, host);
    open.push(s);
    const { job } = await jobs.submitJob({
      spec: { image: image.ref, hosts: { tags: tag }, ...(hold ? { holdOnFailure: { seconds: 600n } } : {}) },
    });
    const start = await s.startJob(job!.id);
    await s.report(job!.id, 1, JobState.RUNNING);
    await jobInState(c.sql, job!.id, "running");
    return { jobId: job!.id, host, s, start };
  }

  /** Job `jobId` once it has its hold lease. */
  const heldJob = (jobId: string) =>
    waitUntil(async () => {
      const { job } = await jobs.getJob({ jobId });
      return job?.leaseId ? job : undefined;
    }, "the job's hold lease");

  it("refuses a hold_on_failure that is not positive or longer than the policy allows, naming the field", async () => {
    const spec = (seconds: bigint) => ({ spec: { image: image.ref, holdOnFailure: { seconds } } });
    expect(await codeOf(jobs.submitJob(spec(0n)))).toBe("InvalidArgument");
    expect(await codeOf(jobs.submitJob(spec(-5n)))).toBe("InvalidArgument");
    await expect(jobs.submitJob(spec(7200n))).rejects.toThrow(/spec\.hold_on_failure must be at most 3600000 ms/);
    const twoHosts = jobs.submitJob({ spec: { image: image.ref, hosts: { hostCount: 2 }, holdOnFailure: { seconds: 60n } } });
    await expect(twoHosts).rejects.toThrow(/spec\.hold_on_failure is only for jobs of one host/);
  });

  it("asks the supervisor to hold a job whose spec has hold_on_failure, and no other", async () => {
    const held = await runningHeldJob(true);
    const plain = await runningHeldJob(false);
    expect(held.start.holdOnFailure).toBe(true);
    expect(plain.start.holdOnFailure).toBe(false);
    await held.s.exit(held.jobId, 1, 0);
    await plain.s.exit(plain.jobId, 1, 0);
    await jobInState(c.sql, held.jobId, "finalized");
  });

  it("gives a job reported HELD an active hold lease of its owner over its host, and a LEASE event that says how to attach and release", async () => {
    const { jobId, host, s } = await runningHeldJob();
    await s.hold(jobId, 1, 3);
    const lease = await waitUntil(async () => {
      const [row] = await c.sql<{ id: string; owner_id: string; kind: string; state: string; host_count: number; grace_ms: number; hold_ms: number }[]>`
        select id, owner_id, kind, state, host_count, grace_ms,
          extract(epoch from ends_at - starts_at) * 1000 as hold_ms
        from leases where held_job_id = ${jobId}`;
      return row;
    }, "the hold lease");
    expect(lease).toMatchObject({ owner_id: alice.id, kind: "hold", state: "active", host_count: 1, grace_ms: 300_000 });
    expect(Math.round(Number(lease.hold_ms))).toBe(600_000);
    const [h] = await c.sql<{ lease_id: string; booked: boolean }[]>`select lease_id, booked_from is not null as booked from hosts where id = ${host.id}`;
    expect(h).toEqual({ lease_id: lease.id, booked: true });
    const [lh] = await c.sql`select host_id, host_index, open from lease_hosts where lease_id = ${lease.id}`;
    expect(lh).toMatchObject({ host_id: host.id, host_index: 0, open: true });
    expect((await c.sql`select lease_id from jobs where id = ${jobId}`)[0].lease_id).toBe(lease.id);

    const { job } = await jobs.getJob({ jobId });
    expect(job).toMatchObject({ state: JobState.RUNNING, stage: JobStage.HELD });
    const event = job!.timeline.find((e) => e.kind === JobEventKind.LEASE);
    expect(event?.message).toContain(`lease ${lease.id}`);
    expect(event?.message).toContain(`tml console ${jobId}`);
    expect(event?.message).toContain(`tml lease release ${lease.id}`);
    expect(event?.message).toContain(`tml lease renew ${lease.id}`);

    // Said again (a hello after a reconnect): no second lease.
    await s.hold(jobId, 1, 3);
    expect((await c.sql`select count(*)::int as n from leases where held_job_id = ${jobId}`)[0].n).toBe(1);
  });

  it("leaves a held job past its deadline to its lease, and ends it on cancel with its workload's exit code, the lease released and the host free", async () => {
    const { jobId, host, s } = await runningHeldJob();
    await s.hold(jobId, 1, 3);
    await waitUntil(async () => (await c.sql`select 1 from leases where held_job_id = ${jobId}`).length > 0, "the hold lease");
    await c.sql`update jobs set deadline_at = now() - interval '1 minute' where id = ${jobId}`;
    expect((await jobTimedOut(c.sql, 1000)).map((r) => r.id)).not.toContain(jobId);
    expect((await jobRow(c.sql, jobId)).stop_reason).toBeNull();

    await jobs.cancelJob({ jobId, message: "post-mortem done" });
    // The only stop is the cancel's, not a job timeout's; the supervisor ends the hold with the workload's exit.
    const stop = await s.waitFor((m) => m.payload.case === "stopJob" && m.payload.value.jobId === jobId, { includePast: true });
    expect(stop.payload.value).toMatchObject({ reason: FinalizeReason.CANCELED });
    const done = await jobInState(c.sql, jobId, "finalized");
    expect(done).toMatchObject({ reason: "workload_exited", exit_status: "failure", exit_code: 3 });
    const [lease] = await c.sql`select id, state, end_reason from leases where held_job_id = ${jobId}`;
    expect(lease).toMatchObject({ state: "ended", end_reason: "released" });
    expect((await c.sql`select open from lease_hosts where lease_id = ${lease.id}`)[0].open).toBe(false);
    expect((await c.sql`select lease_id, booked_from from hosts where id = ${host.id}`)[0]).toEqual({ lease_id: null, booked_from: null });
    expect((await c.sql`select kind from lease_events where lease_id = ${lease.id} order by seq`).map((e) => e.kind)).toEqual(["active", "ended"]);
    const { job } = await jobs.getJob({ jobId });
    expect(job).toMatchObject({ finalizeReason: FinalizeReason.WORKLOAD_EXITED, exitCode: 3 });
  });

  it("ends a held job when its owner releases its lease: the workload's exit code stands, the host goes back", async () => {
    const { jobId, host, s } = await runningHeldJob();
    await s.hold(jobId, 1, 6);
    const job = await heldJob(jobId);
    const { lease } = await c.client(LeaseService, alice.token).releaseLease({ leaseId: job.leaseId });
    expect(lease).toMatchObject({ kind: LeaseKind.HOLD, state: LeaseState.ENDED, endReason: LeaseEndReason.RELEASED, heldJobId: jobId });
    const done = await jobInState(c.sql, jobId, "finalized");
    expect(done).toMatchObject({ reason: "workload_exited", exit_status: "failure", exit_code: 6 });
    expect((await c.sql`select lease_id from hosts where id = ${host.id}`)[0].lease_id).toBeNull();
    const { job: after } = await jobs.getJob({ jobId });
    expect(after!.timeline.filter((e) => e.kind === JobEventKind.LEASE).map((e) => e.message)).toEqual([
      expect.stringContaining(`held for a post-mortem as lease ${job.leaseId}`),
      expect.stringContaining(`lease ${job.leaseId} released`),
    ]);
  });

  it("releases a hold lease whose job ended while another transaction held the lease's row, at the keeper's next sweep", async () => {
    const { jobId, host, s } = await runningHeldJob();
    await s.hold(jobId, 1, 4);
    const job = await heldJob(jobId);
    const leaseId = job.leaseId;
    // The lease's row locked (as by a RenewLease) while the job ends: its end skips the lease.
    const locker = await c.sql.reserve();
    try {
      await locker`begin`;
      await locker`update leases set keepalive_at = now() where id = ${leaseId}`;
      await jobs.cancelJob({ jobId });
      expect(await jobInState(c.sql, jobId, "finalized")).toMatchObject({ reason: "workload_exited", exit_code: 4 });
      expect((await c.sql`select state from leases where id = ${leaseId}`)[0].state).toBe("active");
      await locker`commit`;
    } finally {
      locker.release();
    }
    const { lease } = await waitUntil(async () => {
      const got = await c.client(LeaseService, alice.token).getLease({ leaseId });
      return got.lease?.state === LeaseState.ENDED ? got : undefined;
    }, "the keeper to end the hold lease");
    expect(lease).toMatchObject({ endReason: LeaseEndReason.RELEASED, statusMessage: `its held job ${jobId} ended` });
    expect((await c.sql`select lease_id from hosts where id = ${host.id}`)[0].lease_id).toBeNull();
  });

  it("ends the hold lease of a held job whose host came back without it, and runs the next attempt outside the lease", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = await attach(c, host);
    const { job } = await jobs.submitJob({ spec: { image: image.ref, hosts: { tags: tag }, holdOnFailure: { seconds: 600n }, restartPolicy: { maxRestarts: 1 } } });
    const jobId = job!.id;
    await s.startJob(jobId);
    await s.report(jobId, 1, JobState.RUNNING);
    await s.hold(jobId, 1, 3);
    const lease = await waitUntil(async () => (await c.sql<{ id: string }[]>`select id from leases where held_job_id = ${jobId}`)[0], "the hold lease");
    await s.close();
    // The supervisor came back without the job (it restarted): HOST_DROPPED, and a new attempt.
    const again = await attach(c, host);
    open.push(again);
    await again.startJob(jobId);
    expect(await jobRow(c.sql, jobId)).toMatchObject({ attempt: 2 });
    expect((await c.sql`select state, end_reason from leases where id = ${lease.id}`)[0]).toEqual({ state: "ended", end_reason: "released" });
    expect((await c.sql`select lease_id from jobs where id = ${jobId}`)[0].lease_id).toBeNull();
    expect((await c.sql`select lease_id from hosts where id = ${host.id}`)[0].lease_id).toBeNull();
  });

  it("does not hold a job beyond its owner's lease limits: it is stopped, says why, and ends with its workload's exit", async () => {
    const carol = await c.createUser();
    const asCarol = c.client(JobService, carol.token);
    const held: string[] = [];
    for (let i = 0; i < 3; i++) {
      const tag = uniqueTag();
      const host = await c.createHost({ tags: tag });
      const s = await attach(c, host);
      open.push(s);
      const { job } = await asCarol.submitJob({ spec: { image: image.ref, hosts: { tags: tag }, holdOnFailure: { seconds: 600n } } });
      await s.startJob(job!.id);
      await s.report(job!.id, 1, JobState.RUNNING);
      await s.hold(job!.id, 1, 9);
      held.push(job!.id);
    }
    // Two leases are carol's most: the third job is not held.
    const done = await jobInState(c.sql, held[2], "finalized");
    expect(done).toMatchObject({ reason: "workload_exited", exit_code: 9 });
    const { job } = await asCarol.getJob({ jobId: held[2] });
    expect(job!.timeline.find((e) => e.kind === JobEventKind.LEASE)?.message).toBe(
      "not held: its owner has 2 leases open, the most allowed; resetting its hosts",
    );
    expect((await c.sql`select count(*)::int as n from leases where owner_id = ${carol.id} and state = 'active'`)[0].n).toBe(2);
    for (const jobId of held.slice(0, 2)) await asCarol.cancelJob({ jobId });
  });

  it("counts a hold against its owner's host-hours a day, and exempts admins", () => {
    const policy = { leaseMaxDurationMs: 86_400_000, leaseGraceDefaultMs: 300_000, leaseMaxConcurrentPerUser: 10, leaseMaxHostHoursPerDay: 4 };
    const now = new Date("2026-12-07T10:00:00Z");
    const spans = [{ starts_at: new Date("2026-12-07T08:00:00Z"), ends_at: new Date("2026-12-07T11:00:00Z"), host_count: 1 }];
    const user = { admin: false, open: 1, spans };
    expect(holdRefusal(policy, user, 1, now, 3600_000)).toBeUndefined();
    expect(holdRefusal(policy, user, 1, now, 2 * 3600_000)).toBe("it would take its owner's leases to 5.0 host-hours on 2026-12-07, more than 4");
    expect(holdRefusal(policy, { ...user, admin: true }, 1, now, 2 * 3600_000)).toBeUndefined();
  });

  it("lets a requested stop win over a workload's exit, unless the job was held", () => {
    const head = { id: "j", owner_id: "o", state: "running" as const, stage: null, attempt: 1, max_restarts: 0, stop_reason: "canceled" as const, health_check_id: null };
    const exit = { reason: "workload_exited" as const, exitStatus: "failure" as const, exitCode: 3, message: "exited 3" };
    expect(settleEnd(head, 1, exit)).toMatchObject({ outcome: "finalized", reason: "canceled", exitCode: 3 });
    expect(settleEnd(head, 1, { ...exit, held: true })).toMatchObject({ outcome: "finalized", reason: "workload_exited", exitStatus: "failure", exitCode: 3 });
  });

  it("refuses to let another user's held job be canceled", async () => {
    const { jobId, s } = await runningHeldJob();
    await s.hold(jobId, 1, 3);
    const mallory = await c.createUser();
    expect(await codeOf(c.client(JobService, mallory.token).cancelJob({ jobId }))).toMatch(/NotFound|PermissionDenied/);
    expect((await jobRow(c.sql, jobId)).stage).toBe("held");
  });
});
