/**
 * TAP (13, 14) and KTAP (the Linux kernel's format) read live, one console
 * line at a time, with each line's byte range in its log channel: a board's
 * serial console needs no file system for its results.
 *
 * A document starts at a version line (`TAP version 13|14`, `KTAP version
 * 1`) or a plan (`1..N`) at any indentation; until then nothing is read, so
 * ordinary output that happens to say `ok 1` is never taken for a result.
 * Subtests are indented (4 spaces per level) and named by a `# Subtest:
 * NAME` line; a printk timestamp (`[    1.234567] `) before a line is
 * ignored. Cases are the leaves: a result line after which deeper results
 * came is its subtest's summary, not a case (a failing summary whose
 * subtests all passed is kept, as a failure of the subtest itself). A
 * case's suite is its enclosing subtests' names joined by `/`.
 *
 * Outcomes: `ok` pass, `not ok` fail, `# SKIP` skip, `not ok ... # TODO`
 * skip (a known failure), `Bail out!` an error case. A failure's message is
 * its directive, the `# ` diagnostic lines before it (KTAP) or after it
 * (TAP 14) and its YAML block; a YAML `duration_ms:` is its duration.
 * What does not follow the format (a number out of sequence, a plan not
 * met, an unknown version, an overlong line) is a problem: reported, never
 * fatal; parsing goes on.
 */
import { clipBytes, cleanName, type CaseLogRange, type ParsedCase } from "./case.js";

/** Longer lines are dropped (a problem). */
export const MAX_LINE_BYTES = 64 * 1024;

const VERSION = /^(K?TAP) version (\d+)\s*$/;
const PLAN = /^1\.\.(\d+)(\s*#.*)?$/;
const RESULT = /^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*)$/;
const SUBTEST = /^#\s*Subtest:\s*(.*)$/;
const BAIL = /^Bail out!\s*(.*)$/;
const PRINTK = /^\[\s*\d+\.\d+\]\s?/;

interface Level {
  indent: number;
  /** This level's subtest name (from `# Subtest:`), for the cases below it. */
  name: string;
  /** Results seen at this level. */
  results: number;
  /** The last result number, for the sequence check. */
  lastNumber: number;
  plan: number | undefined;
  /** Deeper results since this level's last result: the next result here is a summary. */
  childResults: number;
  childFailures: number;
  /** The name announced for the next subtest below this level. */
  pendingSubtest: string | undefined;
}

interface Pending {
  c: ParsedCase;
  level: number;
  /** Reading its YAML block at this indentation. */
  yamlIndent: number | undefined;
  yaml: string[];
}

export class TapParser {
  private levels: Level[] = [];
  /** Diagnostics since the last result, for a failing case's message (KTAP writes them before). */
  private diagnostics: string[] = [];
  /** The last case, held until its YAML block or diagnostics after it are read. */
  private pending: Pending | undefined;
  /** Where the current case's output starts. */
  private boundary = 0;
  private lineNo = 0;
  private outOfSequenceReported = false;
  /** The document is KTAP: diagnostics come before the result they explain (TAP 14: after). */
  private ktap = false;

  constructor(
    private readonly channel: string,
    private readonly onCase: (c: ParsedCase) => void,
    private readonly onProblem: (message: string) => void,
  ) {}

  /** Whether a document is being read. */
  get active(): boolean {
    return this.levels.length > 0;
  }

  /** One line (without its newline), occupying bytes [start, end) of the channel. */
  line(raw: string, start: number, end: number): void {
    this.lineNo++;
    if (end - start > MAX_LINE_BYTES) {
      if (this.active) this.problem(`a line of ${end - start} bytes, longer than ${MAX_LINE_BYTES}, was ignored`);
      return;
    }
    let text = raw.replace(/\r$/, "");
    text = text.replace(PRINTK, "");
    const indent = /^ */.exec(text)![0].length;
    const body = text.slice(indent);

    if (this.pending?.yamlIndent !== undefined) {
      if (body === "..." && indent === this.pending.yamlIndent) {
        this.pending.yamlIndent = undefined;
        this.flushPending(end);
        this.boundary = end;
      } else {
        this.pending.yaml.push(text.slice(this.pending.yamlIndent));
      }
      return;
    }

    const version = VERSION.exec(body);
    if (version) {
      const [, kind, n] = version;
      if ((kind === "TAP" && n !== "13" && n !== "14") || (kind === "KTAP" && n !== "1" && n !== "2")) {
        this.problem(`${kind} version ${n} is not supported (TAP 13 or 14, KTAP 1 or 2); reading it as TAP 14`);
      }
      const opened = this.enter(indent, start);
      if (this.levels.length === 1 && opened === this.levels[0]) this.ktap = kind === "KTAP";
      return;
    }
    const plan = PLAN.exec(body);
    if (plan) {
      const level = this.enter(indent, start, true);
      level.plan = Number(plan[1]);
      return;
    }
    if (!this.active) return;

    if (this.pending && body === "---" && indent > this.levelAt(this.pending.level).indent) {
      this.pending.yamlIndent = indent;
      return;
    }
    const subtest = SUBTEST.exec(body);
    if (subtest) {
      this.flushPending(start);
      this.nameSubtest(indent, cleanName(subtest[1]!));
      this.boundary = start;
      return;
    }
    const result = RESULT.exec(body);
    if (result) {
      this.flushPending(start);
      let i = this.levelIndexOf(indent);
      // Results of a subtest that has neither version line nor plan (TAP 13 style nesting).
      if (i === undefined && indent > this.levels[this.levels.length - 1]!.indent) {
        this.enter(indent, start);
        i = this.levels.length - 1;
      }
      if (i !== undefined) {
        this.result(i, result, start, end);
        return;
      }
    }
    const bail = BAIL.exec(body);
    if (bail) {
      this.flushPending(start);
      const reason = bail[1] ?? "";
      this.onCase({ suite: this.suiteOf(this.levels.length), name: "bail out", outcome: "error", message: clipBytes(reason), log: this.range(end) });
      this.levels = [];
      this.diagnostics = [];
      return;
    }
    if (body.startsWith("#")) {
      const note = body.replace(/^#\s?/, "");
      if (!this.ktap && this.pending && this.pending.c.outcome === "fail") this.pending.c.message = clipBytes(joinLines(this.pending.c.message, note));
      else if (this.diagnostics.length < 64) this.diagnostics.push(note);
    }
  }

  /**
   * The console went quiet: the case held for a YAML block or diagnostics
   * that may follow goes now (a job that prints its last result and then
   * waits shows it while it waits). Not inside a YAML block.
   */
  flush(): void {
    if (this.pending && this.pending.yamlIndent === undefined) this.flushPending(this.pending.c.log?.end ?? 0);
  }

  /** The input is over (the job ended): the last case, and whether every plan was met. */
  end(at: number): void {
    this.flushPending(at);
    while (this.levels.length > 0) this.closeLevel();
  }

  private problem(message: string): void {
    this.onProblem(`${this.channel} line ${this.lineNo}: ${message}`);
  }

  private levelAt(i: number): Level {
    return this.levels[i]!;
  }

  /** The level a line at `indent` belongs to, closing deeper ones; undefined when it is not at a level. */
  private levelIndexOf(indent: number): number | undefined {
    for (let i = this.levels.length - 1; i >= 0; i--) {
      const level = this.levels[i]!;
      if (level.indent === indent) {
        while (this.levels.length - 1 > i) this.closeLevel();
        return i;
      }
      if (level.indent < indent) return undefined;
    }
    return undefined;
  }

  /**
   * A `# Subtest: NAME` line: it names the level at its indentation when
   * that level has no results yet (KTAP writes it after the subtest's
   * version line), else the next subtest below the level it is at or under
   * (TAP 14 may write it at the parent's indentation).
   */
  private nameSubtest(indent: number, name: string): void {
    const i = this.levels.findIndex((l) => l.indent === indent);
    if (i > 0 && this.levels[i]!.results === 0) {
      this.levels[i]!.name = name;
      return;
    }
    let parent = i;
    if (parent < 0) parent = this.levels.findLastIndex((l) => l.indent < indent);
    if (parent < 0) return;
    while (this.levels.length - 1 > parent) this.closeLevel();
    this.levels[parent]!.pendingSubtest = name;
  }

  /**
   * A document (or a subtest) starts at `indent`: a new top-level document,
   * or a level below the current one; a plan at an existing level's
   * indentation is that level's plan.
   */
  private enter(indent: number, start: number, planOnly = false): Level {
    this.flushPending(start);
    const existing = this.levels.findIndex((l) => l.indent === indent);
    if (existing >= 0) {
      const level = this.levels[existing]!;
      if (planOnly && level.plan === undefined) {
        while (this.levels.length - 1 > existing) this.closeLevel();
        return level;
      }
      // A version line (or a second plan) at an open level starts anew there.
      while (this.levels.length > existing) this.closeLevel();
    } else {
      while (this.levels.length > 0 && this.levels[this.levels.length - 1]!.indent > indent) this.closeLevel();
    }
    const parent = this.levels[this.levels.length - 1];
    const name = parent?.pendingSubtest ?? (parent ? `subtest ${parent.results + 1}` : "");
    if (parent) parent.pendingSubtest = undefined;
    const level: Level = { indent, name, results: 0, lastNumber: 0, plan: undefined, childResults: 0, childFailures: 0, pendingSubtest: undefined };
    this.levels.push(level);
    if (this.levels.length === 1) {
      this.ktap = false;
      this.outOfSequenceReported = false;
      this.diagnostics = [];
    }
    this.boundary = start;
    return level;
  }

  private closeLevel(): void {
    const level = this.levels.pop()!;
    if (level.plan !== undefined && level.results !== level.plan) {
      const where = this.levels.length === 0 ? "" : ` of ${this.suiteOf(this.levels.length + 1) || "a subtest"}`;
      this.problem(`the plan${where} said ${level.plan} tests, ${level.results} ran`);
    }
  }

  private suiteOf(depth: number): string {
    return cleanName(
      this.levels
        .slice(1, depth)
        .map((l) => l.name)
        .filter((n) => n !== "")
        .join("/"),
    );
  }

  private range(end: number): CaseLogRange {
    return { channel: this.channel, start: this.boundary, end };
  }

  private result(i: number, m: RegExpExecArray, start: number, end: number): void {
    const level = this.levelAt(i);
    const passed = m[1] === "ok";
    const number = m[2] === undefined ? level.lastNumber + 1 : Number(m[2]);
    if (number !== level.lastNumber + 1 && !this.outOfSequenceReported) {
      this.outOfSequenceReported = true;
      this.problem(`test number ${number} is out of sequence (expected ${level.lastNumber + 1})`);
    }
    level.lastNumber = number;
    level.results++;
    const parent = this.levels[i - 1];
    if (parent) {
      parent.childResults++;
      if (!passed) parent.childFailures++;
    }
    const [rawDescription, directive] = splitDirective(m[3] ?? "");
    const description = cleanName(rawDescription);
    const isSummary = level.childResults > 0;
    const childFailures = level.childFailures;
    level.childResults = 0;
    level.childFailures = 0;
    const diagnostics = this.diagnostics;
    this.diagnostics = [];
    level.pendingSubtest = undefined;
    if (isSummary && (passed || childFailures > 0)) {
      this.boundary = end;
      return;
    }
    const kind = directive.toUpperCase();
    const outcome = kind.startsWith("SKIP") ? "skip" : !passed && kind.startsWith("TODO") ? "skip" : passed ? "pass" : "fail";
    const name = description === "" ? `test ${number}` : description;
    const why = directive === "" ? "" : directive;
    const message = outcome === "pass" ? "" : clipBytes(joinLines(why, ...(outcome === "fail" && this.ktap ? diagnostics : [])));
    const suite = this.suiteOf(i + 1);
    this.pending = { c: { suite, name, outcome, message, log: { channel: this.channel, start: this.boundary, end } }, level: i, yamlIndent: undefined, yaml: [] };
    this.boundary = end;
  }

  private flushPending(at: number): void {
    const p = this.pending;
    if (!p) return;
    this.pending = undefined;
    if (p.yaml.length > 0) {
      const duration = /^duration_ms:\s*([\d.]+)/m.exec(p.yaml.join("\n"));
      if (duration) p.c.durationMs = Number(duration[1]);
      if (p.c.outcome !== "pass") p.c.message = clipBytes(joinLines(p.c.message, ...p.yaml));
      if (p.c.log) p.c.log.end = Math.max(p.c.log.end, at);
    }
    this.onCase(p.c);
  }
}

/** `desc # SKIP why` -> [desc, "SKIP why"]; a `\#` is not a directive. */
function splitDirective(text: string): [string, string] {
  const m = /^(.*?)(?<!\\)\s#\s*((?:SKIP|TODO|XFAIL)\S*.*)$/i.exec(text);
  if (!m) return [text.replace(/\\#/g, "#"), ""];
  return [m[1]!.replace(/\\#/g, "#"), m[2]!.trim()];
}

function joinLines(...parts: string[]): string {
  return parts.filter((p) => p !== "").join("\n");
}

/**
 * Splits a channel's bytes into lines for a TapParser, keeping byte
 * offsets: `push` each chunk as captured, `end` at the job's end.
 */
export class LineSplitter {
  private partial: Buffer[] = [];
  private partialBytes = 0;
  private offset = 0;
  private overlong = false;

  constructor(private readonly onLine: (text: string, start: number, end: number) => void) {}

  push(bytes: Uint8Array): void {
    let from = 0;
    for (;;) {
      const nl = bytes.indexOf(10, from);
      if (nl < 0) break;
      this.emit(bytes.subarray(from, nl), nl + 1 - from);
      from = nl + 1;
    }
    if (from < bytes.length) {
      const rest = bytes.subarray(from);
      if (this.partialBytes + rest.length > MAX_LINE_BYTES) this.overlong = true;
      else this.partial.push(Buffer.from(rest));
      this.partialBytes += rest.length;
    }
  }

  /** The byte offset of the next byte. */
  get position(): number {
    return this.offset + this.partialBytes;
  }

  end(): void {
    if (this.partialBytes > 0) this.emit(new Uint8Array(0), 0);
  }

  private emit(tail: Uint8Array, consumed: number): void {
    const start = this.offset;
    const length = this.partialBytes + consumed;
    let text: string;
    if (this.overlong || length > MAX_LINE_BYTES + 1) text = "";
    else text = Buffer.concat([...this.partial, tail]).toString("utf8");
    const end = start + length;
    this.partial = [];
    this.partialBytes = 0;
    this.offset = end;
    this.overlong = false;
    this.onLine(text, start, end);
  }
}
