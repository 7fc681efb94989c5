/**
 * The command ledger of one Attach stream (coordinator/jobs/command-ledger.ts):
 * each command once per stream, re-sent under a new request id when its
 * acknowledgement is late, forgotten with its slot. No stream, no database.
 */
import { describe, expect, it } from "@jest/globals";
import { create } from "@bufbuild/protobuf";
import { FinalizeReason } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { StartJobSchema } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { CommandLedger } from "../../coordinator/jobs/command-ledger.js";

const J = "0190a6c0-0000-7000-8000-00000000000a";
const start = (requestId: string, jobId = J, attempt = 1) => create(StartJobSchema, { requestId, jobId, attempt });

describe("the command ledger of a stream", () => {
  it("hands out each StartJob once per stream, and a StopJob with the configured grace", () => {
    const ledger = new CommandLedger(30_000, () => 0);
    expect(ledger.starts([start("r1")])).toHaveLength(1);
    expect(ledger.starts([start("r2")])).toEqual([]);
    expect(ledger.has("start", J, 1)).toBe(true);
    expect(ledger.has("stop", J, 1)).toBe(false);
    const stop = ledger.stop(J, 1, FinalizeReason.CANCELED, "canceled");
    expect(stop.payload.case).toBe("stopJob");
    expect(stop.payload.case === "stopJob" && stop.payload.value.gracePeriod?.seconds).toBe(30n);
    expect(ledger.has("stop", J, 1)).toBe(true);
  });

  it("answers an acknowledgement once, and not one of an unknown request", () => {
    const ledger = new CommandLedger(1000, () => 0);
    ledger.starts([start("r1")]);
    expect(ledger.answer("r1")).toMatchObject({ kind: "start", jobId: J, attempt: 1 });
    expect(ledger.answer("r1")).toBeUndefined();
    expect(ledger.answer("nope")).toBeUndefined();
    expect(ledger.unansweredStarts()).toEqual([]);
  });

  it("re-sends a late command under a new request id; the old id's answer is then ignored", () => {
    let now = 0;
    const ledger = new CommandLedger(1000, () => now);
    ledger.starts([start("r1")]);
    now = 2999;
    expect(ledger.resend(now, 3000)).toEqual([]);
    now = 3000;
    const [again] = ledger.resend(now, 3000);
    expect(again.payload.case).toBe("startJob");
    const newId = again.payload.case === "startJob" ? again.payload.value.requestId : "";
    expect(newId).not.toBe("r1");
    expect(ledger.resend(now + 2999, 3000)).toEqual([]);
    expect(ledger.answer("r1")).toBeUndefined();
    expect(ledger.answer(newId)).toMatchObject({ kind: "start", jobId: J });
  });

  it("forgets the commands of attempts the host no longer holds", () => {
    const K = "0190a6c0-0000-7000-8000-00000000000b";
    const ledger = new CommandLedger(1000, () => 0);
    ledger.starts([start("r1"), start("r2", K)]);
    ledger.keepOnly([{ jobId: K, attempt: 1 }]);
    expect(ledger.has("start", J, 1)).toBe(false);
    expect(ledger.answer("r1")).toBeUndefined();
    expect(ledger.unansweredStarts().map((p) => p.jobId)).toEqual([K]);
    expect(ledger.starts([start("r3")])).toHaveLength(1);
  });
});
