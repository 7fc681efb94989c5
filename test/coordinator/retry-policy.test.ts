/**
 * The retry policy (JobSpec.retry) on the pure decisions of
 * coordinator/jobs/store.ts: which end of an attempt is retried under
 * which condition's budget, and how the restart policy's budget stays its
 * own; and SubmitJob's validation of it (validate.ts).
 * test/cli/job-files.test.ts runs retries on real hosts.
 */
import { describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { endOutcome, retryCondition } from "../../coordinator/jobs/store.js";
import { validateSpec } from "../../coordinator/jobs/validate.js";
import type { JobConfig } from "../../coordinator/jobs/config.js";
import type { JobHead } from "../../coordinator/db/queries/jobs.js";
import { JobSpecSchema, RetryCondition } from "../../gen/treadmill/coordinator/v1/job_pb.js";

function head(init: Partial<JobHead> = {}): JobHead {
  return { id: "j", owner_id: "u", state: "running", stage: null, attempt: 1, max_restarts: 0, stop_reason: null, health_check_id: null, ...init };
}

const failed = { reason: "workload_exited", exitStatus: "failure" } as const;
const passed = { reason: "workload_exited", exitStatus: "success" } as const;
const startFailed = { reason: "host_start_failure" } as const;
const dropped = { reason: "host_dropped" } as const;

/** Walks a job through `ends`, counting retries as the database does; returns each end's decision. */
function walk(job: JobHead, ends: { reason: "workload_exited" | "host_start_failure" | "host_dropped"; exitStatus?: "success" | "failure" }[]): string[] {
  const retries: Record<string, number> = {};
  let attempt = job.attempt;
  const out: string[] = [];
  for (const end of ends) {
    const now = { ...job, attempt, retries: { ...retries } };
    const condition = retryCondition(now, end);
    const outcome = endOutcome(now, end);
    out.push(condition !== null ? `retried (${condition})` : outcome);
    if (condition !== null) retries[condition] = (retries[condition] ?? 0) + 1;
    if (outcome === "finalized") break;
    attempt += 1;
  }
  return out;
}

describe("the retry policy", () => {
  it("retries a workload failure up to its budget, then finalizes; a pass is never retried", () => {
    const job = head({ retry_on: ["workload_failure"], retry_max: 2 });
    expect(walk(job, [failed, failed, failed])).toEqual(["retried (workload_failure)", "retried (workload_failure)", "finalized"]);
    expect(walk(job, [passed])).toEqual(["finalized"]);
  });

  it("keeps a budget per condition, apart from the restart policy's", () => {
    const job = head({ retry_on: ["workload_failure", "host_start_failure"], retry_max: 1, max_restarts: 1 });
    expect(walk(job, [startFailed, failed, startFailed, dropped, dropped])).toEqual([
      "retried (host_start_failure)",
      "retried (workload_failure)",
      // The start budget is spent: the restart policy's one restart takes it.
      "restarted",
      // Restarts spent too.
      "finalized",
    ]);
  });

  it("never counts an infrastructure end as a workload failure", () => {
    const job = head({ retry_on: ["workload_failure"], retry_max: 3 });
    expect(walk(job, [dropped])).toEqual(["finalized"]);
    expect(walk({ ...job, max_restarts: 1 }, [dropped, failed, dropped])).toEqual(["restarted", "retried (workload_failure)", "finalized"]);
  });

  it("retries nothing after a requested stop (cancel, job timeout) or without a policy", () => {
    expect(retryCondition(head({ retry_on: ["workload_failure"], retry_max: 1, stop_reason: "job_timeout" }), failed)).toBeNull();
    expect(retryCondition(head({ retry_on: ["workload_failure"], retry_max: 1, stop_reason: "canceled" }), failed)).toBeNull();
    expect(retryCondition(head(), failed)).toBeNull();
    expect(retryCondition(head({ retry_on: ["host_start_failure"], retry_max: 1 }), failed)).toBeNull();
  });
});

describe("SubmitJob's validation of spec.retry", () => {
  const config = { defaultQueueTimeoutMs: 60_000, maxQueueTimeoutMs: 3_600_000, defaultJobTimeoutMs: 60_000, maxJobTimeoutMs: 3_600_000, leaseMaxDurationMs: 3_600_000 } as JobConfig;
  const refusal = (retry: Record<string, unknown>, extra: Record<string, unknown> = {}) => {
    try {
      validateSpec(create(JobSpecSchema, { image: "x:1", retry, ...extra }), config);
    } catch (err) {
      const e = ConnectError.from(err);
      return `${Code[e.code]}: ${e.rawMessage}`;
    }
    return "accepted";
  };

  it("takes a valid policy and names each bad field", () => {
    expect(validateSpec(create(JobSpecSchema, { image: "x:1", retry: { on: [RetryCondition.WORKLOAD_FAILURE], max: 2, otherHost: true } }), config).retry).toEqual({
      on: ["workload_failure"],
      max: 2,
      otherHost: true,
    });
    expect(refusal({ on: [], max: 1 })).toBe("InvalidArgument: spec.retry.on must name at least one condition");
    expect(refusal({ on: [0], max: 1 })).toBe("InvalidArgument: spec.retry.on[0] is not a retry condition");
    expect(refusal({ on: [1, 1], max: 1 })).toBe("InvalidArgument: spec.retry.on names a condition twice");
    expect(refusal({ on: [1], max: 0 })).toBe("InvalidArgument: spec.retry.max must be between 1 and 10");
    expect(refusal({ on: [1], max: 11 })).toBe("InvalidArgument: spec.retry.max must be between 1 and 10");
    expect(refusal({ on: [1], max: 1 }, { holdOnFailure: { seconds: 60n } })).toBe(
      "InvalidArgument: spec.retry on workload failure and spec.hold_on_failure exclude each other",
    );
    expect(refusal({ on: [2], max: 1 }, { holdOnFailure: { seconds: 60n } })).toBe("accepted");
  });
});
