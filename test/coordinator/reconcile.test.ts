/**
 * Every row of DESIGN.md §4's reconciliation table, driven through real
 * Attach streams: a supervisor attaches, the job reaches the state the row
 * needs, the supervisor goes away, and a new stream says hello with the
 * supervisor's side of the row.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { ExitStatus, FinalizeReason, JobStage, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import type { StopJob } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { HeldAttempt, ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, attach, insertImage, jobInState, jobRow, uniqueTag, waitUntil } from "../support/jobs.js";

interface Fixture {
  c: TestCoordinator;
  token: string;
  image: string;
  open: ScriptedSupervisor[];
}

async function setup(config: Parameters<typeof startTestCoordinator>[0] = {}): Promise<Fixture> {
  const c = await startTestCoordinator(config);
  const user = await c.createUser();
  const image = await insertImage(c.sql);
  return { c, token: user.token, image: image.ref, open: [] };
}

/** A host, a supervisor on it and a job it holds in `until` state (manual supervisor, still attached). */
async function jobOnHost(f: Fixture, until: "assigned" | "running", spec: { maxRestarts?: number } = {}) {
  const tag = uniqueTag();
  const host = await f.c.createHost({ tags: tag });
  const s = await attach(f.c, host);
  f.open.push(s);
  const { job } = await f.c.client(JobService, f.token).submitJob({
    spec: { image: f.image, hosts: { tags: tag }, restartPolicy: { maxRestarts: spec.maxRestarts ?? 0 } },
  });
  const jobId = job!.id;
  await s.startJob(jobId);
  if (until === "running") {
    await s.report(jobId, 1, JobState.RUNNING);
    await jobInState(f.c.sql, jobId, "running");
  }
  return { host, s, jobId };
}

/** The supervisor process "restarts": a new stream whose hello holds `held`. */
async function reattach(f: Fixture, host: { id: string; credential: string }, held: HeldAttempt[]) {
  const s = await attach(f.c, host, { held });
  f.open.push(s);
  return s;
}

const running = (jobId: string, attempt = 1): HeldAttempt => ({ jobId, attempt, state: JobState.RUNNING, stage: JobStage.UNSPECIFIED });

describe("reconciliation on attach (DESIGN.md §4)", () => {
  let f: Fixture;
  beforeAll(async () => {
    f = await setup({ config: { ...FAST, supervisorGraceMs: 600_000 } });
  });
  afterAll(async () => {
    await Promise.all(f.open.map((s) => s.close()));
    await f.c?.stop();
  });

  it("job K not assigned to this host, supervisor holds K: StopJob K", async () => {
    const host = await f.c.createHost();
    const stray = randomUUID();
    // Also a real job, assigned to another host.
    const other = await jobOnHost(f, "running");
    const s = await reattach(f, host, [running(stray), running(other.jobId)]);
    const stops = await waitUntil(async () => {
      const got = s.received.filter((m) => m.payload.case === "stopJob").map((m) => m.payload.value as StopJob);
      return got.length >= 2 ? got : undefined;
    }, "two StopJob");
    expect(stops.map((x) => x.jobId).sort()).toEqual([stray, other.jobId].sort());
    expect(stops.every((x) => x.reason === FinalizeReason.INTERNAL_ERROR)).toBe(true);
    // The other host's job is untouched.
    expect((await jobRow(f.c.sql, other.jobId)).state).toBe("running");
  });

  it("J assigned, not yet started, supervisor does not hold J: StartJob J again", async () => {
    const tag = uniqueTag();
    const host = await f.c.createHost({ tags: tag });
    const silent = await attach(f.c, host, { silent: true });
    f.open.push(silent);
    const { job } = await f.c.client(JobService, f.token).submitJob({ spec: { image: f.image, hosts: { tags: tag } } });
    const first = await silent.startJob(job!.id);
    await silent.close();
    const s = await reattach(f, host, []);
    const again = await s.startJob(job!.id);
    expect(again.attempt).toBe(first.attempt);
    expect(again.requestId).not.toBe(first.requestId);
    expect((await jobRow(f.c.sql, job!.id)).state).toBe("assigned");
  });

  it("J assigned or running, supervisor holds J not terminated: adopts the reported state", async () => {
    const a = await jobOnHost(f, "running");
    await a.s.close();
    const s = await reattach(f, a.host, [running(a.jobId)]);
    // Assigned in the database, initializing on the host: adopted.
    const b = await jobOnHost(f, "assigned");
    await b.s.close();
    const s2 = await reattach(f, b.host, [{ jobId: b.jobId, attempt: 1, state: JobState.INITIALIZING, stage: JobStage.PROVISIONING }]);
    const row = await jobInState(f.c.sql, b.jobId, "initializing");
    expect(row.stage).toBe("provisioning");
    expect((await jobRow(f.c.sql, a.jobId)).state).toBe("running");
    // Nothing is started again, nothing stopped.
    await s.report(a.jobId, 1, JobState.RUNNING);
    expect(s.received.some((m) => m.payload.case === "startJob" || m.payload.case === "stopJob")).toBe(false);
    expect(s2.received.some((m) => m.payload.case === "startJob" || m.payload.case === "stopJob")).toBe(false);
    await s.exit(a.jobId, 1);
    expect(await jobInState(f.c.sql, a.jobId, "finalized")).toMatchObject({ reason: "workload_exited", exit_status: "success" });
  });

  it("J running, supervisor does not hold J: finalized HOST_DROPPED, or restarted when the policy allows", async () => {
    const a = await jobOnHost(f, "running");
    await a.s.close();
    await reattach(f, a.host, []);
    expect(await jobInState(f.c.sql, a.jobId, "finalized")).toMatchObject({ reason: "host_dropped", attempt: 1 });

    const b = await jobOnHost(f, "running", { maxRestarts: 1 });
    await b.s.close();
    const s = await reattach(f, b.host, []);
    // A new attempt of the same job, placed again (on the same host: it is the only match).
    const start = await s.waitFor((m) => m.payload.case === "startJob" && m.payload.value.jobId === b.jobId);
    expect((start.payload.value as { attempt: number }).attempt).toBe(2);
    const row = await jobRow(f.c.sql, b.jobId);
    expect(row.attempt).toBe(2);
    expect(row.state).not.toBe("finalized");
    const timeline = await f.c.client(JobService, f.token).getJob({ jobId: b.jobId });
    expect(timeline.job!.timeline.some((e) => e.message.includes("host_dropped"))).toBe(true);
  });

  it("J cancel or timeout requested, supervisor holds J not terminated: StopJob J again", async () => {
    const a = await jobOnHost(f, "running");
    await a.s.close();
    const canceled = await f.c.client(JobService, f.token).cancelJob({ jobId: a.jobId, message: "enough" });
    expect(canceled.job!.cancelRequested).toBe(true);
    const s = await reattach(f, a.host, [running(a.jobId)]);
    const stop = await s.waitFor((m) => m.payload.case === "stopJob" && m.payload.value.jobId === a.jobId);
    expect((stop.payload.value as StopJob).reason).toBe(FinalizeReason.CANCELED);
    // The scripted supervisor stops it and reports CANCELED.
    expect(await jobInState(f.c.sql, a.jobId, "finalized")).toMatchObject({ reason: "canceled" });
    await waitUntil(async () => s.held.size === 0, "the terminal report to be acknowledged");
  });

  it("J cancel requested, supervisor reports J terminated: finalized with the requested reason", async () => {
    const a = await jobOnHost(f, "running");
    await a.s.close();
    await f.c.client(JobService, f.token).cancelJob({ jobId: a.jobId });
    const s = await reattach(f, a.host, [
      {
        ...running(a.jobId),
        state: JobState.TERMINATING,
        termination: { reason: FinalizeReason.WORKLOAD_EXITED, exitStatus: ExitStatus.SUCCESS, exitCode: 0, message: "done" },
      },
    ]);
    expect(await jobInState(f.c.sql, a.jobId, "finalized")).toMatchObject({ reason: "canceled", exit_status: null });
    const ack = await s.waitFor((m) => m.payload.case === "ackReport", { includePast: true });
    expect(ack.payload.value).toMatchObject({ jobId: a.jobId, attempt: 1, terminal: true });
    await waitUntil(async () => s.held.size === 0, "the retained report to be dropped");
  });

  it("J running, supervisor reports J terminated: finalized WORKLOAD_EXITED with the exit status, acknowledged", async () => {
    const a = await jobOnHost(f, "running");
    await a.s.close();
    const s = await reattach(f, a.host, [
      {
        ...running(a.jobId),
        state: JobState.TERMINATING,
        termination: { reason: FinalizeReason.WORKLOAD_EXITED, exitStatus: ExitStatus.FAILURE, exitCode: 3, message: "exit 3" },
      },
    ]);
    expect(await jobInState(f.c.sql, a.jobId, "finalized")).toMatchObject({
      reason: "workload_exited",
      exit_status: "failure",
      exit_code: 3,
    });
    await s.waitFor((m) => m.payload.case === "ackReport" && m.payload.value.terminal, { includePast: true });
    const [slot] = await f.c.sql`select released_at from job_hosts where job_id = ${a.jobId}`;
    expect(slot.released_at).not.toBeNull();
  });
});

describe("the grace period of a detached host", () => {
  let f: Fixture;
  beforeAll(async () => {
    f = await setup({ config: { ...FAST, supervisorGraceMs: 300 } });
  });
  afterAll(async () => {
    await Promise.all(f.open.map((s) => s.close()));
    await f.c?.stop();
  });

  it("finalizes a detached host's job HOST_DROPPED after the grace period", async () => {
    const a = await jobOnHost(f, "running");
    await a.s.close();
    expect(await jobInState(f.c.sql, a.jobId, "finalized")).toMatchObject({ reason: "host_dropped" });
  });

  it("J finalized, supervisor reports J terminated (report retained): acknowledged, the slot becomes free, the job never changes", async () => {
    const a = await jobOnHost(f, "running");
    await a.s.close();
    await jobInState(f.c.sql, a.jobId, "finalized");
    const [before] = await f.c.sql`select released_at from job_hosts where job_id = ${a.jobId}`;
    expect(before.released_at).toBeNull();
    const s = await reattach(f, a.host, [
      {
        ...running(a.jobId),
        state: JobState.TERMINATING,
        termination: { reason: FinalizeReason.WORKLOAD_EXITED, exitStatus: ExitStatus.SUCCESS, exitCode: 0, message: "late" },
      },
    ]);
    await s.waitFor((m) => m.payload.case === "ackReport" && m.payload.value.jobId === a.jobId, { includePast: true });
    await waitUntil(async () => {
      const [slot] = await f.c.sql`select released_at from job_hosts where job_id = ${a.jobId}`;
      return slot.released_at !== null;
    }, "the slot to be released");
    expect(await jobRow(f.c.sql, a.jobId)).toMatchObject({ state: "finalized", reason: "host_dropped", exit_status: null });
    // The free slot takes a new job.
    const tag = (await f.c.sql`select tags from hosts where id = ${a.host.id}`)[0].tags;
    const { job } = await f.c.client(JobService, f.token).submitJob({ spec: { image: f.image, hosts: { tags: tag } } });
    await s.startJob(job!.id);
  });

  it("a host back within the grace period keeps its running job", async () => {
    const slow = await setup({ config: { ...FAST, supervisorGraceMs: 600_000 } });
    try {
      const a = await jobOnHost(slow, "running");
      await a.s.close();
      const s = await reattach(slow, a.host, [running(a.jobId)]);
      await s.exit(a.jobId, 1);
      expect(await jobInState(slow.c.sql, a.jobId, "finalized")).toMatchObject({ reason: "workload_exited" });
    } finally {
      await Promise.all(slow.open.map((s) => s.close()));
      await slow.c.stop();
    }
  });
});
