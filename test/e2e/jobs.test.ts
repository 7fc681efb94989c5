import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { ExitStatus, FinalizeReason, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { dialTunnel } from "../../lib/tunnel/client.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";

/** End to end on npm start's testbed: coordinator, store, cache, log server, proxy, process supervisors and a simulated board. */
describe("jobs end to end on the all-in-one testbed", () => {
  let tb: RunningTestbed;
  beforeAll(async () => {
    tb = await startTestbed();
    await tb.pushShellImage("test/sh:1");
  }, 120000);
  afterAll(async () => {
    await tb?.stop();
  });

  const submit = async (script: string, extra: { secret?: string; jobTimeoutSeconds?: number } = {}) => {
    const { job } = await tb.client(JobService).submitJob({
      spec: {
        image: "test/sh:1",
        hosts: { hostCount: 1 },
        parameters: [
          { name: "script", value: script },
          ...(extra.secret ? [{ name: "token", value: extra.secret, secret: true }] : []),
        ],
        jobTimeout: extra.jobTimeoutSeconds ? { seconds: BigInt(extra.jobTimeoutSeconds) } : undefined,
      },
    });
    return job!.id;
  };

  it("runs the example image pushed at first start and keeps its output on the log server", async () => {
    const { job } = await tb.client(JobService).submitJob({ spec: { image: "example/hello:latest", hosts: { hostCount: 1 } } });
    const done = await tb.waitFinalized(job!.id);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
    expect(await tb.readLog(job!.id, "console")).toContain("hello from treadmill");
    expect(await tb.readLog(job!.id, "supervisor")).toMatch(/fetching image 100%/);
  });

  it("maps a non-zero exit code to a failed job with that code", async () => {
    const id = await submit("echo about to fail; exit 3");
    const done = await tb.waitFinalized(id);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(done.exitStatus).toBe(ExitStatus.FAILURE);
    expect(done.exitCode).toBe(3);
    expect(await tb.readLog(id, "console")).toContain("about to fail");
  });

  it("delivers a secret parameter to the workload and to no log line of any component", async () => {
    const secret = `s3cr3t-${Date.now()}`;
    const id = await submit('[ "$(cat /run/treadmill/secrets/token)" = "$TREADMILL_PARAM_token" ] && echo secret-ok', {
      secret,
    });
    const done = await tb.waitFinalized(id);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
    expect(await tb.readLog(id, "console")).toContain("secret-ok");
    const job = (await tb.client(JobService).getJob({ jobId: id })).job!;
    expect(JSON.stringify(job.spec?.parameters.map((p) => p.value))).not.toContain(secret);
    expect(tb.logLines.length).toBeGreaterThan(0);
    expect(tb.logLines.filter((l) => l.includes(secret))).toEqual([]);
  });

  it("cancels a running job", async () => {
    const id = await submit("echo started; sleep 600");
    await tb.waitState(id, JobState.RUNNING);
    await tb.client(JobService).cancelJob({ jobId: id });
    const done = await tb.waitFinalized(id);
    expect(done.finalizeReason).toBe(FinalizeReason.CANCELED);
  });

  it("stops a job at its timeout", async () => {
    const id = await submit("sleep 600", { jobTimeoutSeconds: 2 });
    const done = await tb.waitFinalized(id);
    expect(done.finalizeReason).toBe(FinalizeReason.JOB_TIMEOUT);
  });

  it("opens the console of a running job through the proxy: type a line, read the answer", async () => {
    const id = await submit('echo ready; while read line; do echo "got:$line"; done');
    await tb.waitState(id, JobState.RUNNING);
    const session = await tb.client(JobService).openJobSession({ jobId: id, portName: "console" });
    const tunnel = await dialTunnel({
      proxyUrl: session.grpcUrl,
      token: session.dialToken!.token,
      jobId: id,
      port: "console",
      hostId: session.hostId,
    });
    let seen = "";
    const answered = new Promise<void>((resolve) => {
      tunnel.on("data", (chunk: Buffer) => {
        seen += chunk.toString();
        if (seen.includes("got:hello-console")) resolve();
      });
    });
    tunnel.write("hello-console\n");
    await answered;
    tunnel.destroy();
    await tb.client(JobService).cancelJob({ jobId: id });
    expect((await tb.waitFinalized(id)).finalizeReason).toBe(FinalizeReason.CANCELED);
  });

  it("runs a two-host job on both hosts at once and ends it for both", async () => {
    const { job } = await tb.client(JobService).submitJob({
      spec: {
        image: "test/sh:1",
        hosts: { hostCount: 2 },
        parameters: [{ name: "script", value: "echo on-$(hostname)-$TREADMILL_HOST_INDEX; sleep 1" }],
      },
    });
    const done = await tb.waitFinalized(job!.id);
    expect(done.hostIds.length).toBe(2);
    expect(new Set(done.hostIds).size).toBe(2);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
  });

  it("runs the example firmware on the simulated board and reads its serial console", async () => {
    const { job } = await tb.client(JobService).submitJob({
      spec: { image: "example/blinky:latest", hosts: { hostCount: 1, tags: { board: "sim" } } },
    });
    const done = await tb.waitFinalized(job!.id);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
    const serial = await tb.readLog(job!.id, "console");
    expect(serial).toContain("blinky booted");
    expect(serial).toContain("blink 3");
  });

  it("gives the next job on a host a clean work directory", async () => {
    const first = await submit("echo left-behind > /root/marker; echo wrote");
    expect((await tb.waitFinalized(first)).exitStatus).toBe(ExitStatus.SUCCESS);
    const second = await submit("if [ -e /root/marker ]; then echo found; exit 1; fi; echo clean");
    const done = await tb.waitFinalized(second);
    expect(await tb.readLog(second, "console")).toContain("clean");
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
  });
});
