import { randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { JobEventKind, JobState, TestOutcome, type TestCaseSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, attach, insertImage, jobInState, uniqueTag } from "../support/jobs.js";

type Case = MessageInitShape<typeof TestCaseSchema>;

const pass = (suite: string, name: string): Case => ({ suite, name, outcome: TestOutcome.PASS });
const fail = (suite: string, name: string, message = "boom"): Case => ({ suite, name, outcome: TestOutcome.FAIL, message });

/**
 * Test results on the coordinator (coordinator/jobs/results.ts): batches
 * from the supervisor stream recorded once per report id, counts on the
 * job, ListJobResults with filters and pages, CompareJobResults over a
 * series of labelled jobs, flaky cases across attempts, the cap, access.
 */
describe("job results on the coordinator", () => {
  let c: TestCoordinator;
  let user: { id: string; token: string };
  let image: { ref: string; digest: string };
  const open: ScriptedSupervisor[] = [];

  beforeAll(async () => {
    c = await startTestCoordinator({ config: { ...FAST, resultsCasesPerAttempt: 50 }, logServer: false });
    user = await c.createUser();
    image = await insertImage(c.sql);
    await c.sql`insert into services (id, kind, url, site) values (${randomUUID()}, 'log_server', 'http://log-a.invalid', '')`;
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  const jobs = () => c.client(JobService, user.token);

  /** A host with a scripted supervisor, and a job of `labels` running on it. */
  async function runningJob(labels: Record<string, string> = {}) {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = await attach(c, host);
    open.push(s);
    const { job } = await jobs().submitJob({ spec: { image: image.ref, hosts: { tags: tag }, tags: labels } });
    const jobId = job!.id;
    await s.startJob(jobId);
    await s.report(jobId, 1, JobState.RUNNING);
    return { host, s, jobId };
  }

  async function report(s: ScriptedSupervisor, jobId: string, cases: Case[], options: { last?: boolean; problems?: string[]; attempt?: number; reportId?: string } = {}) {
    const reportId = options.reportId ?? randomUUID();
    const ack = s.waitFor((m) => m.payload.case === "ackReport" && m.payload.value.reportId === reportId);
    s.send({ case: "jobResultsReport", value: { reportId, jobId, attempt: options.attempt ?? 1, cases, problems: options.problems ?? [], last: options.last ?? false } });
    return ack;
  }

  /** A job of `labels` that reports `cases` and ends. */
  async function finishedJob(labels: Record<string, string>, cases: Case[]) {
    const { s, jobId } = await runningJob(labels);
    await report(s, jobId, cases, { last: true });
    await s.exit(jobId, 1);
    await jobInState(c.sql, jobId, "finalized");
    return jobId;
  }

  it("records a batch once by its report id, counts it on the job while it runs, and says on the timeline when the results are in", async () => {
    const { s, jobId } = await runningJob();
    const reportId = randomUUID();
    const batch: Case[] = [pass("net", "ping"), fail("net", "tcp", "timeout after 5 s"), { suite: "fs", name: "ext4", outcome: TestOutcome.SKIP, message: "no disk" }];
    await report(s, jobId, batch, { reportId });
    await report(s, jobId, batch, { reportId }); // re-sent after a reconnect
    let job = (await jobs().getJob({ jobId })).job!;
    expect(job.state).toBe(JobState.RUNNING);
    expect(job.results).toMatchObject({ attempt: 1, total: 3n, passed: 1n, failed: 1n, skipped: 1n, errored: 0n, complete: false });

    await report(s, jobId, [{ suite: "fs", name: "xfs", outcome: TestOutcome.ERROR, message: "mkfs missing", duration: { seconds: 1n, nanos: 500_000_000 } }], { last: true });
    job = (await jobs().getJob({ jobId })).job!;
    expect(job.results).toMatchObject({ total: 4n, errored: 1n, complete: true });
    const events = job.timeline.filter((e) => e.kind === JobEventKind.RESULTS);
    expect(events.map((e) => e.message)).toEqual(["results: 4 test cases: 1 passed, 1 failed, 1 skipped, 1 errored"]);
    // One job.results event on the feed (docs/events.md), when the results are in.
    expect(await feedPayloads(c.sql, jobId, "job.results")).toEqual([
      { schema: "treadmill.event.v1", kind: "job.results", job_id: jobId, attempt: 1, passed: 1, failed: 1, skipped: 1, errors: 1, flaky: false },
    ]);
    const listed = (await jobs().listJobs({ filter: {} })).jobs.find((j) => j.id === jobId)!;
    expect(listed.results?.total).toBe(4n);

    const all = await jobs().listJobResults({ jobId });
    expect(all.attempt).toBe(1);
    expect(all.cases.map((k) => [Number(k.index), k.suite, k.name, k.outcome])).toEqual([
      [0, "net", "ping", TestOutcome.PASS],
      [1, "net", "tcp", TestOutcome.FAIL],
      [2, "fs", "ext4", TestOutcome.SKIP],
      [3, "fs", "xfs", TestOutcome.ERROR],
    ]);
    expect(all.cases[3]!.duration).toMatchObject({ seconds: 1n, nanos: 500_000_000 });
    expect(all.counts?.total).toBe(4n);
  });

  it("filters by outcome, suite and name and pages by keyset, refusing a token of other filters", async () => {
    const { s, jobId } = await runningJob();
    const cases: Case[] = [];
    for (let i = 0; i < 9; i++) cases.push(i % 3 === 0 ? fail(`suite-${i % 2}`, `case_${i}`) : pass(`suite-${i % 2}`, `case_${i}`));
    await report(s, jobId, cases, { last: true });
    const failures = await jobs().listJobResults({ jobId, outcomes: [TestOutcome.FAIL, TestOutcome.ERROR], pageSize: 2 });
    expect(failures.cases.map((k) => k.name)).toEqual(["case_0", "case_3"]);
    const next = await jobs().listJobResults({ jobId, outcomes: [TestOutcome.FAIL, TestOutcome.ERROR], pageSize: 2, pageToken: failures.nextPageToken });
    expect(next.cases.map((k) => k.name)).toEqual(["case_6"]);
    expect(next.nextPageToken).toBe("");
    const bySuite = await jobs().listJobResults({ jobId, suite: "suite-1", nameContains: "CASE_" });
    expect(bySuite.cases.map((k) => k.name)).toEqual(["case_1", "case_3", "case_5", "case_7"]);
    await expect(jobs().listJobResults({ jobId, pageToken: failures.nextPageToken })).rejects.toMatchObject({
      code: Code.InvalidArgument,
      rawMessage: "page_token does not belong to this call's filters",
    });
    await expect(jobs().listJobResults({ jobId, outcomes: [TestOutcome.UNSPECIFIED] })).rejects.toMatchObject({
      code: Code.InvalidArgument,
      rawMessage: "outcomes[0] must be PASS, FAIL, SKIP or ERROR",
    });
  });

  it("compares a series of three labelled jobs: the second shows a new failure, the third its fix", async () => {
    const series = { suite: `smoke-${randomUUID().slice(0, 6)}`, board: "nrf52" };
    const first = await finishedJob({ ...series, commit: "aaa" }, [pass("boot", "a"), pass("boot", "b"), fail("boot", "c")]);
    // Another series (other board) in between is not a base.
    await finishedJob({ ...series, board: "other", commit: "bbb" }, [fail("boot", "a")]);
    const second = await finishedJob({ ...series, commit: "bbb" }, [pass("boot", "a"), fail("boot", "b", "regressed"), fail("boot", "c")]);
    const third = await finishedJob({ ...series, commit: "ccc" }, [pass("boot", "a"), pass("boot", "b"), fail("boot", "c")]);

    const noBase = await jobs().compareJobResults({ jobId: first });
    expect(noBase.baseJob).toBeUndefined();
    expect(noBase.seriesLabels).toEqual(series);

    const regression = await jobs().compareJobResults({ jobId: second });
    expect(regression.baseJob?.id).toBe(first);
    expect(regression.newlyFailing.map((ch) => [ch.case?.name, ch.baseOutcome, ch.case?.message])).toEqual([["b", TestOutcome.PASS, "regressed"]]);
    expect(regression.newlyFailingCount).toBe(1n);
    expect(regression.stillFailing.map((ch) => ch.case?.name)).toEqual(["c"]);
    expect(regression.newlyPassingCount).toBe(0n);

    const fix = await jobs().compareJobResults({ jobId: third });
    expect(fix.baseJob?.id).toBe(second);
    expect(fix.newlyPassing.map((ch) => [ch.case?.name, ch.baseOutcome])).toEqual([["b", TestOutcome.FAIL]]);
    expect(fix.newlyFailingCount).toBe(0n);
    expect(fix.stillFailingCount).toBe(1n);
  });

  it("marks a case that failed on one attempt and passed on the next flaky, and the job with it", async () => {
    const { host, s, jobId } = await runningJob();
    await report(s, jobId, [fail("net", "dhcp"), pass("net", "dns")], { last: true });
    // A second attempt on the same host, as after a restart.
    await c.sql`insert into job_hosts (job_id, attempt, host_id, host_index, started) values (${jobId}, 2, ${host.id}, 0, true)`;
    expect((await jobs().getJob({ jobId })).job!.flaky).toBe(false);
    await report(s, jobId, [pass("net", "dhcp"), pass("net", "dns")], { attempt: 2, last: true });
    const job = (await jobs().getJob({ jobId })).job!;
    expect(job.flaky).toBe(true);
    expect(job.results?.attempt).toBe(2);
    const latest = await jobs().listJobResults({ jobId });
    expect(latest.attempt).toBe(2);
    expect(latest.cases.map((k) => [k.name, k.flaky])).toEqual([["dhcp", true], ["dns", false]]);
    const first = await jobs().listJobResults({ jobId, attempt: 1 });
    expect(first.cases.map((k) => k.outcome)).toEqual([TestOutcome.FAIL, TestOutcome.PASS]);
  });

  it("puts what could not be read and cases over the cap on the timeline, and takes no batch from a host the attempt did not run on", async () => {
    const { s, jobId } = await runningJob();
    const many = Array.from({ length: 60 }, (_, i) => pass("bulk", `case ${i}`));
    await report(s, jobId, many, { problems: ["results/broken.xml: line 3, column 9: </testsuite> closes <testcase>"], last: true });
    const job = (await jobs().getJob({ jobId })).job!;
    expect(job.results?.total).toBe(50n);
    expect(job.timeline.filter((e) => e.kind === JobEventKind.RESULTS).map((e) => e.message)).toEqual([
      "results: results/broken.xml: line 3, column 9: </testsuite> closes <testcase>",
      "results: more than 50 test cases in attempt 1: the rest are dropped",
      "results: 50 test cases: 50 passed, 0 failed, 0 skipped, 0 errored (10 more dropped)",
    ]);

    const stranger = await attach(c, await c.createHost());
    open.push(stranger);
    const other = await runningJob();
    await report(stranger, other.jobId, [fail("x", "made up")], { last: true });
    expect((await jobs().getJob({ jobId: other.jobId })).job!.results).toBeUndefined();
  });

  it("deletes a job's cases, counts and report ids with the job", async () => {
    const { s, jobId } = await runningJob();
    await report(s, jobId, [pass("a", "b"), fail("a", "c")], { last: true });
    await s.exit(jobId, 1);
    await jobInState(c.sql, jobId, "finalized");
    await c.sql`delete from jobs where id = ${jobId}`;
    const left = await c.sql`
      select (select count(*) from job_result_cases where job_id = ${jobId})::int as cases,
             (select count(*) from job_results where job_id = ${jobId})::int as counts,
             (select count(*) from job_result_reports where job_id = ${jobId})::int as reports`;
    expect(left[0]).toEqual({ cases: 0, counts: 0, reports: 0 });
  });

  it("lets no other user read a job's results or compare it, and refuses a call without a token", async () => {
    const { s, jobId } = await runningJob({ suite: "private" });
    await report(s, jobId, [fail("secret", "case")], { last: true });
    const other = await c.createUser();
    const theirs = c.client(JobService, other.token);
    for (const call of [() => theirs.listJobResults({ jobId }), () => theirs.compareJobResults({ jobId })]) {
      await expect(call()).rejects.toMatchObject({ code: Code.PermissionDenied, rawMessage: `job ${jobId} belongs to another user` });
    }
    const anonymous = c.client(JobService, "");
    await expect(anonymous.listJobResults({ jobId })).rejects.toBeInstanceOf(ConnectError);
    await expect(anonymous.listJobResults({ jobId })).rejects.toMatchObject({ code: Code.Unauthenticated });
    const admin = await c.createUser({ role: "admin" });
    expect((await c.client(JobService, admin.token).listJobResults({ jobId })).cases).toHaveLength(1);
  });
});

/** The feed's events of `kind` about a job (numbered or not yet), oldest first: their payloads. */
async function feedPayloads(sql: TestCoordinator["sql"], jobId: string, kind: string): Promise<Record<string, unknown>[]> {
  const rows = await sql<{ payload: Record<string, unknown> }[]>`
    select payload from (select id, payload from feed_pending where job_id = ${jobId} and kind = ${kind}
                         union all select id, payload from feed_events where job_id = ${jobId} and kind = ${kind}) e order by id`;
  return rows.map((r) => r.payload);
}
