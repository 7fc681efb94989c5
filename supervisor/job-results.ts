/**
 * A job's test results on this host (docs/results.md): TAP and KTAP parsed
 * live from the job's console as it is captured (lib/results/tap.ts), JUnit
 * files read from $TREADMILL_RESULTS_DIR when the job ends
 * (lib/results/junit.ts), both sent to the coordinator as JobResultsReport
 * batches.
 *
 * Delivery is the log reports' (job-logs.ts): each batch has a report id,
 * is retained until an AckReport names it and is sent again after every
 * reconnect; the coordinator records a report id once. Batches are kept in
 * memory only: a supervisor restart loses the unacknowledged ones (the job
 * is then lost on this host anyway). Bounds: cases per attempt
 * (resultsMaxCases), bytes of JUnit files read per attempt
 * (resultsMaxBytes), the time collection may take (resultsCollectMs), and
 * the time the job's end waits for the acknowledgements (the same). Over a
 * bound, what was not read is a problem on the job's timeline; nothing
 * here ever fails the job or the supervisor.
 *
 * Reading the results directory: it lies inside the job's files, which the
 * job controlled; by then every process of the job is gone (the driver's
 * `exited`), and nothing is followed: symbolic links are skipped with a
 * problem, files are opened with O_NOFOLLOW and must be regular.
 */
import { randomUUID } from "node:crypto";
import { constants, createReadStream } from "node:fs";
import { lstat, open, readdir } from "node:fs/promises";
import { join, relative } from "node:path";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { AttachRequestSchema, JobResultsReportSchema } from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { formatBytes } from "../lib/bytes.js";
import type { Logger } from "../lib/logger.js";
import type { ParsedCase } from "../lib/results/case.js";
import { JunitReader } from "../lib/results/junit.js";
import { LineSplitter, TapParser } from "../lib/results/tap.js";
import { caseMessage } from "../lib/results/wire.js";

type Payload = MessageInitShape<typeof AttachRequestSchema>["payload"];
type Report = MessageInitShape<typeof JobResultsReportSchema> & { reportId: string };

/** Cases per report, and the bytes of text one report carries at most (the stream takes 4 MiB messages). */
const CASES_PER_REPORT = 2000;
const BYTES_PER_REPORT = 1 << 20;
/** How long parsed console cases wait for more before they are sent (they appear while the job runs). */
const LIVE_FLUSH_MS = 500;
/** A console quiet this long: its last result is not followed by a YAML block (lib/results/tap.ts flush). */
const QUIET_MS = 300;
/** Problems one attempt reports at most; one more says the rest were left out. */
const MAX_PROBLEMS = 20;
/** Files and directory levels of a results directory looked at. */
const MAX_FILES = 1000;
const MAX_DEPTH = 8;

export interface ResultsLimits {
  /** Cases per attempt; more are not reported. */
  maxCases: number;
  /** Bytes of JUnit files read per attempt. */
  maxBytes: number;
  /** Longest collection at the job's end, and longest wait for the acknowledgements. */
  collectMs: number;
}

export interface JobResultsDeps {
  logger: Logger;
  /** Sends a message to the coordinator when attached (lost otherwise: re-sent at the next attach). */
  send: (payload: Payload) => void;
  /** Something the supervisor may wait for changed (a report acknowledged). */
  changed: () => void;
  limits: ResultsLimits;
}

/** The results of every attempt on this host that has reports waiting. */
export class JobResults {
  private readonly attempts = new Set<AttemptResults>();

  constructor(private readonly deps: JobResultsDeps) {}

  /** The results of a new attempt; `console` false: its console is not parsed (ResultsSpec.ignore_console). */
  open(jobId: string, attempt: number, options: { console: boolean }): AttemptResults {
    const results = new AttemptResults(jobId, attempt, options.console, this.deps, (r) => {
      if (r.done()) this.attempts.delete(r);
    });
    this.attempts.add(results);
    return results;
  }

  /** A new stream is attached: every retained report again, in order. */
  attached(): void {
    for (const a of this.attempts) a.resend();
  }

  /** An AckReport: a results report among them is recorded. */
  acknowledged(reportId: string): void {
    for (const a of this.attempts) if (a.acknowledged(reportId)) return;
  }

  /** Reports sent and not acknowledged yet. */
  unacknowledged(): number {
    let n = 0;
    for (const a of this.attempts) n += a.pending();
    return n;
  }
}

export class AttemptResults {
  private readonly log: Logger;
  private readonly parsers = new Map<string, { lines: LineSplitter; tap: TapParser }>();
  private batch: ParsedCase[] = [];
  private batchBytes = 0;
  private problems: string[] = [];
  private problemCount = 0;
  private cases = 0;
  private casesDropped = false;
  private readonly unacked: Report[] = [];
  private timer: NodeJS.Timeout | undefined;
  private quiet: NodeJS.Timeout | undefined;
  private ended = false;
  /** A report was made: the attempt has results, so its last report goes too. */
  private reported = false;
  private waiters: (() => void)[] = [];

  constructor(
    readonly jobId: string,
    readonly attempt: number,
    private readonly parseConsole: boolean,
    private readonly deps: JobResultsDeps,
    private readonly onSettled: (r: AttemptResults) => void,
  ) {
    this.log = deps.logger.child({ subsystem: "results", jobId, attempt });
  }

  /** Bytes the job wrote on `channel` (its console): parsed as TAP/KTAP line by line. */
  output(channel: string, bytes: Uint8Array): void {
    if (!this.parseConsole || this.ended) return;
    let parser = this.parsers.get(channel);
    if (!parser) {
      const tap = new TapParser(channel, (c) => this.add(c), (p) => this.problem(p));
      parser = { tap, lines: new LineSplitter((text, start, end) => tap.line(text, start, end)) };
      this.parsers.set(channel, parser);
    }
    try {
      parser.lines.push(bytes);
      clearTimeout(this.quiet);
      this.quiet = setTimeout(() => {
        for (const p of this.parsers.values()) p.tap.flush();
      }, QUIET_MS);
    } catch (err) {
      // A parser bug must not reach the job's output path.
      this.log.error({ err, channel }, "cannot parse console output for results");
    }
  }

  /**
   * The job ended: the console's last case, the JUnit files of `dir` (the
   * host path of its results directory; undefined when the driver shares
   * none), and the last report. Bounded by resultsCollectMs; never throws.
   */
  async collect(dir: string | undefined): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.quiet);
    for (const { lines, tap } of this.parsers.values()) {
      lines.end();
      tap.end(lines.position);
    }
    if (dir !== undefined) {
      const deadline = Date.now() + this.deps.limits.collectMs;
      try {
        await this.readDir(dir, deadline);
      } catch (err) {
        this.log.error({ err }, "cannot read the job's results directory");
        this.problem("the results directory could not be read");
      }
    }
    this.flush(true);
  }

  /** Resolves once every report is acknowledged, or after resultsCollectMs. */
  async settled(): Promise<void> {
    if (this.unacked.length === 0) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      new Promise<void>((resolve) => this.waiters.push(resolve)),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, this.deps.limits.collectMs))),
    ]);
    clearTimeout(timer);
    if (this.unacked.length > 0) this.log.warn({ pending: this.unacked.length }, "the job's end goes before its results are acknowledged");
  }

  done(): boolean {
    return this.ended && this.unacked.length === 0;
  }

  pending(): number {
    return this.unacked.length;
  }

  resend(): void {
    for (const r of this.unacked) this.deps.send({ case: "jobResultsReport", value: r });
  }

  acknowledged(reportId: string): boolean {
    const i = this.unacked.findIndex((r) => r.reportId === reportId);
    if (i < 0) return false;
    this.unacked.splice(i, 1);
    if (this.unacked.length === 0) {
      for (const w of this.waiters.splice(0)) w();
      this.onSettled(this);
    }
    this.deps.changed();
    return true;
  }

  private add(c: ParsedCase): void {
    if (this.cases >= this.deps.limits.maxCases) {
      if (!this.casesDropped) this.problem(`more than ${this.deps.limits.maxCases} test cases: the rest are not reported`);
      this.casesDropped = true;
      return;
    }
    this.cases++;
    this.batch.push(c);
    this.batchBytes += 64 + c.suite.length + c.name.length + Buffer.byteLength(c.message);
    if (this.batch.length >= CASES_PER_REPORT || this.batchBytes >= BYTES_PER_REPORT) this.flush(false);
    else this.timer ??= setTimeout(() => this.flush(false), LIVE_FLUSH_MS);
  }

  private problem(text: string): void {
    this.problemCount++;
    if (this.problemCount <= MAX_PROBLEMS) this.problems.push(text.slice(0, 1024));
    else if (this.problemCount === MAX_PROBLEMS + 1) this.problems.push("more problems with the results were left out");
    this.timer ??= setTimeout(() => this.flush(false), LIVE_FLUSH_MS);
  }

  /** Sends what is gathered as a report (the last one even when empty). */
  private flush(last: boolean): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    const empty = this.batch.length === 0 && this.problems.length === 0;
    // A job that reported nothing says nothing (no results, no timeline entry).
    if (empty && (!last || !this.reported)) {
      if (last) this.onSettled(this);
      return;
    }
    this.reported = true;
    const report: Report = {
      reportId: randomUUID(),
      jobId: this.jobId,
      attempt: this.attempt,
      cases: this.batch.map(caseMessage),
      // eslint-disable-next-line no-control-regex
      problems: this.problems.map((p) => p.replace(/[\u0000-\u001f\u007f]+/g, " ")),
      last,
    };
    this.batch = [];
    this.batchBytes = 0;
    this.problems = [];
    this.unacked.push(report);
    this.deps.send({ case: "jobResultsReport", value: report });
  }

  /** Reads every `*.xml` under `dir` (sorted, depth-first), within the byte cap and the deadline. */
  private async readDir(root: string, deadline: number): Promise<void> {
    const top = await lstat(root).catch(() => undefined);
    if (!top) return; // the job removed it, or the driver made none: no files
    if (!top.isDirectory()) return this.problem("the results directory is not a directory");
    let bytesLeft = this.deps.limits.maxBytes;
    let files = 0;
    const walk = async (dir: string, depth: number): Promise<void> => {
      const entries = (await readdir(dir, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name));
      for (const entry of entries) {
        const path = join(dir, entry.name);
        const rel = relative(root, path);
        if (Date.now() > deadline) {
          this.problem(`${rel}: not read: results collection stopped after ${this.deps.limits.collectMs} ms`);
          return;
        }
        if (entry.isSymbolicLink()) {
          if (entry.name.endsWith(".xml")) this.problem(`${rel}: a symbolic link, not followed`);
        } else if (entry.isDirectory()) {
          if (depth < MAX_DEPTH) await walk(path, depth + 1);
        } else if (entry.isFile() && entry.name.endsWith(".xml")) {
          if (++files > MAX_FILES) {
            if (files === MAX_FILES + 1) this.problem(`more than ${MAX_FILES} results files: the rest are not read`);
            continue;
          }
          bytesLeft -= await this.readFile(path, rel, bytesLeft, deadline);
        }
      }
    };
    await walk(root, 0);
  }

  /** Parses one JUnit file; returns the bytes read. Its problems go to the timeline. */
  private async readFile(path: string, rel: string, bytesLeft: number, deadline: number): Promise<number> {
    let handle;
    try {
      handle = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    } catch {
      this.problem(`${rel}: cannot be opened`);
      return 0;
    }
    try {
      const st = await handle.stat();
      if (!st.isFile()) {
        this.problem(`${rel}: not a regular file`);
        return 0;
      }
      if (st.size > bytesLeft) {
        this.problem(`${rel}: ${formatBytes(st.size)}, over the results size cap (${formatBytes(this.deps.limits.maxBytes)} per job): not read`);
        return 0;
      }
      const before = this.cases;
      const reader = new JunitReader((c) => this.add(c));
      const stream = createReadStream("", { fd: handle, autoClose: false, encoding: "utf8", highWaterMark: 256 * 1024, end: Math.max(0, st.size - 1) });
      try {
        for await (const chunk of stream) {
          reader.write(chunk as string);
          if (Date.now() > deadline) throw new Error(`results collection stopped after ${this.deps.limits.collectMs} ms`);
        }
        reader.end();
      } catch (err) {
        const why = err instanceof Error ? err.message : String(err);
        const kept = this.cases - before;
        this.problem(`${rel}: ${why}${kept > 0 ? ` (the ${kept} case${kept === 1 ? "" : "s"} before it are kept)` : ""}`);
      } finally {
        stream.destroy();
      }
      return st.size;
    } finally {
      await handle.close();
    }
  }
}
