import { afterEach, describe, expect, it, jest } from "@jest/globals";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { type Job, JobSchema, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService, type WatchJobResponse, WatchJobResponseSchema } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { watchJob } from "../../cli/commands/job.js";

/** A JobService whose WatchJob plays one script per call (a script throws to break its stream). */
function jobsOf(scripts: ((signal: AbortSignal) => AsyncGenerator<WatchJobResponse>)[]) {
  let calls = 0;
  const transport = createRouterTransport((router) =>
    router.service(JobService, {
      watchJob: (_req, ctx) => scripts[Math.min(calls++, scripts.length - 1)](ctx.signal),
    }),
  );
  return { jobs: createClient(JobService, transport), calls: () => calls };
}

const job = (state: JobState) => create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", state }) });

/** Waits for the stream's cancellation (the caller's abort). */
function aborted(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));
}

afterEach(() => {
  jest.useRealTimers();
});

describe("watchJob", () => {
  it("reopens the stream after Unavailable, with backoff, and resolves with the finalized job", async () => {
    jest.useFakeTimers();
    const { jobs, calls } = jobsOf([
      async function* () {
        yield job(JobState.RUNNING);
        throw new ConnectError("replica stopping", Code.Unavailable);
      },
      async function* () {
        yield job(JobState.FINALIZED);
      },
    ]);
    const seen: JobState[] = [];
    const done = watchJob(jobs, "j1", new AbortController().signal, (j: Job) => void seen.push(j.state));
    await jest.advanceTimersByTimeAsync(250);
    await expect(done).resolves.toMatchObject({ state: JobState.FINALIZED });
    expect(seen).toEqual([JobState.RUNNING, JobState.FINALIZED]);
    expect(calls()).toBe(2);
  });

  it("rejects with a permanent failure without reopening", async () => {
    jest.useFakeTimers();
    const { jobs, calls } = jobsOf([
      // eslint-disable-next-line require-yield
      async function* () {
        throw new ConnectError("job j1 not found", Code.NotFound);
      },
    ]);
    await expect(watchJob(jobs, "j1", new AbortController().signal, () => undefined)).rejects.toMatchObject({ code: Code.NotFound });
    expect(calls()).toBe(1);
  });

  it("rejects as Canceled when the caller aborts", async () => {
    const { jobs } = jobsOf([
      async function* (signal) {
        yield job(JobState.RUNNING);
        await aborted(signal);
      },
    ]);
    const abort = new AbortController();
    const done = watchJob(jobs, "j1", abort.signal, () => abort.abort());
    await expect(done).rejects.toMatchObject({ code: Code.Canceled });
  });
});
