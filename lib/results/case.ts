/**
 * A test case as the parsers produce it (lib/results/), before it becomes a
 * job.proto TestCase: the vocabulary the supervisor (which parses), the
 * coordinator (which stores) and tml (which exports JUnit) share.
 */

export type Outcome = "pass" | "fail" | "skip" | "error";

export const OUTCOMES: readonly Outcome[] = ["pass", "fail", "skip", "error"];

/** Where a case's output is: a byte range of one log channel. */
export interface CaseLogRange {
  channel: string;
  start: number;
  end: number;
}

export interface ParsedCase {
  /** Enclosing suites joined by `/`; "" when none. */
  suite: string;
  name: string;
  outcome: Outcome;
  /** When the report says. */
  durationMs?: number;
  /** Failure, error or skip text; "" when none. Clipped to MESSAGE_MAX_BYTES. */
  message: string;
  log?: CaseLogRange;
}

/** A case's message is cut to this many bytes (UTF-8). */
export const MESSAGE_MAX_BYTES = 4096;
/** Suite and name are cut to this many characters. */
export const NAME_MAX_CHARS = 1024;

/** `text` cut to `maxBytes` of UTF-8 (never inside a character), with a mark when cut. */
export function clipBytes(text: string, maxBytes = MESSAGE_MAX_BYTES): string {
  if (text.length * 3 <= maxBytes) return text;
  const bytes = Buffer.from(text, "utf8");
  if (bytes.length <= maxBytes) return text;
  const mark = " [...]";
  let cut = bytes.subarray(0, maxBytes - mark.length).toString("utf8");
  if (cut.endsWith("\ufffd")) cut = cut.slice(0, -1);
  return cut + mark;
}

/** Suite or name text: control characters replaced, cut to NAME_MAX_CHARS. */
export function cleanName(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f]+/g, " ").trim().slice(0, NAME_MAX_CHARS);
}

/** Counts by outcome. */
export interface Counts {
  total: number;
  passed: number;
  failed: number;
  skipped: number;
  errored: number;
}

export function countCases(cases: Iterable<Pick<ParsedCase, "outcome">>): Counts {
  const counts: Counts = { total: 0, passed: 0, failed: 0, skipped: 0, errored: 0 };
  for (const c of cases) {
    counts.total++;
    if (c.outcome === "pass") counts.passed++;
    else if (c.outcome === "fail") counts.failed++;
    else if (c.outcome === "skip") counts.skipped++;
    else counts.errored++;
  }
  return counts;
}
