import { randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { JobEventKind, JobState, LogStatus } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import type { AttachResponse, LogTokenGrant } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { type JSONWebKeySet, type JWK, TokenVerifier } from "../../lib/tokens.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, attach, finishedJob as ranJob, insertImage } from "../support/jobs.js";

/**
 * The log status of jobs (coordinator/jobs/log-status.ts): JobLogReports of
 * supervisors recorded on the job without touching its state, and fresh
 * log:write tokens granted only to the host an attempt ran on.
 */
describe("job log status and log tokens on the supervisor stream", () => {
  let c: TestCoordinator;
  let user: { id: string; token: string };
  let image: { ref: string; digest: string };
  const open: ScriptedSupervisor[] = [];

  beforeAll(async () => {
    c = await startTestCoordinator({ config: FAST, logServer: false });
    user = await c.createUser();
    image = await insertImage(c.sql);
    await c.sql`insert into services (id, kind, url, site) values (${randomUUID()}, 'log_server', 'http://log-a.invalid', '')`;
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  const finishedJob = () => ranJob(c, user.token, image.ref, open);

  function logReport(s: ScriptedSupervisor, value: { jobId: string; status: LogStatus; bytesLost?: bigint; message?: string; revision: bigint; attempt?: number }) {
    const reportId = randomUUID();
    const ack = s.waitFor((m) => m.payload.case === "ackReport" && m.payload.value.reportId === reportId);
    s.send({ case: "jobLogReport", value: { reportId, attempt: 1, bytesLost: 0n, message: "", ...value } });
    return ack;
  }

  async function askToken(s: ScriptedSupervisor, jobId: string, attempt = 1): Promise<LogTokenGrant> {
    const requestId = randomUUID();
    const answer: Promise<AttachResponse> = s.waitFor((m) => m.payload.case === "logTokenGrant" && m.payload.value.requestId === requestId);
    s.send({ case: "logTokenRequest", value: { requestId, jobId, attempt } });
    return (await answer).payload.value as LogTokenGrant;
  }

  const getJob = async (jobId: string) => (await c.client(JobService, user.token).getJob({ jobId })).job!;

  it("records a host's log reports on a finalized job, the newest revision winning, and puts a loss on the timeline once", async () => {
    const { host, s, jobId } = await finishedJob();
    const finalized = await getJob(jobId);
    expect(finalized.logStatus).toBe(LogStatus.UNSPECIFIED);

    const ack = await logReport(s, { jobId, status: LogStatus.SHIPPING, message: "waiting for log server http://log-a.invalid", revision: 2n });
    expect(ack.payload.value).toMatchObject({ jobId, attempt: 1, terminal: false });
    let job = await getJob(jobId);
    expect(job.logStatus).toBe(LogStatus.SHIPPING);
    expect(job.logStatusMessage).toBe(`waiting for log server http://log-a.invalid on host ${host.name}`);
    // A log report never changes a finalized job's state or end.
    expect(job.state).toBe(JobState.FINALIZED);
    expect(job.finalizeTime).toEqual(finalized.finalizeTime);
    expect(job.finalizeReason).toBe(finalized.finalizeReason);

    // An older revision (a report repeated after a reconnect) changes nothing.
    await logReport(s, { jobId, status: LogStatus.COMPLETE, revision: 1n });
    expect((await getJob(jobId)).logStatus).toBe(LogStatus.SHIPPING);

    const lost = { jobId, status: LogStatus.INCOMPLETE, bytesLost: 12288n, message: "spill cap reached", revision: 3n };
    await logReport(s, lost);
    await logReport(s, lost);
    job = await getJob(jobId);
    expect(job.logStatus).toBe(LogStatus.INCOMPLETE);
    expect(job.logBytesLost).toBe(12288n);
    expect(job.logStatusMessage).toBe(`spill cap reached on host ${host.name}`);
    const events = job.timeline.filter((e) => e.kind === JobEventKind.LOG_INCOMPLETE);
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({ attempt: 1, hostId: host.id, state: JobState.FINALIZED });
    expect(events[0].message).toBe(`log incomplete: 12 KiB lost: spill cap reached on host ${host.name}`);
    expect(timestampMs(events[0].time!)).toBeGreaterThan(timestampMs(finalized.finalizeTime!));

    // The rest arrived later: still incomplete, with the final count.
    await logReport(s, { ...lost, bytesLost: 12288n, message: "spill cap reached", revision: 4n });
    expect((await getJob(jobId)).timeline.filter((e) => e.kind === JobEventKind.LOG_INCOMPLETE)).toHaveLength(1);
  });

  it("takes no log report for an attempt that did not run on the reporting host", async () => {
    const { jobId } = await finishedJob();
    const other = await c.createHost();
    const s = await attach(c, other);
    open.push(s);
    await logReport(s, { jobId, status: LogStatus.INCOMPLETE, bytesLost: 5n, message: "made up", revision: 9n });
    const job = await getJob(jobId);
    expect(job.logStatus).toBe(LogStatus.UNSPECIFIED);
    expect(job.timeline.some((e) => e.kind === JobEventKind.LOG_INCOMPLETE)).toBe(false);
  });

  it("sums the parts of several attempts: incomplete wins, then shipping, then complete", async () => {
    const { host, s, jobId } = await finishedJob();
    // A second attempt on the same host, as after a restart.
    await c.sql`insert into job_hosts (job_id, attempt, host_id, host_index, started, released_at) values (${jobId}, 2, ${host.id}, 0, true, now())`;
    await logReport(s, { jobId, status: LogStatus.COMPLETE, revision: 1n });
    expect((await getJob(jobId)).logStatus).toBe(LogStatus.COMPLETE);
    await logReport(s, { jobId, attempt: 2, status: LogStatus.SHIPPING, message: "waiting", revision: 1n });
    expect((await getJob(jobId)).logStatus).toBe(LogStatus.SHIPPING);
    await logReport(s, { jobId, status: LogStatus.INCOMPLETE, bytesLost: 100n, message: "spill write failed: ENOSPC", revision: 2n });
    const job = await getJob(jobId);
    expect(job.logStatus).toBe(LogStatus.INCOMPLETE);
    expect(job.logBytesLost).toBe(100n);
    expect(job.logStatusMessage).toBe(`spill write failed: ENOSPC on host ${host.name}`);
  });

  it("grants a fresh log:write token only for an attempt that ran on the asking host", async () => {
    const { host, s, jobId } = await finishedJob();
    const grant = await askToken(s, jobId);
    expect(grant).toMatchObject({ jobId, attempt: 1, ok: true, serverUrls: ["http://log-a.invalid"] });
    const keys = async (): Promise<JSONWebKeySet> => ({
      keys: (await c.sql<{ public_jwk: JWK }[]>`select public_jwk from signing_keys`).map((r) => r.public_jwk),
    });
    const verified = await new TokenVerifier({ keys }).verify(grant.writeToken!.token, { scope: "log:write", job: jobId });
    expect(verified.subject).toBe(host.id);
    expect(timestampMs(grant.writeToken!.expireTime!)).toBeGreaterThan(Date.now() + 30 * 60_000);

    // Another host's credential gets nothing for it.
    const other = await c.createHost();
    const intruder = await attach(c, other);
    open.push(intruder);
    const refused = await askToken(intruder, jobId);
    expect(refused).toMatchObject({ ok: false, errorCode: Code.PermissionDenied });
    expect(refused.writeToken).toBeUndefined();
    expect(refused.errorMessage).toBe(`job ${jobId} attempt 1 did not run on this host`);
    // Nor does the host itself for an attempt it never ran, nor anyone for a job that does not exist.
    expect(await askToken(s, jobId, 2)).toMatchObject({ ok: false, errorCode: Code.PermissionDenied });
    expect(await askToken(s, randomUUID())).toMatchObject({ ok: false, errorCode: Code.NotFound });

    const audit = await c.sql<{ kind: string; host_id: string }[]>`
      select kind, host_id from audit_events where kind like 'job.log_token_%' and job_id = ${jobId} order by id`;
    expect(audit.map((a) => [a.kind, a.host_id])).toEqual([
      ["job.log_token_granted", host.id],
      ["job.log_token_refused", other.id],
      ["job.log_token_refused", host.id],
    ]);
    expect(JSON.stringify(audit)).not.toContain(grant.writeToken!.token);
  });

  it("keeps a report whose message has control characters, printable, rather than ending the stream over it", async () => {
    const { host, s, jobId } = await finishedJob();
    await logReport(s, { jobId, status: LogStatus.SHIPPING, message: "waiting for log server\n(Unavailable:\tdown)", revision: 1n });
    expect((await getJob(jobId)).logStatusMessage).toBe(`waiting for log server (Unavailable: down) on host ${host.name}`);
    expect(s.lastError).toBeUndefined();
  });

  it("ends the stream of a supervisor that sends a malformed log report", async () => {
    const { s, jobId } = await finishedJob();
    s.send({ case: "jobLogReport", value: { reportId: "r", jobId, attempt: 1, status: LogStatus.UNSPECIFIED, revision: 1n } });
    await s.ended();
    expect(s.lastError?.code).toBe(Code.InvalidArgument);
    expect(s.lastError?.rawMessage).toBe("job_log_report.status must be SHIPPING, COMPLETE or INCOMPLETE");
  });
});
