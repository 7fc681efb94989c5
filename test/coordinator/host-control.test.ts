/**
 * JobService.ControlHost on the coordinator (issue #21), with scripted
 * supervisors over real Attach streams: the ControlHostCommand, the
 * supervisor's answer and its code, idempotency by request id, re-delivery
 * on re-attach, an offline host, the call's deadline, the audit log.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { HostControlAction, JobEventKind, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import type { AttachResponse, ControlHostCommand } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, ROOTFS, attach, codeOf, insertImage, jobInState, uniqueTag, waitUntil } from "../support/jobs.js";
import { loadJob } from "../../coordinator/db/queries/jobs.js";
import { insertControl } from "../../coordinator/db/queries/host-controls.js";
import { uuidv7 } from "../../coordinator/shared/common.js";

const isControl = (jobId: string) => (m: AttachResponse) => m.payload.case === "controlHost" && m.payload.value.jobId === jobId;

describe("ControlHost on the coordinator", () => {
  let c: TestCoordinator;
  let user: { id: string; token: string };
  let image: { ref: string };
  const open: ScriptedSupervisor[] = [];

  beforeAll(async () => {
    c = await startTestCoordinator({ config: { ...FAST, supervisorGraceMs: 600_000 } });
    user = await c.createUser();
    image = await insertImage(c.sql, { visibility: "public", mediaTypes: [ROOTFS] });
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  /** A running job on a fresh host, held by a manual scripted supervisor. */
  async function runningJob() {
    const tags = uniqueTag();
    const host = await c.createHost({ tags, mediaTypes: [ROOTFS] });
    const s = await attach(c, host, { reconnect: true });
    open.push(s);
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image: image.ref, hosts: { tags } } });
    const jobId = job!.id;
    await s.startJob(jobId);
    await s.report(jobId, 1, JobState.RUNNING);
    await jobInState(c.sql, jobId, "running");
    return { jobId, s, host };
  }

  const answer = (s: ScriptedSupervisor, command: ControlHostCommand, result: { ok: true; message: string } | { ok: false; errorCode: number; errorMessage: string }) =>
    s.send({ case: "hostControlResult", value: { requestId: command.requestId, controlId: command.controlId, ...result } });

  it("sends one command for two calls with one request id, answers both with the supervisor's line, and audits it", async () => {
    const jobs = c.client(JobService, user.token);
    const { jobId, s, host } = await runningJob();
    const command = s.waitFor(isControl(jobId));
    const request = { jobId, action: HostControlAction.POWER_CYCLE, requestId: "cycle-1" };
    const first = jobs.controlHost(request);
    const second = jobs.controlHost(request);
    const sent = (await command).payload.value as ControlHostCommand;
    expect(sent).toMatchObject({ jobId, attempt: 1, action: HostControlAction.POWER_CYCLE });
    answer(s, sent, { ok: true, message: "board b power-cycled" });
    for (const r of await Promise.all([first, second])) {
      expect(r).toMatchObject({ jobId, hostId: host.id, action: HostControlAction.POWER_CYCLE, message: "board b power-cycled" });
    }
    // Once, though asked twice.
    expect(s.received.filter(isControl(jobId))).toHaveLength(1);
    const [{ n }] = await c.sql<{ n: number }[]>`select count(*)::int as n from host_controls where job_id = ${jobId}`;
    expect(n).toBe(1);
    const events = (await jobs.getJob({ jobId })).job!.timeline.filter((e) => e.kind === JobEventKind.HOST_CONTROL);
    expect(events).toHaveLength(2);
    const audit = await c.sql<{ kind: string }[]>`select kind from audit_events where job_id = ${jobId} and kind in ('job.host_control', 'command.control_host') order by id`;
    expect(audit.map((a) => a.kind)).toEqual(["job.host_control", "command.control_host", "job.host_control"]);
  });

  it("lets the answer to a control end while a second call with its request id holds the job (no deadlock)", async () => {
    const { jobId, host } = await runningJob();
    const control = { jobId, attempt: 1, hostId: host.id, hostIndex: 0, action: "power-cycle" as const, requestedBy: user.id, requestId: "race-1" };
    await insertControl(c.sql, { ...control, id: uuidv7() });
    // The answer's transaction ends the control (a new version of its row, its request id included)...
    const answerTx = await c.sql.reserve();
    try {
      await answerTx`begin`;
      const [{ id }] = await answerTx<{ id: string }[]>`select id from host_controls where job_id = ${jobId} for update`;
      await answerTx`update host_controls set state = 'done', finished_at = now() where id = ${id}`;
      // ...while a second call with the same request id holds the job and waits on that row.
      const second = c.sql.begin(async (tx) => {
        await loadJob(tx, jobId, { lock: true });
        await insertControl(tx, { ...control, id: uuidv7() });
      });
      const outcome = second.then(
        () => "inserted",
        (err: { code?: string }) => err.code,
      );
      await waitUntil(
        async () =>
          (
            await c.sql`select 1 from pg_stat_activity
              where datname = current_database() and wait_event_type = 'Lock' and query like '%insert into host_controls%'`
          ).length > 0,
        "the second call to wait",
      );
      // The answer records the job's timeline event (a row that references the job) and commits.
      await answerTx`insert into job_events (job_id, kind, state, attempt, message) values (${jobId}, 'host_control', 'running', 1, 'answered')`;
      await answerTx`commit`;
      // The second call then finds the first's request id taken, as ControlHost expects.
      expect(await outcome).toBe("23505");
    } finally {
      answerTx.release();
    }
  });

  it("answers with the supervisor's code when it refuses, and the same again under the same request id", async () => {
    const jobs = c.client(JobService, user.token);
    const { jobId, s } = await runningJob();
    const command = s.waitFor(isControl(jobId));
    const call = jobs.controlHost({ jobId, action: HostControlAction.RESET, requestId: "reset-1" }).catch((e: unknown) => ConnectError.from(e));
    answer(s, (await command).payload.value as ControlHostCommand, { ok: false, errorCode: Code.Unavailable, errorMessage: "board b: board command failed (exit 4)" });
    const err = (await call) as ConnectError;
    expect(err.code).toBe(Code.Unavailable);
    expect(err.rawMessage).toBe("board b: board command failed (exit 4)");
    expect(await codeOf(jobs.controlHost({ jobId, action: HostControlAction.RESET, requestId: "reset-1" }))).toBe("Unavailable");
    expect((await jobs.getJob({ jobId })).job!.timeline.at(-1)?.message).toMatch(/reset of host \S+ failed: board b: board command failed \(exit 4\) \(Unavailable\)/);
  });

  it("sends a pending control again to a supervisor that attached again, and a late call with the same request id gets its answer", async () => {
    const jobs = c.client(JobService, user.token);
    const { jobId, s } = await runningJob();
    const first = s.waitFor(isControl(jobId));
    const request = { jobId, action: HostControlAction.POWER_OFF, requestId: "off-1" };
    expect(await codeOf(jobs.controlHost(request, { timeoutMs: 1000 }))).toBe("DeadlineExceeded");
    const before = (await first).payload.value as ControlHostCommand;
    const again = s.waitFor((m) => isControl(jobId)(m) && (m.payload.value as ControlHostCommand).requestId !== before.requestId, { timeoutMs: 30000 });
    await s.drop();
    const resent = (await again).payload.value as ControlHostCommand;
    expect(resent.controlId).toBe(before.controlId);
    const waiting = jobs.controlHost(request);
    answer(s, resent, { ok: true, message: "board b powered off" });
    expect((await waiting).message).toBe("board b powered off");
  });

  it("refuses a host that is offline, and ends a pending control UNAVAILABLE when its host goes away", async () => {
    const jobs = c.client(JobService, user.token);
    const { jobId, s } = await runningJob();
    const command = s.waitFor(isControl(jobId));
    const call = jobs.controlHost({ jobId, action: HostControlAction.RESET }).catch((e: unknown) => ConnectError.from(e));
    await command;
    await s.close();
    const err = (await call) as ConnectError;
    expect(err.code).toBe(Code.Unavailable);
    expect(err.rawMessage).toMatch(/^host \S+ went offline before it answered$/);
    const again = await jobs.controlHost({ jobId, action: HostControlAction.RESET }).catch((e: unknown) => ConnectError.from(e));
    expect(again).toMatchObject({ code: Code.Unavailable, rawMessage: expect.stringMatching(/^host \S+ is offline$/) });
  });

  it("ends a pending control FAILED_PRECONDITION when its job ends before the host answers", async () => {
    const jobs = c.client(JobService, user.token);
    const { jobId, s } = await runningJob();
    const command = s.waitFor(isControl(jobId));
    const call = jobs.controlHost({ jobId, action: HostControlAction.POWER_ON }).catch((e: unknown) => ConnectError.from(e));
    await command;
    await s.exit(jobId, 1, 0);
    const err = (await call) as ConnectError;
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(err.rawMessage).toMatch(/^job \S+ ended before host \S+ answered$/);
    const [row] = await c.sql<{ state: string }[]>`select state from host_controls where job_id = ${jobId}`;
    expect(row.state).toBe("failed");
  });

  it("refuses another user's job and a request id used for another control", async () => {
    const { jobId } = await runningJob();
    const other = await c.createUser();
    expect(await codeOf(c.client(JobService, other.token).controlHost({ jobId, action: HostControlAction.RESET }))).toBe("PermissionDenied");
    const jobs = c.client(JobService, user.token);
    expect(await codeOf(jobs.controlHost({ jobId, action: HostControlAction.RESET, requestId: "x".repeat(65) }))).toBe("InvalidArgument");
    expect(await codeOf(c.client(JobService, user.token).controlHost({ jobId, action: HostControlAction.RESET, requestId: "cycle-1" }))).toBe("InvalidArgument");
  });
});
