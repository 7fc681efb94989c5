/**
 * DESIGN.md §4's reconciliation table, row by row, on the pure functions of
 * coordinator/jobs/reconciliation.ts: what the database records, what the
 * supervisor says, and what the coordinator does. reconcile.test.ts drives
 * the same rows through real Attach streams and PostgreSQL.
 */
import { describe, expect, it } from "@jest/globals";
import { ExitStatus, FinalizeReason, JobStage, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import {
  type HelloAction,
  type RecordedSlot,
  type ReportedJob,
  type Settled,
  type SyncAction,
  type SyncSlot,
  commandsFor,
  reconcileHello,
  settleEnd,
  termination,
} from "../../coordinator/jobs/reconciliation.js";
import type { JobHead } from "../../coordinator/db/queries/jobs.js";

const J = "0190a6c0-0000-7000-8000-00000000000a";
const K = "0190a6c0-0000-7000-8000-00000000000b";

function slot(init: Partial<RecordedSlot> = {}): RecordedSlot {
  return { jobId: J, attempt: 1, started: true, terminated: false, jobState: "running", jobAttempt: 1, stopReason: null, ...init };
}

function head(init: Partial<JobHead> = {}): JobHead {
  return { id: J, owner_id: "u", state: "running", stage: null, attempt: 1, max_restarts: 0, stop_reason: null, health_check_id: null, ...init };
}

const holds = (init: Partial<ReportedJob> = {}): ReportedJob => ({ jobId: J, attempt: 1, state: JobState.RUNNING, stage: JobStage.UNSPECIFIED, ...init });
const exited = (code: number) => ({ reason: FinalizeReason.WORKLOAD_EXITED, exitStatus: code === 0 ? ExitStatus.SUCCESS : ExitStatus.FAILURE, exitCode: code, message: "" });

interface Row {
  /** The row of DESIGN.md §4, in its words. */
  row: string;
  recorded: RecordedSlot[];
  reported: ReportedJob[];
  /** What the hello does. */
  hello: HelloAction[];
  /** The commands that follow from the database (nothing sent on the stream yet). */
  commands?: SyncAction[];
  /** For an end: the job at that moment, and how its attempt ends. */
  job?: JobHead;
  settled?: Partial<Settled>;
}

const rows: Row[] = [
  {
    row: "job K is not assigned to this host | holds K | StopJob K",
    recorded: [],
    reported: [holds({ jobId: K })],
    hello: [{ kind: "stop", jobId: K, attempt: 1, reason: FinalizeReason.INTERNAL_ERROR, message: "the job is not assigned to this host" }],
    commands: [],
  },
  {
    row: "J assigned, not yet started | does not hold J | send StartJob J again",
    recorded: [slot({ jobState: "assigned", started: false })],
    reported: [],
    hello: [],
    commands: [{ kind: "start", jobId: J, attempt: 1 }],
  },
  {
    row: "J assigned | holds J, not terminated | adopt the reported state",
    recorded: [slot({ jobState: "assigned", started: false })],
    reported: [holds({ state: JobState.INITIALIZING, stage: JobStage.FETCHING_IMAGE })],
    hello: [{ kind: "adopt", jobId: J, attempt: 1, state: "initializing", stage: "fetching_image" }],
  },
  {
    row: "J running | holds J, not terminated | adopt the reported state",
    recorded: [slot()],
    reported: [holds()],
    hello: [{ kind: "adopt", jobId: J, attempt: 1, state: "running", stage: null }],
    commands: [],
  },
  {
    row: "J running | does not hold J | finalize J HOST_DROPPED, restart policy (none left)",
    recorded: [slot()],
    reported: [],
    hello: [{ kind: "end", jobId: J, attempt: 1, termination: { reason: "host_dropped", message: "host sup-1 re-attached without the job" }, ack: false }],
    job: head(),
    settled: { outcome: "finalized", reason: "host_dropped", exitStatus: null },
  },
  {
    row: "J running | does not hold J | HOST_DROPPED restarts J when the policy allows",
    recorded: [slot()],
    reported: [],
    hello: [{ kind: "end", jobId: J, attempt: 1, termination: { reason: "host_dropped", message: "host sup-1 re-attached without the job" }, ack: false }],
    job: head({ max_restarts: 1 }),
    settled: { outcome: "restarted", reason: "host_dropped" },
  },
  {
    row: "J cancel requested | holds J, not terminated | StopJob J again",
    recorded: [slot({ stopReason: "canceled" })],
    reported: [holds()],
    hello: [{ kind: "adopt", jobId: J, attempt: 1, state: "running", stage: null }],
    commands: [{ kind: "stop", jobId: J, attempt: 1, reason: FinalizeReason.CANCELED, message: "canceled" }],
  },
  {
    row: "J timeout requested | holds J, not terminated | StopJob J again",
    recorded: [slot({ stopReason: "job_timeout" })],
    reported: [holds()],
    hello: [{ kind: "adopt", jobId: J, attempt: 1, state: "running", stage: null }],
    commands: [{ kind: "stop", jobId: J, attempt: 1, reason: FinalizeReason.JOB_TIMEOUT, message: "job timeout" }],
  },
  {
    row: "J cancel requested | does not hold J | finalized CANCELED: it does not run there",
    recorded: [slot({ stopReason: "canceled" })],
    reported: [],
    hello: [{ kind: "end", jobId: J, attempt: 1, termination: { reason: "canceled", message: "not running on its host" }, ack: false }],
    job: head({ stop_reason: "canceled" }),
    settled: { outcome: "finalized", reason: "canceled" },
  },
  {
    row: "J cancel requested | J terminated | finalize with the requested reason (it wins over the workload's exit)",
    recorded: [slot({ stopReason: "canceled" })],
    reported: [holds({ termination: exited(0) })],
    hello: [{ kind: "end", jobId: J, attempt: 1, termination: { reason: "workload_exited", exitStatus: "success", exitCode: 0, message: "" }, ack: true }],
    job: head({ stop_reason: "canceled", max_restarts: 3 }),
    settled: { outcome: "finalized", reason: "canceled", exitStatus: null, exitCode: 0 },
  },
  {
    row: "J timeout requested | J terminated | finalize JOB_TIMEOUT",
    recorded: [slot({ stopReason: "job_timeout" })],
    reported: [holds({ termination: exited(1) })],
    hello: [{ kind: "end", jobId: J, attempt: 1, termination: { reason: "workload_exited", exitStatus: "failure", exitCode: 1, message: "" }, ack: true }],
    job: head({ stop_reason: "job_timeout" }),
    settled: { outcome: "finalized", reason: "job_timeout", exitStatus: null },
  },
  {
    row: "J running | J terminated | finalize WORKLOAD_EXITED with the exit status, acknowledge",
    recorded: [slot()],
    reported: [holds({ termination: exited(3) })],
    hello: [{ kind: "end", jobId: J, attempt: 1, termination: { reason: "workload_exited", exitStatus: "failure", exitCode: 3, message: "" }, ack: true }],
    job: head(),
    settled: { outcome: "finalized", reason: "workload_exited", exitStatus: "failure", exitCode: 3 },
  },
  {
    row: "J finalized | J terminated (report retained) | acknowledge; the slot becomes free",
    recorded: [slot({ jobState: "finalized", terminated: true })],
    reported: [holds({ termination: exited(0) })],
    hello: [{ kind: "end", jobId: J, attempt: 1, termination: { reason: "workload_exited", exitStatus: "success", exitCode: 0, message: "" }, ack: true }],
    job: head({ state: "finalized" }),
    settled: { outcome: "none" },
  },
  {
    row: "K not assigned to this host | K terminated (report retained) | acknowledge only",
    recorded: [],
    reported: [holds({ jobId: K, termination: exited(0) })],
    hello: [{ kind: "ack", jobId: K, attempt: 1 }],
  },
  {
    row: "J's attempt no longer current (a peer ended it) | holds it | it runs; StopJob",
    recorded: [slot({ jobState: "queued", jobAttempt: 2 })],
    reported: [holds()],
    hello: [{ kind: "mark-started", jobId: J, attempt: 1 }],
    commands: [{ kind: "stop", jobId: J, attempt: 1, reason: FinalizeReason.INTERNAL_ERROR, message: "the attempt is no longer current" }],
  },
  {
    row: "J's attempt no longer current | does not hold it | the slot is released",
    recorded: [slot({ jobState: "finalized", terminated: true })],
    reported: [],
    hello: [{ kind: "release", jobId: J, attempt: 1 }],
  },
  {
    row: "J runs a newer attempt | holds the older attempt, terminated | acknowledge; the stale end changes nothing",
    recorded: [slot({ jobAttempt: 2, jobState: "running" })],
    reported: [holds({ termination: exited(0) })],
    hello: [{ kind: "end", jobId: J, attempt: 1, termination: { reason: "workload_exited", exitStatus: "success", exitCode: 0, message: "" }, ack: true }],
    job: head({ attempt: 2 }),
    settled: { outcome: "none" },
  },
];

describe("reconciliation of a supervisor's hello with the database (DESIGN.md §4)", () => {
  it.each(rows)("$row", (r) => {
    const hello = reconcileHello("sup-1", r.recorded, r.reported);
    expect(hello).toEqual(r.hello);
    if (r.commands) {
      const slots: SyncSlot[] = r.recorded.map((s) => ({ ...s, startFailures: 0 }));
      expect(commandsFor(slots, () => false, 3)).toEqual(r.commands);
    }
    if (r.job && r.settled) {
      const end = hello.find((a): a is Extract<HelloAction, { kind: "end" }> => a.kind === "end");
      expect(end).toBeDefined();
      expect(settleEnd(r.job, end!.attempt, end!.termination)).toMatchObject(r.settled);
    }
  });

  it("handles every recorded slot in order, then the held attempts the database does not know", () => {
    const other = "0190a6c0-0000-7000-8000-00000000000c";
    const actions = reconcileHello(
      "sup-1",
      [slot({ jobId: J }), slot({ jobId: other, jobState: "assigned", started: false })],
      [holds({ jobId: K }), holds({ jobId: J })],
    );
    expect(actions.map((a) => `${a.kind} ${a.jobId}`)).toEqual([`adopt ${J}`, `stop ${K}`]);
  });
});

describe("the commands a host's slots ask for", () => {
  it("sends each command once per stream", () => {
    const slots: SyncSlot[] = [
      { ...slot({ stopReason: "canceled" }), startFailures: 0 },
      { ...slot({ jobId: K, jobState: "assigned", started: false }), startFailures: 0 },
    ];
    expect(commandsFor(slots, () => true, 3)).toEqual([]);
    expect(commandsFor(slots, (kind) => kind === "stop", 3)).toEqual([{ kind: "start", jobId: K, attempt: 1 }]);
  });

  it("gives up a StartJob that broke the stream too often, and stops rather than gives up a stopped attempt", () => {
    const poisoned = { ...slot({ jobState: "assigned", started: false }), startFailures: 3 };
    expect(commandsFor([poisoned], () => false, 3)).toEqual([{ kind: "give-up-start", jobId: J, attempt: 1, failures: 3 }]);
    expect(commandsFor([{ ...poisoned, startFailures: 2 }], () => false, 3)).toEqual([{ kind: "start", jobId: J, attempt: 1 }]);
    expect(commandsFor([{ ...poisoned, stopReason: "canceled" }], () => false, 3)).toEqual([
      { kind: "stop", jobId: J, attempt: 1, reason: FinalizeReason.CANCELED, message: "canceled" },
    ]);
  });

  it("sends nothing for a started attempt that runs", () => {
    expect(commandsFor([{ ...slot(), startFailures: 5 }], () => false, 3)).toEqual([]);
  });
});

describe("a supervisor's report of an end", () => {
  it("is recorded INTERNAL_ERROR when it claims a reason only the coordinator gives", () => {
    for (const reason of [FinalizeReason.QUEUE_TIMEOUT, FinalizeReason.HOST_DROPPED, FinalizeReason.UNSPECIFIED, 99 as FinalizeReason]) {
      const t = termination({ reason, exitStatus: ExitStatus.UNSPECIFIED, message: "oops" });
      expect(t.reason).toBe("internal_error");
      expect(t.message).toMatch(/^supervisor reported an invalid end \(.+\): oops$/);
    }
  });

  it("keeps a valid reason, the exit status and code, and clips the message", () => {
    const t = termination({ reason: FinalizeReason.IMAGE_ERROR, exitStatus: ExitStatus.UNSPECIFIED, message: "x".repeat(5000) });
    expect(t).toEqual({ reason: "image_error", exitStatus: null, exitCode: null, message: "x".repeat(4096) });
    expect(termination(exited(2))).toEqual({ reason: "workload_exited", exitStatus: "failure", exitCode: 2, message: "" });
  });
});
