import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import {
  JobChangeKind,
  JobService,
  type WatchJobsResponse,
} from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { FinalizeReason, JobEventKind, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { newSecret } from "../../coordinator/auth.js";
import { type JSONWebKeySet, type JWK, TokenVerifier } from "../../lib/tokens.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { metricValues } from "../support/metrics.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, attach, codeOf, insertImage, jobInState, jobRow, uniqueTag, waitUntil } from "../support/jobs.js";

describe("JobService", () => {
  let c: TestCoordinator;
  let alice: { id: string; token: string };
  let bob: { id: string; token: string };
  let admin: { id: string; token: string };
  let image: { ref: string; digest: string };
  let jobs: Client<typeof JobService>;
  const open: ScriptedSupervisor[] = [];

  beforeAll(async () => {
    c = await startTestCoordinator({ config: { ...FAST, maxQueuedJobsPerUser: 40 } });
    alice = await c.createUser({ name: `alice-${randomUUID().slice(0, 6)}` });
    bob = await c.createUser();
    admin = await c.createUser({ role: "admin" });
    image = await insertImage(c.sql);
    jobs = c.client(JobService, alice.token);
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  async function runningJob(owner = alice.token) {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = await attach(c, host);
    open.push(s);
    const { job } = await c.client(JobService, owner).submitJob({ spec: { image: image.ref, hosts: { tags: tag }, tags: { ci: "run" } } });
    await s.startJob(job!.id);
    await s.report(job!.id, 1, JobState.RUNNING);
    await jobInState(c.sql, job!.id, "running");
    return { jobId: job!.id, host, s };
  }

  it("submits a job and returns it with its timeline, hosts and times", async () => {
    const { jobId, host, s } = await runningJob();
    await s.exit(jobId, 1, 0);
    await jobInState(c.sql, jobId, "finalized");
    const { job } = await jobs.getJob({ jobId });
    expect(job).toMatchObject({
      id: jobId,
      ownerUserId: alice.id,
      state: JobState.FINALIZED,
      finalizeReason: FinalizeReason.WORKLOAD_EXITED,
      exitCode: 0,
      attempt: 1,
      hostIds: [host.id],
      manifestDigest: image.digest,
    });
    expect(job!.assignTime && job!.startTime && job!.finalizeTime).toBeTruthy();
    expect(job!.timeline.map((e) => [e.kind, e.state])).toEqual([
      [JobEventKind.SUBMITTED, JobState.QUEUED],
      [JobEventKind.STATE_CHANGED, JobState.ASSIGNED],
      [JobEventKind.STATE_CHANGED, JobState.RUNNING],
      [JobEventKind.STATE_CHANGED, JobState.FINALIZED],
    ]);
    expect(job!.timeline[2].hostId).toBe(host.id);
  });

  it("serves the scheduler's and the group commit's metrics on /metrics", async () => {
    const read = async () => {
      const m = await metricValues(c.url, [
        "treadmill_scheduler_assigned_jobs_total",
        "treadmill_scheduler_pass_seconds_count",
        "treadmill_group_commit_changes_total",
        "treadmill_group_commit_seconds_count",
      ]);
      return {
        assigned: m.treadmill_scheduler_assigned_jobs_total,
        passes: m.treadmill_scheduler_pass_seconds_count,
        changes: m.treadmill_group_commit_changes_total,
        commits: m.treadmill_group_commit_seconds_count,
      };
    };
    const before = await read();
    const { jobId, s } = await runningJob();
    await s.exit(jobId, 1, 0);
    await jobInState(c.sql, jobId, "finalized");
    const after = await read();
    expect(after.assigned - before.assigned).toBe(1);
    expect(after.passes).toBeGreaterThan(before.passes);
    // The StartJob's acknowledgement, RUNNING and the exit.
    expect(after.changes - before.changes).toBe(3);
    expect(after.commits).toBeGreaterThan(before.commits);
  });

  it("deduplicates SubmitJob by request_id", async () => {
    const requestId = randomUUID();
    const spec = { image: image.ref, hosts: { tags: uniqueTag() } };
    const a = await jobs.submitJob({ spec, requestId });
    const b = await jobs.submitJob({ spec, requestId });
    expect(b.job!.id).toBe(a.job!.id);
    const other = await c.client(JobService, bob.token).submitJob({ spec, requestId });
    expect(other.job!.id).not.toBe(a.job!.id);
    await jobs.cancelJob({ jobId: a.job!.id });
    await c.client(JobService, bob.token).cancelJob({ jobId: other.job!.id });
  });

  it("resolves images by digest, refuses unknown and invisible ones", async () => {
    const { job } = await jobs.submitJob({ spec: { image: image.digest, hosts: { tags: uniqueTag() } } });
    expect(job!.manifestDigest).toBe(image.digest);
    await jobs.cancelJob({ jobId: job!.id });
    expect(await codeOf(jobs.submitJob({ spec: { image: "nothing:here" } }))).toBe("NotFound");
    const secret = await insertImage(c.sql, { ownerId: bob.id, visibility: "private" });
    expect(await codeOf(jobs.submitJob({ spec: { image: secret.ref } }))).toBe("PermissionDenied");
    const ok = await c.client(JobService, bob.token).submitJob({ spec: { image: secret.ref, hosts: { tags: uniqueTag() } } });
    await c.client(JobService, bob.token).cancelJob({ jobId: ok.job!.id });
  });

  it("lists jobs newest first with filters and keyset pagination", async () => {
    const user = await c.createUser();
    const client = c.client(JobService, user.token);
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const { job } = await client.submitJob({ spec: { image: image.ref, hosts: { tags: uniqueTag() }, tags: { batch: i % 2 === 0 ? "even" : "odd" } } });
      ids.push(job!.id);
    }
    const seen: string[] = [];
    let pageToken = "";
    do {
      const page = await client.listJobs({ pageSize: 2, pageToken });
      expect(page.jobs.length).toBeLessThanOrEqual(2);
      seen.push(...page.jobs.map((j) => j.id));
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    expect(seen).toEqual([...ids].reverse());
    const even = await client.listJobs({ filter: { tags: { batch: "even" } } });
    expect(even.jobs.map((j) => j.id)).toEqual([ids[4], ids[2], ids[0]]);
    await client.cancelJob({ jobId: ids[0] });
    const queued = await client.listJobs({ filter: { states: [JobState.QUEUED] } });
    expect(queued.jobs.map((j) => j.id)).toEqual([ids[4], ids[3], ids[2], ids[1]]);
    // An admin sees any owner's; by host.
    const run = await runningJob(user.token);
    const byHost = await c.client(JobService, admin.token).listJobs({ filter: { hostId: run.host.id } });
    expect(byHost.jobs.map((j) => j.id)).toEqual([run.jobId]);
    const byOwner = await c.client(JobService, admin.token).listJobs({ filter: { ownerUserId: user.id } });
    expect(byOwner.jobs.length).toBe(6);
    // A token of another filter, or garbage, is refused.
    const first = await client.listJobs({ pageSize: 1 });
    expect(await codeOf(client.listJobs({ pageSize: 1, pageToken: first.nextPageToken, filter: { states: [JobState.QUEUED] } }))).toBe(
      "InvalidArgument",
    );
    expect(await codeOf(client.listJobs({ pageToken: "garbage" }))).toBe("InvalidArgument");
    for (const id of ids.slice(1)) await client.cancelJob({ jobId: id });
  });

  it("cancels a queued job at once and a running one through StopJob", async () => {
    const { job } = await jobs.submitJob({ spec: { image: image.ref, hosts: { tags: uniqueTag() } } });
    const canceled = await jobs.cancelJob({ jobId: job!.id, message: "not needed" });
    expect(canceled.job).toMatchObject({ state: JobState.FINALIZED, finalizeReason: FinalizeReason.CANCELED });
    expect((await jobs.cancelJob({ jobId: job!.id })).job!.state).toBe(JobState.FINALIZED);

    const run = await runningJob();
    const asked = await jobs.cancelJob({ jobId: run.jobId });
    expect(asked.job).toMatchObject({ state: JobState.RUNNING, cancelRequested: true });
    await run.s.waitFor((m) => m.payload.case === "stopJob" && m.payload.value.jobId === run.jobId, { includePast: true });
    expect(await jobInState(c.sql, run.jobId, "finalized")).toMatchObject({ reason: "canceled" });
    const { job: done } = await jobs.getJob({ jobId: run.jobId });
    expect(done!.timeline.some((e) => e.kind === JobEventKind.CANCEL_REQUESTED)).toBe(true);
    expect(done!.cancelRequested).toBe(false);
  });

  it("watches one job until it is finalized", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = await attach(c, host);
    open.push(s);
    const { job } = await jobs.submitJob({ spec: { image: image.ref, hosts: { tags: tag } } });
    const states: JobState[] = [];
    const watching = (async () => {
      for await (const m of jobs.watchJob({ jobId: job!.id })) states.push(m.job!.state);
    })();
    await s.startJob(job!.id);
    await waitUntil(async () => states.includes(JobState.ASSIGNED), "the watch to see ASSIGNED");
    await s.report(job!.id, 1, JobState.RUNNING);
    await waitUntil(async () => states.includes(JobState.RUNNING), "the watch to see RUNNING");
    await s.exit(job!.id, 1);
    await watching;
    expect(states.at(-1)).toBe(JobState.FINALIZED);
  });

  it("watches the caller's jobs: existing ones, then creations and updates", async () => {
    const user = await c.createUser();
    const client = c.client(JobService, user.token);
    const existing = await client.submitJob({ spec: { image: image.ref, hosts: { tags: uniqueTag() } } });
    const abort = new AbortController();
    const got: WatchJobsResponse[] = [];
    const watching = (async () => {
      for await (const m of client.watchJobs({ includeExisting: true }, { signal: abort.signal })) got.push(m);
    })().catch((e: unknown) => {
      if (ConnectError.from(e).code !== Code.Canceled) throw e;
    });
    await waitUntil(async () => got.some((m) => m.kind === JobChangeKind.SYNCED), "SYNCED");
    expect(got.map((m) => [m.kind, m.job?.id])).toEqual([
      [JobChangeKind.EXISTING, existing.job!.id],
      [JobChangeKind.SYNCED, undefined],
    ]);
    // Someone else's job is not shown.
    await c.client(JobService, bob.token).submitJob({ spec: { image: image.ref, hosts: { tags: uniqueTag() } } });
    const created = await client.submitJob({ spec: { image: image.ref, hosts: { tags: uniqueTag() } } });
    await waitUntil(async () => got.some((m) => m.kind === JobChangeKind.CREATED), "CREATED");
    await client.cancelJob({ jobId: created.job!.id });
    await waitUntil(async () => got.some((m) => m.kind === JobChangeKind.UPDATED), "UPDATED");
    abort.abort();
    await watching;
    expect(got.slice(2).map((m) => [m.kind, m.job!.id, m.job!.state])).toEqual([
      [JobChangeKind.CREATED, created.job!.id, JobState.QUEUED],
      [JobChangeKind.UPDATED, created.job!.id, JobState.FINALIZED],
    ]);
    await client.cancelJob({ jobId: existing.job!.id });
  });

  it("gives log access: the job's log servers and a log:read token", async () => {
    const { job } = await jobs.submitJob({ spec: { image: image.ref, hosts: { tags: uniqueTag() } } });
    expect(await codeOf(jobs.getJobLogAccess({ jobId: job!.id }))).toBe("FailedPrecondition");
    await jobs.cancelJob({ jobId: job!.id });
    await c.sql`
      insert into services (id, kind, url, site) values
        (${randomUUID()}, 'log_server', 'http://log-1.invalid', ''),
        (${randomUUID()}, 'log_server', 'http://log-2.invalid', ''),
        (${randomUUID()}, 'log_server', 'http://log-3.invalid', '')`;
    try {
      const run = await runningJob();
      const start = await run.s.startJob(run.jobId);
      expect(start.logs!.serverUrls.length).toBe(2);
      const access = await jobs.getJobLogAccess({ jobId: run.jobId });
      expect(access.logServerUrls).toEqual(start.logs!.serverUrls);
      const keys = async (): Promise<JSONWebKeySet> => ({
        keys: (await c.sql<{ public_jwk: JWK }[]>`select public_jwk from signing_keys`).map((r) => r.public_jwk),
      });
      const verified = await new TokenVerifier({ keys }).verify(access.readToken!.token, { scope: "log:read", job: run.jobId });
      expect(verified.subject).toBe(alice.id);
    } finally {
      await c.sql`delete from services where url like 'http://log-%.invalid'`;
    }
  });

  it("opens a session to a running job's console through its proxy, with a dial token for exactly that", async () => {
    const { jobId } = await runningJob();
    // No proxy was registered when it started: nothing to open.
    expect(await codeOf(jobs.openJobSession({ jobId, portName: "console" }))).toBe("FailedPrecondition");
    await c.sql`update jobs set proxy_url = 'http://proxy-1.invalid:7704' where id = ${jobId}`;
    const session = await jobs.openJobSession({ jobId, portName: "console" });
    const [hostId] = (await jobs.getJob({ jobId })).job!.hostIds;
    expect(session.grpcUrl).toBe("http://proxy-1.invalid:7704");
    expect(session.websocketUrl).toBe(`ws://proxy-1.invalid:7704/ws/${jobId}/console?host=${hostId}`);
    expect(session.hostId).toBe(hostId);
    const keys = async (): Promise<JSONWebKeySet> => ({
      keys: (await c.sql<{ public_jwk: JWK }[]>`select public_jwk from signing_keys`).map((r) => r.public_jwk),
    });
    const verifier = new TokenVerifier({ keys, audience: "proxy" });
    const verified = await verifier.verify(session.dialToken!.token, { scope: "tunnel:dial", job: jobId, exposure: "console", host: hostId });
    expect(verified.subject).toBe(alice.id);
    await expect(verifier.verify(session.dialToken!.token, { scope: "tunnel:dial", job: jobId, exposure: "ssh" })).rejects.toThrow();
    expect(await codeOf(jobs.openJobSession({ jobId, portName: "ssh" }))).toBe("NotFound");
    expect(await codeOf(jobs.openJobSession({ jobId, portName: "../etc" }))).toBe("InvalidArgument");
    const audited = await c.sql`select message from audit_events where job_id = ${jobId} and kind = 'job.session_opened'`;
    expect(audited.length).toBe(1);
    expect(JSON.stringify(audited)).not.toContain(session.dialToken!.token);
  });

  describe("auth matrix", () => {
    const otherJob = { id: "" };
    let revoked: string;
    let expired: string;
    let hostCredential: string;
    beforeAll(async () => {
      otherJob.id = (await runningJob(bob.token)).jobId;
      const r = await c.createUser();
      await c.sql`update api_tokens set revoked_at = now() where user_id = ${r.id}`;
      revoked = r.token;
      const e = await c.createUser();
      await c.sql`update api_tokens set expires_at = now() - interval '1 second' where user_id = ${e.id}`;
      expired = e.token;
      hostCredential = (await c.createHost()).credential;
    });

    const calls: [string, (client: Client<typeof JobService>) => Promise<unknown>][] = [
      ["SubmitJob", (cl) => cl.submitJob({ spec: { image: "x:y" } })],
      ["GetJob", (cl) => cl.getJob({ jobId: otherJob.id })],
      ["ListJobs", (cl) => cl.listJobs({ filter: { ownerUserId: randomUUID() } })],
      ["CancelJob", (cl) => cl.cancelJob({ jobId: otherJob.id })],
      [
        "WatchJob",
        async (cl) => {
          for await (const _ of cl.watchJob({ jobId: otherJob.id })) return;
        },
      ],
      [
        "WatchJobs",
        async (cl) => {
          for await (const _ of cl.watchJobs({ filter: { ownerUserId: randomUUID() } })) return;
        },
      ],
      ["GetJobLogAccess", (cl) => cl.getJobLogAccess({ jobId: otherJob.id })],
      ["OpenJobSession", (cl) => cl.openJobSession({ jobId: otherJob.id, portName: "console" })],
      ["SnapshotJob", (cl) => cl.snapshotJob({ jobId: otherJob.id, name: "a", tag: "b" })],
    ];

    it.each(calls)("%s refuses no token, an unknown, revoked or expired token, and a host credential", async (_name, call) => {
      const before = await c.sql`select count(*)::int as n from job_events`;
      expect(await codeOf(call(c.client(JobService)))).toBe("Unauthenticated");
      expect(await codeOf(call(c.client(JobService, newSecret("user"))))).toBe("Unauthenticated");
      expect(await codeOf(call(c.client(JobService, revoked)))).toBe("Unauthenticated");
      expect(await codeOf(call(c.client(JobService, expired)))).toBe("Unauthenticated");
      expect(await codeOf(call(c.client(JobService, hostCredential)))).toBe("PermissionDenied");
      const after = await c.sql`select count(*)::int as n from job_events`;
      expect(after[0].n).toBe(before[0].n);
    });

    it.each(calls.filter(([name]) => name !== "SubmitJob"))(
      "%s refuses another user's job, changing nothing",
      async (_name, call) => {
        const before = await jobRow(c.sql, otherJob.id);
        expect(await codeOf(call(jobs))).toBe("PermissionDenied");
        expect(await jobRow(c.sql, otherJob.id)).toEqual(before);
      },
    );

    it("lets an admin act on any job", async () => {
      const client = c.client(JobService, admin.token);
      expect((await client.getJob({ jobId: otherJob.id })).job!.ownerUserId).toBe(bob.id);
      expect((await client.cancelJob({ jobId: otherJob.id })).job!.cancelRequested).toBe(true);
    });

    it("lets a supervisor credential act only for its own host", async () => {
      const victim = await runningJob(bob.token);
      const intruderHost = await c.createHost();
      const intruder = await attach(c, intruderHost);
      open.push(intruder);
      const before = await jobRow(c.sql, victim.jobId);
      intruder.held.set(`${victim.jobId}/1`, { jobId: victim.jobId, attempt: 1, state: JobState.RUNNING, stage: 0 });
      await intruder.report(victim.jobId, 1, JobState.TERMINATING);
      await intruder.exit(victim.jobId, 1, 0);
      expect(await jobRow(c.sql, victim.jobId)).toEqual(before);
    });
  });

  describe("bad input", () => {
    const bad: [string, Record<string, unknown>, string][] = [
      ["no spec", {}, "spec"],
      ["an empty image", { spec: { image: "" } }, "spec.image"],
      ["a malformed digest", { spec: { image: "sha256:abc" } }, "spec.image"],
      ["a bad image name", { spec: { image: "Bad Name:1" } }, "spec.image"],
      ["a bad tag key", { spec: { image: "a:b", hosts: { tags: { "Bad Key": "x" } } } }, "spec.hosts.tags"],
      ["a bad tag value", { spec: { image: "a:b", hosts: { tags: { k: "a b" } } } }, "spec.hosts.tags"],
      ["too many hosts", { spec: { image: "a:b", hosts: { hostCount: 65 } } }, "spec.hosts.host_count"],
      ["a negative host count", { spec: { image: "a:b", hosts: { hostCount: -1 } } }, "spec.hosts.host_count"],
      ["a bad site", { spec: { image: "a:b", hosts: { site: "Lab A" } } }, "spec.hosts.site"],
      ["a priority out of range", { spec: { image: "a:b", priority: 101 } }, "spec.priority"],
      ["a zero job timeout", { spec: { image: "a:b", jobTimeout: { seconds: 0n } } }, "spec.job_timeout"],
      ["a queue timeout above the maximum", { spec: { image: "a:b", queueTimeout: { seconds: 10n ** 9n } } }, "spec.queue_timeout"],
      ["too many restarts", { spec: { image: "a:b", restartPolicy: { maxRestarts: 11 } } }, "spec.restart_policy.max_restarts"],
      ["a bad parameter name", { spec: { image: "a:b", parameters: [{ name: "1X", value: "" }] } }, "spec.parameters[0].name"],
      ["a reserved parameter name", { spec: { image: "a:b", parameters: [{ name: "TREADMILL_X", value: "" }] } }, "spec.parameters[0].name"],
      [
        "a repeated parameter",
        { spec: { image: "a:b", parameters: [{ name: "A", value: "" }, { name: "A", value: "" }] } },
        "spec.parameters[1].name",
      ],
      ["an oversized parameter", { spec: { image: "a:b", parameters: [{ name: "A", value: "x".repeat(65 * 1024) }] } }, "spec.parameters[0].value"],
      ["a bad port", { spec: { image: "a:b", exposedPorts: [{ name: "ssh", port: 70000 }] } }, "spec.exposed_ports[0].port"],
      ["a long description", { spec: { image: "a:b", description: "d".repeat(300) } }, "spec.description"],
      ["a long request id", { spec: { image: "a:b" }, requestId: "r".repeat(65) }, "request_id"],
    ];
    it.each(bad)("SubmitJob refuses %s with InvalidArgument naming the field", async (_what, request, field) => {
      const before = await c.sql`select count(*)::int as n from jobs`;
      const err = await jobs.submitJob(request).catch((e: unknown) => ConnectError.from(e));
      expect(err).toBeInstanceOf(ConnectError);
      expect((err as ConnectError).code).toBe(Code.InvalidArgument);
      expect((err as ConnectError).rawMessage).toContain(field);
      const after = await c.sql`select count(*)::int as n from jobs`;
      expect(after[0].n).toBe(before[0].n);
    });

    it("refuses malformed ids and filters with InvalidArgument, unknown jobs with NotFound", async () => {
      expect(await codeOf(jobs.getJob({ jobId: "not-a-uuid" }))).toBe("InvalidArgument");
      expect(await codeOf(jobs.getJob({ jobId: randomUUID() }))).toBe("NotFound");
      expect(await codeOf(jobs.cancelJob({ jobId: "" }))).toBe("InvalidArgument");
      expect(await codeOf(jobs.cancelJob({ jobId: randomUUID(), message: "m".repeat(2000) }))).toBe("InvalidArgument");
      expect(await codeOf(jobs.listJobs({ filter: { states: [99 as JobState] } }))).toBe("InvalidArgument");
      expect(await codeOf(jobs.listJobs({ filter: { hostId: "x" } }))).toBe("InvalidArgument");
      expect(await codeOf(jobs.listJobs({ pageSize: -1 }))).toBe("InvalidArgument");
      expect(await codeOf(jobs.getJobLogAccess({ jobId: "x" }))).toBe("InvalidArgument");
    });

    it("refuses an oversized request and too many unfinished jobs with ResourceExhausted", async () => {
      const huge = { spec: { image: "a:b", description: "x".repeat(5 * 1024 * 1024) } };
      expect(await codeOf(jobs.submitJob(huge))).toBe("ResourceExhausted");
      const user = await c.createUser();
      const client = c.client(JobService, user.token);
      for (let i = 0; i < 40; i++) await client.submitJob({ spec: { image: image.ref, hosts: { tags: { none: "x" } } } });
      expect(await codeOf(client.submitJob({ spec: { image: image.ref } }))).toBe("ResourceExhausted");
      const listed = await client.listJobs({ pageSize: 1000 });
      expect(listed.jobs.length).toBe(40);
      for (const j of listed.jobs) await client.cancelJob({ jobId: j.id });
    });
  });
});
