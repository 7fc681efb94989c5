import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { FinalizeReason, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import type { StartJob, StopJob } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import {
  FAST,
  QCOW2,
  ROOTFS,
  type SpecInit,
  attach,
  codeOf,
  insertImage,
  passProbe,
  jobInState,
  jobRow,
  uniqueTag,
  waitUntil,
} from "../support/jobs.js";

describe("the scheduler", () => {
  let c: TestCoordinator;
  let image: string;
  let qcowImage: string;
  const open: ScriptedSupervisor[] = [];
  let probeRun: () => Promise<void>;

  beforeAll(async () => {
    // Aging at its default (a point per 10 minutes); two jobs at once per user.
    c = await startTestCoordinator({ config: { ...FAST, schedulerAgingMs: 600_000, maxJobsPerUser: 2 } });
    image = (await insertImage(c.sql)).ref;
    qcowImage = (await insertImage(c.sql, { mediaTypes: [QCOW2] })).ref;
    probeRun = await passProbe(c, image, open);
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  async function hostWith(options: Parameters<TestCoordinator["createHost"]>[0], supervisor: Parameters<typeof attach>[2] = {}) {
    const host = await c.createHost(options);
    const s = await attach(c, host, supervisor);
    open.push(s);
    return { host, s };
  }
  async function submit(token: string, spec: SpecInit): Promise<string> {
    const { job } = await c.client(JobService, token).submitJob({ spec: { image, ...spec } });
    return job!.id;
  }
  const hostsOf = async (jobId: string, attempt = 1) =>
    (await c.sql<{ host_id: string }[]>`select host_id from job_hosts where job_id = ${jobId} and attempt = ${attempt} order by host_index`).map(
      (r) => r.host_id,
    );

  it("places a job only on a host carrying every required tag, its site and driver", async () => {
    const user = await c.createUser();
    const tag = uniqueTag();
    const x = await hostWith({ tags: { ...tag, board: "x" }, site: "lab-a" });
    const y = await hostWith({ tags: { ...tag, board: "y" }, site: "lab-b" });
    const onY = await submit(user.token, { hosts: { tags: { ...tag, board: "y" } } });
    await y.s.startJob(onY);
    const bySite = await submit(user.token, { hosts: { tags: { ...tag, site: "lab-a" } } });
    await x.s.startJob(bySite);
    expect(await hostsOf(onY)).toEqual([y.host.id]);
    expect(await hostsOf(bySite)).toEqual([x.host.id]);
    const nowhere = await submit(user.token, { hosts: { tags: { ...tag, board: "z" } } });
    const other = await submit((await c.createUser()).token, { hosts: { tags: tag, site: "lab-c" } });
    await probeRun();
    expect((await jobRow(c.sql, nowhere)).state).toBe("queued");
    expect((await jobRow(c.sql, other)).state).toBe("queued");
    await c.client(JobService, user.token).cancelJob({ jobId: nowhere });
  });

  it("places a job only on a host supporting every media type of its image", async () => {
    const user = await c.createUser();
    const tag = uniqueTag();
    const rootfsOnly = await hostWith({ tags: tag, mediaTypes: [ROOTFS] });
    const qemu = await hostWith({ tags: tag, driverKind: "qemu", mediaTypes: [QCOW2] }, { driverKind: 3 });
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image: qcowImage, hosts: { tags: tag } } });
    await qemu.s.startJob(job!.id);
    expect(await hostsOf(job!.id)).toEqual([qemu.host.id]);
    expect(rootfsOnly.s.received.some((m) => m.payload.case === "startJob")).toBe(false);
  });

  it("co-allocates N hosts at once or none, and does not starve a large job with small ones", async () => {
    const user = await c.createUser();
    const other = await c.createUser();
    const tag = uniqueTag();
    const hosts = [await hostWith({ tags: tag }), await hostWith({ tags: tag }), await hostWith({ tags: tag })];
    // Three small jobs (of two users: the per-user limit is 2) keep the three hosts busy.
    const small = [
      await submit(user.token, { hosts: { tags: tag } }),
      await submit(user.token, { hosts: { tags: tag } }),
      await submit(other.token, { hosts: { tags: tag } }),
    ];
    const holder = new Map<string, ScriptedSupervisor>();
    for (const id of small) {
      await waitUntil(async () => (await jobRow(c.sql, id)).state === "assigned", "small job assigned");
      const [h] = await hostsOf(id);
      holder.set(id, hosts.find((x) => x.host.id === h)!.s);
    }
    const big = await submit(other.token, { hosts: { tags: tag, hostCount: 3 } });
    const later = await submit(other.token, { hosts: { tags: tag } });
    // Too big for what exists: waits without blocking anything.
    const impossible = await submit(other.token, { hosts: { tags: tag, hostCount: 4 }, priority: 100 });

    // One host frees up: the big job (older) keeps it; the younger small job must not take it.
    await holder.get(small[0])!.startJob(small[0]);
    await holder.get(small[0])!.exit(small[0], 1);
    await jobInState(c.sql, small[0], "finalized");
    await waitUntil(async () => {
      const [r] = await c.sql`select count(*)::int as n from job_hosts where job_id = ${small[0]} and released_at is not null`;
      return r.n === 1;
    }, "the slot to be released");
    await probeRun();
    expect((await jobRow(c.sql, later)).state).toBe("queued");
    expect((await jobRow(c.sql, big)).state).toBe("queued");
    expect(await hostsOf(big)).toEqual([]);

    for (const id of small.slice(1)) {
      await holder.get(id)!.startJob(id);
      await holder.get(id)!.exit(id, 1);
    }
    // All three hosts at once, each told about its peers.
    const starts = await Promise.all(hosts.map((h) => h.s.startJob(big)));
    expect(new Set(starts.map((s: StartJob) => s.hostIndex))).toEqual(new Set([0, 1, 2]));
    for (const s of starts) expect(s.peers.map((p) => p.hostId).sort()).toEqual(hosts.map((h) => h.host.id).sort());
    expect((await jobRow(c.sql, later)).state).toBe("queued");
    expect(await hostsOf(impossible)).toEqual([]);

    // A multi-host attempt ends at its first end; the other hosts are stopped.
    await hosts[0].s.report(big, 1, JobState.RUNNING);
    await hosts[0].s.exit(big, 1);
    expect(await jobInState(c.sql, big, "finalized")).toMatchObject({ reason: "workload_exited" });
    for (const h of hosts.slice(1)) {
      const stop = await h.s.waitFor((m) => m.payload.case === "stopJob" && m.payload.value.jobId === big, { includePast: true });
      expect((stop.payload.value as StopJob).attempt).toBe(1);
    }
    await waitUntil(async () => (await jobRow(c.sql, later)).state === "assigned", "the small job to run after the big one");
    await c.client(JobService, other.token).cancelJob({ jobId: impossible });
  });

  it("orders by priority, then age, with aging lifting long-waiting jobs", async () => {
    const user = await c.createUser();
    const tag = uniqueTag();
    const busy = await hostWith({ tags: tag });
    const blocker = await submit(user.token, { hosts: { tags: tag } });
    await busy.s.startJob(blocker);
    const low = await submit(user.token, { hosts: { tags: tag }, priority: 0 });
    const high = await submit(user.token, { hosts: { tags: tag }, priority: 5 });
    await busy.s.exit(blocker, 1);
    await busy.s.startJob(high);
    expect((await jobRow(c.sql, low)).state).toBe("queued");
    await busy.s.exit(high, 1);
    await busy.s.startJob(low);

    // Aging: a priority-0 job waiting for an hour (6 points) beats a new priority-5 job.
    const old = await submit(user.token, { hosts: { tags: tag }, priority: 0 });
    const fresh = await submit(user.token, { hosts: { tags: tag }, priority: 5 });
    await c.sql`update jobs set queued_at = now() - interval '1 hour' where id = ${old}`;
    await busy.s.exit(low, 1);
    await busy.s.startJob(old);
    expect((await jobRow(c.sql, fresh)).state).toBe("queued");
    await busy.s.exit(old, 1);
    await busy.s.startJob(fresh);
  });

  it("keeps a user's jobs beyond the per-user limit queued, without holding back other users", async () => {
    const user = await c.createUser();
    const other = await c.createUser();
    const tag = uniqueTag();
    const hs = [await hostWith({ tags: tag }), await hostWith({ tags: tag }), await hostWith({ tags: tag })];
    const jobs = [
      await submit(user.token, { hosts: { tags: tag } }),
      await submit(user.token, { hosts: { tags: tag } }),
      await submit(user.token, { hosts: { tags: tag } }),
    ];
    const others = await submit(other.token, { hosts: { tags: tag } });
    await jobInState(c.sql, others, "assigned");
    const states = await Promise.all(jobs.map(async (j) => (await jobRow(c.sql, j)).state));
    expect(states.filter((s) => s === "assigned").length).toBe(2);
    const waiting = jobs[states.indexOf("queued")];
    const done = jobs[states.indexOf("assigned")];
    const [hostOfDone] = await hostsOf(done);
    const s = hs.find((h) => h.host.id === hostOfDone)!.s;
    await s.startJob(done);
    await s.exit(done, 1);
    await jobInState(c.sql, waiting, "assigned");
  });

  it("finalizes a job no host takes within its queue timeout QUEUE_TIMEOUT", async () => {
    const user = await c.createUser();
    const id = await submit(user.token, { hosts: { tags: uniqueTag() }, queueTimeout: { seconds: 0n, nanos: 200_000_000 } });
    expect(await jobInState(c.sql, id, "finalized")).toMatchObject({ reason: "queue_timeout" });
  });

  it("stops a job at its job timeout, and the timeout wins over the workload's own exit", async () => {
    const user = await c.createUser();
    const tag = uniqueTag();
    const { s } = await hostWith({ tags: tag }, { silent: true });
    const id = await submit(user.token, { hosts: { tags: tag }, jobTimeout: { seconds: 0n, nanos: 300_000_000 } });
    const start = await s.startJob(id);
    s.held.set(`${id}/1`, { jobId: id, attempt: 1, state: JobState.RUNNING, stage: 0, start });
    await s.report(id, 1, JobState.RUNNING);
    const stop = await s.waitFor((m) => m.payload.case === "stopJob" && m.payload.value.jobId === id, { includePast: true });
    expect((stop.payload.value as StopJob).reason).toBe(FinalizeReason.JOB_TIMEOUT);
    await s.exit(id, 1);
    expect(await jobInState(c.sql, id, "finalized")).toMatchObject({ reason: "job_timeout", exit_status: null });
  });

  it("gives draining and disabled hosts no new jobs, and a draining supervisor none either", async () => {
    const user = await c.createUser();
    const tag = uniqueTag();
    const { host, s } = await hostWith({ tags: tag });
    await c.sql`update hosts set admin_state = 'draining' where id = ${host.id}`;
    // Its only host cannot take it now: SubmitJob would refuse it without queue_anyway.
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image, hosts: { tags: tag } }, queueAnyway: true });
    const id = job!.id;
    await probeRun();
    expect((await jobRow(c.sql, id)).state).toBe("queued");
    await c.sql`update hosts set admin_state = 'disabled' where id = ${host.id}`;
    await probeRun();
    expect((await jobRow(c.sql, id)).state).toBe("queued");
    // The supervisor itself drains: still nothing once the admin enables the host.
    s.draining = true;
    s.sendHeartbeat();
    await waitUntil(async () => (await c.sql`select supervisor_draining from hosts where id = ${host.id}`)[0].supervisor_draining, "drain");
    await c.sql`update hosts set admin_state = 'enabled' where id = ${host.id}`;
    await probeRun();
    expect((await jobRow(c.sql, id)).state).toBe("queued");
    s.draining = false;
    s.sendHeartbeat();
    await s.startJob(id);
    expect(await hostsOf(id)).toEqual([host.id]);
  });

  it("restarts a job only after an infrastructure failure, as a new attempt, up to max_restarts", async () => {
    const user = await c.createUser();
    const tag = uniqueTag();
    const { s } = await hostWith({ tags: tag });
    const failing = await submit(user.token, { hosts: { tags: tag }, restartPolicy: { maxRestarts: 2 } });
    await s.startJob(failing);
    await s.exit(failing, 1, 1);
    expect(await jobInState(c.sql, failing, "finalized")).toMatchObject({ reason: "workload_exited", exit_status: "failure", attempt: 1 });

    const flaky = await submit(user.token, { hosts: { tags: tag }, restartPolicy: { maxRestarts: 2 } });
    for (let attempt = 1; attempt <= 3; attempt++) {
      const start = await s.waitFor(
        (m) => m.payload.case === "startJob" && m.payload.value.jobId === flaky && m.payload.value.attempt === attempt,
        { includePast: true },
      );
      expect((start.payload.value as StartJob).attempt).toBe(attempt);
      await s.terminate(flaky, attempt, { reason: FinalizeReason.HOST_START_FAILURE, message: "board did not power on" });
    }
    expect(await jobInState(c.sql, flaky, "finalized")).toMatchObject({ reason: "host_start_failure", attempt: 3 });
    const { job } = await c.client(JobService, user.token).getJob({ jobId: flaky });
    expect(job!.timeline.filter((e) => e.kind === 5 /* RESTARTED */).length).toBe(2);
  });

  it("never changes a finalized job", async () => {
    const user = await c.createUser();
    const tag = uniqueTag();
    const { s } = await hostWith({ tags: tag });
    const id = await submit(user.token, { hosts: { tags: tag } });
    await s.startJob(id);
    await s.exit(id, 1, 0);
    const final = await jobInState(c.sql, id, "finalized");
    const [before] = await c.sql`select updated_at, (select count(*)::int from job_events where job_id = ${id}) as events from jobs where id = ${id}`;
    s.held.set(`${id}/1`, { jobId: id, attempt: 1, state: JobState.RUNNING, stage: 0 });
    await s.report(id, 1, JobState.RUNNING);
    await s.exit(id, 1, 9);
    expect(await codeOf(c.client(JobService, user.token).cancelJob({ jobId: id }))).toBe("FailedPrecondition");
    await s.drop();
    const again = await attach(c, { id: s.options.hostId!, credential: s.options.credential }, {
      held: [{ jobId: id, attempt: 1, state: JobState.RUNNING, stage: 0 }],
    });
    open.push(again);
    await again.waitFor((m) => m.payload.case === "stopJob" && m.payload.value.jobId === id, { includePast: true });
    expect(await jobRow(c.sql, id)).toEqual(final);
    const [after] = await c.sql`select updated_at, (select count(*)::int from job_events where job_id = ${id}) as events from jobs where id = ${id}`;
    expect(after).toEqual(before);
  });

  it("places a user's job only on hosts the user may use (host grants)", async () => {
    const member = await c.createUser();
    const outsider = await c.createUser();
    const tag = uniqueTag();
    const { host, s } = await hostWith({ tags: tag });
    const group = randomUUID();
    await c.sql`insert into groups (id, name) values (${group}, ${"g-" + group.slice(0, 8)})`;
    await c.sql`insert into group_members (group_id, user_id) values (${group}, ${member.id})`;
    await c.sql`insert into host_grants (id, group_id, host_id) values (${randomUUID()}, ${group}, ${host.id})`;
    const denied = await submit(outsider.token, { hosts: { tags: tag } });
    const allowed = await submit(member.token, { hosts: { tags: tag } });
    await s.startJob(allowed);
    expect((await jobRow(c.sql, denied)).state).toBe("queued");
    await c.client(JobService, outsider.token).cancelJob({ jobId: denied });
  });
});
