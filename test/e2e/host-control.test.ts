/**
 * JobService.ControlHost end to end (issue #21) on the all-in-one testbed:
 * the coordinator, the supervisor stream and the real board driver with a
 * simulated board (and a flaky one, `--flaky-boards`), a process supervisor.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { ExitStatus, FinalizeReason, HostControlAction, JobEventKind, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { simBoardCommand } from "../../supervisor/sim-board/start.js";
import { buildFirmwareImage } from "../../testbed/images.js";
import { pushTestImage } from "../../testbed/provision.js";
import { tml } from "../cli/harness.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";
import { waitUntil } from "../support/wait.js";

const codeOf = (p: Promise<unknown>) =>
  p.then(
    () => "ok",
    (err: unknown) => Code[ConnectError.from(err).code],
  );

describe("host control of a running job on the testbed", () => {
  let tb: RunningTestbed;
  let bob: ReturnType<typeof createClient<typeof JobService>>;
  /** `tml` as the admin. */
  let admin: (args: string[]) => ReturnType<typeof tml>;

  /** Pushes firmware that prints its boot number (counted in the board's state directory) and ends the job at boot `endAt`. */
  const pushCountingFirmware = async (ref: string, endAt: number) => {
    const counter = `boots-${randomUUID()}`;
    const script = `n=$(cat ${counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > ${counter}\necho "boot number $n"\n[ $n -ge ${endAt} ] && echo TREADMILL_EXIT=0\nwhile true; do sleep 1; done\n`;
    await pushTestImage(tb.admin, await buildFirmwareImage({ dir: join(tb.dir, "images"), script }), ref);
  };

  /** The job's console so far ("" until its first frame reached the log server). */
  const consoleOf = (jobId: string) => tb.readLog(jobId, "console").catch(() => "");

  const runningJob = async (spec: Parameters<ReturnType<typeof tb.client<typeof JobService>>["submitJob"]>[0]["spec"]) => {
    const { job } = await tb.client(JobService).submitJob({ spec });
    await tb.waitState(job!.id, JobState.RUNNING);
    return job!.id;
  };

  beforeAll(async () => {
    tb = await startTestbed({ supervisors: 1, config: { flakyBoards: 1 } });
    await tb.pushShellImage("test/sh:1");
    await tb.client(UserService).createUser({ name: "bob", password: "bob-password-1" });
    const { token } = await createClient(AuthService, coordinatorTransport(tb.coordinatorUrl)).login({ name: "bob", password: "bob-password-1" });
    bob = createClient(JobService, coordinatorTransport(tb.coordinatorUrl, token));
    const { name, password } = tb.testbed.admin();
    const adminToken = (await createClient(AuthService, coordinatorTransport(tb.coordinatorUrl)).login({ name, password })).token;
    admin = (args) => tml(join(tb.dir, "tml-contexts.json"), args, { env: { TML_SERVER: tb.coordinatorUrl, TML_TOKEN: adminToken } });
  }, 120000);
  afterAll(async () => {
    await tb?.stop();
  });

  it("power-cycles the simulated board mid-job: the console log shows it booting again and the job runs on to its end", async () => {
    await pushCountingFirmware("test/boots:1", 2);
    const jobs = tb.client(JobService);
    const jobId = await runningJob({ image: "test/boots:1", hosts: { hostCount: 1, tags: { board: "sim" } } });
    await waitUntil(async () => (await consoleOf(jobId)).includes("boot number 1"), "the first boot on the console");

    const request = { jobId, action: HostControlAction.POWER_CYCLE, requestId: `cycle-${jobId}` };
    const answer = await jobs.controlHost(request);
    expect(answer).toMatchObject({ jobId, hostName: "board-1", action: HostControlAction.POWER_CYCLE, message: "board board-1 power-cycled" });
    const done = await tb.waitFinalized(jobId);
    expect(done).toMatchObject({ finalizeReason: FinalizeReason.WORKLOAD_EXITED, exitStatus: ExitStatus.SUCCESS });
    const console = await tb.readLog(jobId, "console");
    expect(console).toMatch(/boot number 1[\s\S]*SimBoard rev 1\.0 -- power on[\s\S]*boot number 2/);
    expect(await tb.readLog(jobId, "supervisor")).toMatch(/host control: power-cycle requested\nhost control: board board-1 power-cycled\n/);

    // The same request again acts once: the same answer, no third boot, no new events.
    expect(await jobs.controlHost(request)).toMatchObject({ message: "board board-1 power-cycled" });
    const timeline = (await jobs.getJob({ jobId })).job!.timeline.filter((e) => e.kind === JobEventKind.HOST_CONTROL);
    expect(timeline.map((e) => e.message)).toEqual(["power-cycle of host board-1 requested by admin", "host board-1: board board-1 power-cycled"]);
    expect((await tb.readLog(jobId, "console")).match(/SimBoard rev 1\.0 -- power on/g)).toHaveLength(2);
    // A request id names one control: another action under it is refused.
    expect(await codeOf(jobs.controlHost({ ...request, action: HostControlAction.RESET }))).toBe("InvalidArgument");
  });

  it("answers FAILED_PRECONDITION from the process driver, which cannot control its host, and leaves the job running", async () => {
    const jobId = await runningJob({ image: "test/sh:1", hosts: { hostCount: 1, tags: { driver: "process" } }, parameters: [{ name: "script", value: "sleep 60" }] });
    const err = await tb
      .client(JobService)
      .controlHost({ jobId, action: HostControlAction.RESET })
      .catch((e: unknown) => ConnectError.from(e));
    expect(err).toBeInstanceOf(ConnectError);
    expect((err as ConnectError).code).toBe(Code.FailedPrecondition);
    expect((err as ConnectError).rawMessage).toBe("the process driver cannot reset a job's host");
    expect((await tb.client(JobService).getJob({ jobId })).job!.state).toBe(JobState.RUNNING);
    const cli = await admin(["job", "reset", jobId]);
    expect(cli.code).not.toBe(0);
    expect(cli.stderr).toContain("the process driver cannot reset a job's host");
    await tb.client(JobService).cancelJob({ jobId });
    await tb.waitFinalized(jobId);
  });

  it("powers a board job's host off and on with tml, saying what was done", async () => {
    await pushCountingFirmware("test/boots:2", 1000);
    const jobId = await runningJob({ image: "test/boots:2", hosts: { hostCount: 1, tags: { board: "sim" } } });
    const off = await admin(["job", "power-off", jobId]);
    expect(off).toMatchObject({ code: 0, stdout: `Job ${jobId}: board board-1 powered off (host board-1).\n` });
    const on = await admin(["job", "power-on", jobId, "--host", "0", "-o", "json"]);
    expect(on.code).toBe(0);
    expect(JSON.parse(on.stdout)).toMatchObject({ jobId, hostName: "board-1", action: "HOST_CONTROL_ACTION_POWER_ON", message: "board board-1 powered on" });
    await waitUntil(async () => (await consoleOf(jobId)).includes("boot number 2"), "the board to boot again");
    expect((await admin(["job", "reset", jobId, "--host", "1"])).stderr).toMatch(/host_index 1 is not a host of job/);
    await tb.client(JobService).cancelJob({ jobId });
    await tb.waitFinalized(jobId);
  });

  it("refuses another user's job, a caller without a token, a service credential, a finalized job and bad input", async () => {
    const jobId = await runningJob({ image: "test/sh:1", hosts: { hostCount: 1, tags: { driver: "process" } }, parameters: [{ name: "script", value: "sleep 60" }] });
    const reset = { jobId, action: HostControlAction.RESET };
    expect(await codeOf(bob.controlHost(reset))).toBe("PermissionDenied");
    expect(await codeOf(createClient(JobService, coordinatorTransport(tb.coordinatorUrl)).controlHost(reset))).toBe("Unauthenticated");
    const { token: service } = await createClient(AuthService, tb.admin).createToken({ scope: TokenScope.SERVICE, description: "a service" });
    expect(await codeOf(createClient(JobService, coordinatorTransport(tb.coordinatorUrl, service)).controlHost(reset))).toBe("PermissionDenied");
    expect(await codeOf(bob.controlHost({ jobId: randomUUID(), action: HostControlAction.RESET }))).toBe("NotFound");
    const jobs = tb.client(JobService);
    expect(await codeOf(jobs.controlHost({ jobId, action: HostControlAction.UNSPECIFIED }))).toBe("InvalidArgument");
    expect(await codeOf(jobs.controlHost({ ...reset, hostIndex: 1 }))).toBe("InvalidArgument");
    expect(await codeOf(jobs.controlHost({ ...reset, hostIndex: -1 }))).toBe("InvalidArgument");
    expect(await codeOf(jobs.controlHost({ ...reset, jobId: "not-a-uuid" }))).toBe("InvalidArgument");
    await jobs.cancelJob({ jobId });
    await tb.waitFinalized(jobId);
    expect(await codeOf(jobs.controlHost(reset))).toBe("FailedPrecondition");
  });

  it("ends an attempt on a flaky board that fails its boot as a host start failure", async () => {
    expect(await simBoardCommand(join(tb.dir, "data", "boards", "flaky-1"), "fault boot-fail")).toBe("ok");
    const { job } = await tb.client(JobService).submitJob({ spec: { image: "example/blinky:latest", hosts: { hostCount: 1, tags: { board: "flaky" } } } });
    const done = await tb.waitFinalized(job!.id);
    expect(done.finalizeReason).toBe(FinalizeReason.HOST_START_FAILURE);
    expect(done.hostIds).toHaveLength(1);
    expect(await tb.readLog(job!.id, "console")).toContain("checksum error, halted");
  });
});
