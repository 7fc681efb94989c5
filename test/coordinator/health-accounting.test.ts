/** coordinator/jobs/health.ts's `account`: what the ends of jobs on a host do to its health (pure). */
import { describe, expect, it } from "@jest/globals";
import type { HostAccount } from "../../coordinator/db/queries/health-checks.js";
import { type EndFact, account } from "../../coordinator/jobs/health.js";

const HOST = "0190a6c0-0000-7000-8000-000000000001";
const CHECK = "0190a6c0-0000-7000-8000-0000000000cc";

function host(init: Partial<HostAccount> = {}): HostAccount {
  return {
    id: HOST,
    name: "board-1",
    health: "healthy",
    infra_failures: 0,
    infra_failed_jobs: [],
    jobs_since_check: 0,
    check_retries: 0,
    retrying: true,
    checks: 0,
    k: 3,
    every_jobs: null,
    needs_admin: false,
    open_checks: 0,
    names: { [CHECK]: "smoke" },
    ...init,
  };
}

let n = 0;
function end(reason: EndFact["reason"], init: Partial<EndFact> = {}): EndFact {
  n++;
  return {
    hostId: HOST,
    jobId: `job-${n}`,
    reason,
    exitStatus: reason === "workload_exited" ? "success" : null,
    message: "",
    checkId: null,
    attempt: 1,
    state: "finalized",
    ownerId: "u",
    ...init,
  };
}

describe("the health accounting of a host", () => {
  it("quarantines at the K-th infrastructure failure in a row, naming the failing jobs, and waits for a retry", () => {
    const ends = [end("host_start_failure"), end("host_dropped"), end("internal_error")];
    const r = account(host(), ends);
    expect(r.write).toMatchObject({ infra_failures: 3, infra_failed_jobs: ends.map((e) => e.jobId), retry: "start", check_retries: 0 });
    expect(r.verdict).toMatchObject({ health: "quarantined", jobId: ends[2].jobId });
    expect(r.verdict?.reason).toMatch(/^3 infrastructure failures in a row \(jobs job-\d+, job-\d+, job-\d+; last: internal_error\)$/);
  });

  it("never counts the workload's exit, a job timeout, a cancel or a bad image, and clears the count on them", () => {
    const r = account(host({ infra_failures: 2, infra_failed_jobs: ["a", "b"] }), [
      end("workload_exited", { exitStatus: "failure" }),
      end("job_timeout"),
      end("canceled"),
      end("image_error"),
    ]);
    expect(r.write).toMatchObject({ infra_failures: 0, infra_failed_jobs: [], jobs_since_check: 4 });
    expect(r.verdict).toBeUndefined();
  });

  it("sends a host with a check to CHECKING after an infrastructure failure below K", () => {
    const r = account(host({ checks: 1, k: 2 }), [end("host_start_failure")]);
    expect(r.verdict).toMatchObject({ health: "checking" });
    expect(r.write.infra_failures).toBe(1);
  });

  it("sends a healthy host to CHECKING once its user jobs reach a check's every_jobs", () => {
    const h = host({ checks: 1, every_jobs: 3, jobs_since_check: 1 });
    expect(account(h, [end("workload_exited")]).verdict).toBeUndefined();
    expect(account(h, [end("workload_exited"), end("workload_exited")]).verdict).toMatchObject({
      health: "checking",
      reason: "3 jobs since its last check",
    });
  });

  it("makes a CHECKING host HEALTHY only when its last open check passes", () => {
    const pass = (id: string) => end("workload_exited", { checkId: CHECK, jobId: id });
    expect(account(host({ health: "checking", checks: 2, open_checks: 2 }), [pass("h1")]).verdict).toBeUndefined();
    expect(account(host({ health: "checking", checks: 2, open_checks: 2 }), [pass("h1"), pass("h2")]).verdict).toMatchObject({
      health: "healthy",
      reason: "",
    });
  });

  it("quarantines on a failed check and counts the retries of a quarantined host", () => {
    const failed = end("workload_exited", { checkId: CHECK, exitStatus: "failure", message: "no /dev/ttyACM0" });
    const first = account(host({ health: "checking", checks: 1, open_checks: 1 }), [failed]);
    expect(first.verdict?.reason).toBe(`health check smoke failed (job ${failed.jobId}: exited with failure: no /dev/ttyACM0)`);
    expect(first.write).toMatchObject({ check_retries: 0, retry: "start" });
    const again = account(host({ health: "quarantined", checks: 1, open_checks: 1, check_retries: 2 }), [end("host_start_failure", { checkId: CHECK })]);
    expect(again.write).toMatchObject({ check_retries: 3, retry: "start" });
  });

  it("returns a quarantined host on a passed retry, or records that it waits for an admin", () => {
    const pass = end("workload_exited", { checkId: CHECK });
    const back = account(host({ health: "quarantined", checks: 1, open_checks: 1, infra_failures: 3, check_retries: 4 }), [pass]);
    expect(back.verdict).toMatchObject({ health: "healthy" });
    expect(back.write).toMatchObject({ infra_failures: 0, check_retries: 0, retry: "stop" });
    const waits = account(host({ health: "quarantined", checks: 1, open_checks: 1, needs_admin: true }), [pass]);
    expect(waits.verdict).toMatchObject({ health: "quarantined", reason: expect.stringContaining("waits for an admin") });
    expect(waits.write.retry).toBe("stop");
  });

  it("lets a canceled health job decide nothing, and changes nothing of a retired host", () => {
    expect(account(host({ health: "checking", checks: 1, open_checks: 1 }), [end("canceled", { checkId: CHECK })]).verdict).toBeUndefined();
    const retired = account(host({ health: "retired" }), [end("host_dropped"), end("host_dropped"), end("host_dropped")]);
    expect(retired.verdict).toBeUndefined();
    expect(retired.write.infra_failures).toBe(0);
  });

  it("lets no check decide for a host an admin quarantined: only a return brings it back", () => {
    const manual = host({ health: "quarantined", checks: 1, open_checks: 1, retrying: false });
    expect(account(manual, [end("workload_exited", { checkId: CHECK })]).verdict).toBeUndefined();
    const failed = account(manual, [end("workload_exited", { checkId: CHECK, exitStatus: "failure" })]);
    expect(failed.verdict).toBeUndefined();
    expect(failed.write.retry).toBe("keep");
  });
});
