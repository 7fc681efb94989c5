/**
 * Hold on failure end to end (issue #22, JobSpec.hold_on_failure) on the
 * all-in-one testbed: a process supervisor (real sandboxed processes) and
 * the board driver with a simulated board. A failed job stays RUNNING in
 * stage HELD with its host as it was, its owner opens its console, and
 * canceling it finalizes it with the workload's exit code and resets the
 * host for the next job.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { join } from "node:path";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { ExitStatus, FinalizeReason, HostControlAction, JobEventKind, JobStage, JobState, type Job } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LeaseEventKind, LeaseService } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { dialTunnel } from "../../lib/tunnel/client.js";
import { buildFirmwareImage } from "../../testbed/images.js";
import { pushTestImage } from "../../testbed/provision.js";
import { startTml } from "../cli/harness.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";
import { waitUntil } from "../support/wait.js";

describe("hold on failure on the testbed", () => {
  let tb: RunningTestbed;
  let bobToken: string;
  let bobTransport: Transport;
  let bob: Client<typeof JobService>;

  beforeAll(async () => {
    tb = await startTestbed({ supervisors: 1 });
    await tb.client(UserService).createUser({ name: "bob", password: "bob-password-1" });
    bobToken = (await createClient(AuthService, coordinatorTransport(tb.coordinatorUrl)).login({ name: "bob", password: "bob-password-1" })).token;
    bobTransport = coordinatorTransport(tb.coordinatorUrl, bobToken);
    bob = createClient(JobService, bobTransport);
    await tb.pushShellImage("bob/sh:1", undefined, bobTransport);
  }, 120000);
  afterAll(async () => {
    await tb?.stop();
  });

  /** Waits until the job is held (RUNNING in stage HELD), or fails when it ends first. */
  const held = async (jobId: string): Promise<Job> => {
    for await (const { job } of bob.watchJob({ jobId }, { signal: AbortSignal.timeout(60000) })) {
      if (job?.state === JobState.RUNNING && job.stage === JobStage.HELD) return job;
      if (job?.state === JobState.FINALIZED) throw new Error(`job ${jobId} ended instead of being held: ${job.statusMessage}`);
    }
    throw new Error(`watch of job ${jobId} ended before it was held`);
  };

  /** Opens the job's console as bob, types `line`, and resolves with what came back once it includes `expected`. */
  const consoleAnswer = async (jobId: string, line: string, expected: string): Promise<string> => {
    const session = await bob.openJobSession({ jobId, portName: "console" });
    const tunnel = await dialTunnel({ proxyUrl: session.grpcUrl, token: session.dialToken!.token, jobId, port: "console", hostId: session.hostId });
    let seen = "";
    try {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no "${expected}" on the console of job ${jobId}; saw: ${seen}`)), 30000);
        tunnel.on("data", (chunk: Buffer) => {
          seen += chunk.toString();
          if (seen.includes(expected)) {
            clearTimeout(timer);
            resolve();
          }
        });
        tunnel.write(line);
      });
    } finally {
      tunnel.destroy();
    }
    return seen;
  };

  it("keeps a failed process job's files with a shell on its console until it is canceled, then ends it with the workload's exit code and a clean host", async () => {
    const { job } = await bob.submitJob({
      spec: {
        image: "bob/sh:1",
        hosts: { hostCount: 1 },
        parameters: [{ name: "script", value: "echo evidence-42 > /root/evidence; echo failing now; exit 3" }],
        jobTimeout: { seconds: 600n },
        holdOnFailure: { seconds: 600n },
      },
    });
    const jobId = job!.id;
    const heldJob = await held(jobId);
    const event = heldJob.timeline.find((e) => e.kind === JobEventKind.LEASE);
    expect(event?.message).toMatch(new RegExp(`held for a post-mortem as lease \\S+ until .*tml console ${jobId}.*tml lease release`));

    // The owner's console is a shell in the failed job's own files.
    const seen = await consoleAnswer(jobId, "cat /root/evidence\n", "evidence-42");
    expect(seen).toContain("evidence-42");
    expect(await tb.readLog(jobId, "supervisor")).toMatch(/workload exited with code 3[\s\S]*held: workload exited with code 3/);

    await bob.cancelJob({ jobId, message: "post-mortem done" });
    const done = await tb.waitFinalized(jobId);
    expect(done).toMatchObject({ finalizeReason: FinalizeReason.WORKLOAD_EXITED, exitStatus: ExitStatus.FAILURE, exitCode: 3 });
    expect(done.timeline.some((e) => e.kind === JobEventKind.CANCEL_REQUESTED)).toBe(true);

    // The host was reset: the next job there sees none of the held job's files.
    const { job: next } = await bob.submitJob({
      spec: { image: "bob/sh:1", hosts: { hostCount: 1 }, parameters: [{ name: "script", value: "test ! -e /root/evidence && echo clean" }] },
    });
    const after = await tb.waitFinalized(next!.id);
    expect(after).toMatchObject({ exitStatus: ExitStatus.SUCCESS, hostIds: done.hostIds });
  });

  it("keeps a failed board job's board powered with its serial console and host control until its owner releases the hold lease, then powers it off", async () => {
    const script = 'echo "firmware up"\necho TREADMILL_EXIT=5\nwhile read line; do echo "post-mortem:$line"; done\n';
    await pushTestImage(bobTransport, await buildFirmwareImage({ dir: join(tb.dir, "images"), script }), "bob/fails:1");
    const { job } = await bob.submitJob({
      spec: { image: "bob/fails:1", hosts: { hostCount: 1, tags: { board: "sim" } }, holdOnFailure: { seconds: 600n } },
    });
    const jobId = job!.id;
    const heldJob = await held(jobId);
    expect(await consoleAnswer(jobId, "still-there\n", "post-mortem:still-there")).toContain("post-mortem:still-there");
    // Host control works on the held board: it boots again, and is still held.
    const answer = await bob.controlHost({ jobId, action: HostControlAction.POWER_CYCLE, requestId: `cycle-${jobId}` });
    expect(answer.message).toMatch(/power-cycled/);
    expect((await bob.getJob({ jobId })).job).toMatchObject({ state: JobState.RUNNING, stage: JobStage.HELD });

    await createClient(LeaseService, bobTransport).releaseLease({ leaseId: heldJob.leaseId });
    const done = await tb.waitFinalized(jobId);
    expect(done).toMatchObject({ finalizeReason: FinalizeReason.WORKLOAD_EXITED, exitStatus: ExitStatus.FAILURE, exitCode: 5 });
    expect(await tb.readLog(jobId, "supervisor")).toMatch(/held as it is[\s\S]*hold ended: resetting the host[\s\S]*board powered off \(job stopped\)/);
  });

  it("makes tml job run say how to attach when the job is held, keep the hold alive while it follows, and end with the workload's failure once it is canceled", async () => {
    const run = startTml(join(tb.dir, "tml-contexts.json"), ["job", "run", "bob/sh:1", "--param", "script=exit 4", "--hold-on-failure", "10m"], {
      env: { TML_SERVER: tb.coordinatorUrl, TML_TOKEN: bobToken },
    });
    const hint = await run.waitForLine(/tml console (\S+)/, 60000);
    expect(hint).toMatch(/held for a post-mortem as lease .*tml lease release/);
    const jobId = /tml console (\S+)"/.exec(hint)![1];
    await run.waitForLine(/tml keeps the hold alive while it follows the job/);
    const { job } = await bob.getJob({ jobId });
    const leases = createClient(LeaseService, bobTransport);
    await waitUntil(async () => {
      const { lease } = await leases.getLease({ leaseId: job!.leaseId });
      return lease!.timeline.some((e) => e.kind === LeaseEventKind.KEEPALIVE && e.message === "keepalive stream opened by bob");
    }, "tml's keepalive on the hold lease");
    await bob.cancelJob({ jobId });
    const result = await run.result;
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(`job ${jobId} failed (exit code 4)`);
  });
});
