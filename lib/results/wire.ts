/**
 * A parsed case (case.ts) as job.proto's TestCase and back: what the
 * supervisor sends in JobResultsReport, and what tml exports as JUnit from
 * ListJobResults.
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { Duration } from "@bufbuild/protobuf/wkt";
import { type TestCase, type TestCaseSchema, TestOutcome } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import type { Outcome, ParsedCase } from "./case.js";

export const OUTCOME_ENUM: Record<Outcome, TestOutcome> = {
  pass: TestOutcome.PASS,
  fail: TestOutcome.FAIL,
  skip: TestOutcome.SKIP,
  error: TestOutcome.ERROR,
};

const OUTCOME_WORD: Partial<Record<TestOutcome, Outcome>> = {
  [TestOutcome.PASS]: "pass",
  [TestOutcome.FAIL]: "fail",
  [TestOutcome.SKIP]: "skip",
  [TestOutcome.ERROR]: "error",
};

/**
 * A Duration of `ms` milliseconds, to the microsecond. (durationFromMs
 * keeps a fraction in `nanos`, which then cannot be encoded: a report with
 * `time="0.0123"` would end the supervisor's stream at every resend.)
 */
export function durationOfMs(ms: number): Duration {
  const us = Math.max(0, Math.round(ms * 1000));
  return { $typeName: "google.protobuf.Duration", seconds: BigInt(Math.floor(us / 1e6)), nanos: (us % 1e6) * 1000 };
}

/** The milliseconds of a Duration, fraction kept. */
export function msOfDuration(d: Duration): number {
  return Number(d.seconds) * 1000 + d.nanos / 1e6;
}

/** A parsed case for a JobResultsReport. */
export function caseMessage(c: ParsedCase): MessageInitShape<typeof TestCaseSchema> {
  return {
    suite: c.suite,
    name: c.name,
    outcome: OUTCOME_ENUM[c.outcome],
    duration: c.durationMs === undefined || !Number.isFinite(c.durationMs) ? undefined : durationOfMs(c.durationMs),
    // NUL is the one character the coordinator refuses in text (it would end the stream).
    message: c.message.replaceAll("\u0000", ""),
    log: c.log ? { channel: c.log.channel, startOffset: BigInt(c.log.start), endOffset: BigInt(c.log.end) } : undefined,
  };
}

/** A stored case as a parsed one (for a JUnit export). */
export function parsedCase(c: TestCase): ParsedCase {
  return {
    suite: c.suite,
    name: c.name,
    outcome: OUTCOME_WORD[c.outcome] ?? "error",
    ...(c.duration ? { durationMs: msOfDuration(c.duration) } : {}),
    message: c.message,
  };
}
