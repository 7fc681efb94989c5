/**
 * The secret values a finished job keeps for its owner's re-runs
 * (JobService.RerunJob): kept after its end for rerunSecretsMs, then
 * deleted by the sweep, after which a re-run must give them again. Against
 * a real coordinator (no hosts: the jobs are canceled while queued).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { JobSchema, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { toJsonString } from "@bufbuild/protobuf";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { insertImage } from "../support/jobs.js";
import { waitUntil } from "../support/wait.js";

let c: TestCoordinator;
let image: string;
let user: { id: string; token: string };

async function secretsOf(jobId: string): Promise<string[]> {
  return (await c.sql<{ value: string }[]>`select value from job_secrets where job_id = ${jobId}`).map((r) => r.value);
}

beforeAll(async () => {
  c = await startTestCoordinator({ config: { rerunSecretsMs: 1500, jobSweepIntervalMs: 50 } });
  image = (await insertImage(c.sql)).ref;
  user = await c.createUser();
}, 60_000);

afterAll(async () => {
  await c?.stop();
});

describe("the secret values of a finished job", () => {
  it("are kept for its owner's re-run, then deleted after rerunSecretsMs, and a re-run must give them again", async () => {
    const jobs = c.client(JobService, user.token);
    const { job } = await jobs.submitJob({ spec: { image, parameters: [{ name: "KEY", value: "s3cret", secret: true }] }, requestId: randomUUID() });
    const canceled = await jobs.cancelJob({ jobId: job!.id });
    expect(canceled.job!.state).toBe(JobState.FINALIZED);
    expect(await secretsOf(job!.id)).toEqual(["s3cret"]);

    const { job: rerun } = await jobs.rerunJob({ jobId: job!.id, requestId: randomUUID() });
    expect(await secretsOf(rerun!.id)).toEqual(["s3cret"]);
    expect(toJsonString(JobSchema, rerun!)).not.toContain("s3cret");

    await waitUntil(async () => (await secretsOf(job!.id)).length === 0, "the finished job's secret values to be deleted", 10_000);
    const err = await jobs.rerunJob({ jobId: job!.id, requestId: randomUUID() }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err?.code).toBe(Code.FailedPrecondition);
    expect(err?.rawMessage).toBe(`the value of secret parameter KEY of job ${job!.id} is no longer kept: give it again in parameters`);
    const { job: given } = await jobs.rerunJob({ jobId: job!.id, requestId: randomUUID(), parameters: [{ name: "KEY", value: "new", secret: true }] });
    expect(await secretsOf(given!.id)).toEqual(["new"]);
    // The unfinished re-run keeps its own.
    expect(await secretsOf(rerun!.id)).toEqual(["s3cret"]);
  }, 30_000);
});
