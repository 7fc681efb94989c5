/**
 * JUnit XML reports, read as a stream (lib/results/xml.ts) and written for
 * export. The variants test runners emit: a <testsuites> root or a bare
 * <testsuite> (Jenkins, os-autoinst), nested <testsuite>s, <testcase> with
 * <failure>, <error> or <skipped> children (message attribute and text),
 * `time` in seconds (pytest, surefire; commas as thousands separators
 * tolerated). <system-out>, <system-err>, <properties> and anything unknown
 * are skipped without being kept.
 *
 * A case's suite is its enclosing testsuites' names joined by `/`, followed
 * by its classname when that differs from the innermost suite's name
 * (pytest: `pytest/tests.test_login`). Written back (toJunitXml), each suite
 * is one <testsuite> and each case carries classname = suite, so that
 * reading the export gives the same cases.
 */
import { clipBytes, cleanName, type Outcome, type ParsedCase } from "./case.js";
import { XmlError, XmlScanner } from "./xml.js";

export { XmlError };

interface OpenCase {
  suite: string;
  name: string;
  durationMs?: number;
  outcome: Outcome;
  message: string;
  /** Collecting the text of a <failure>/<error>/<skipped>. */
  inVerdict: boolean;
}

/**
 * A JUnit reader fed chunks of text; `onCase` is called for every case as
 * soon as its </testcase> is read. Throws XmlError on malformed XML (cases
 * read before it were delivered already).
 */
export class JunitReader {
  private readonly scanner: XmlScanner;
  private readonly suites: string[] = [];
  private current: OpenCase | undefined;
  /** Depth inside elements skipped whole (system-out, properties...). */
  private skipping = 0;
  private rootChecked = false;
  cases = 0;

  constructor(private readonly onCase: (c: ParsedCase) => void) {
    this.scanner = new XmlScanner({
      open: (name, attributes) => this.open(name, attributes),
      close: (name) => this.close(name),
      text: (text) => {
        if (this.current?.inVerdict && this.skipping === 0) this.current.message = appendClipped(this.current.message, text);
      },
    });
  }

  write(chunk: string): void {
    this.scanner.write(chunk);
  }

  end(): void {
    this.scanner.end();
  }

  private open(name: string, a: Map<string, string>): void {
    if (!this.rootChecked) {
      this.rootChecked = true;
      if (name !== "testsuites" && name !== "testsuite") throw new XmlError(`the root element is <${name}>, not <testsuites> or <testsuite>`);
    }
    if (this.skipping > 0) {
      this.skipping++;
      return;
    }
    const c = this.current;
    if (name === "testsuite" && c === undefined) {
      this.suites.push(cleanName(a.get("name") ?? ""));
    } else if (name === "testcase" && c === undefined) {
      const inner = this.suites[this.suites.length - 1] ?? "";
      const classname = cleanName(a.get("classname") ?? a.get("class") ?? "");
      const path = this.suites.filter((s) => s !== "");
      if (classname !== "" && classname !== inner) path.push(classname);
      this.current = { suite: cleanName(path.join("/")), name: cleanName(a.get("name") ?? ""), durationMs: seconds(a.get("time")), outcome: "pass", message: "", inVerdict: false };
    } else if (c !== undefined && (name === "failure" || name === "error" || name === "skipped")) {
      const outcome: Outcome = name === "failure" ? "fail" : name === "error" ? "error" : "skip";
      // The worst verdict wins when a case has several (error > fail > skip).
      if (rank(outcome) > rank(c.outcome)) c.outcome = outcome;
      const text = [a.get("type"), a.get("message")].filter((t) => t !== undefined && t !== "").join(": ");
      if (text !== "") c.message = appendClipped(c.message === "" ? "" : `${c.message}\n`, `${text}\n`);
      c.inVerdict = true;
    } else if (name !== "testsuites") {
      this.skipping = 1;
    }
  }

  private close(name: string): void {
    if (this.skipping > 0) {
      this.skipping--;
      return;
    }
    const c = this.current;
    if (name === "testsuite" && c === undefined) this.suites.pop();
    else if (name === "testcase" && c !== undefined) {
      this.current = undefined;
      this.cases++;
      const message = clipBytes(c.message.trim());
      this.onCase({ suite: c.suite, name: c.name, outcome: c.outcome, ...(c.durationMs === undefined ? {} : { durationMs: c.durationMs }), message });
    } else if (c !== undefined && (name === "failure" || name === "error" || name === "skipped")) {
      c.inVerdict = false;
      if (!c.message.endsWith("\n") && c.message !== "") c.message += "\n";
    }
  }
}

function rank(o: Outcome): number {
  return o === "error" ? 3 : o === "fail" ? 2 : o === "skip" ? 1 : 0;
}

/** Keeps text to a little over the message cap while reading (the final clip is clipBytes). */
function appendClipped(current: string, more: string): string {
  if (current.length > 8192) return current;
  return (current + more).slice(0, 8200);
}

/** `time="1,234.5"` -> 1234500 ms; undefined when absent or not a number. */
function seconds(text: string | undefined): number | undefined {
  if (text === undefined || text.trim() === "") return undefined;
  const n = Number(text.replace(/,/g, "").trim());
  return Number.isFinite(n) && n >= 0 ? n * 1000 : undefined;
}

/** Every case of a whole JUnit document (tests, small files). */
export function parseJunit(text: string): ParsedCase[] {
  const cases: ParsedCase[] = [];
  const reader = new JunitReader((c) => cases.push(c));
  reader.write(text);
  reader.end();
  return cases;
}

function escape(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[&<>"\u0000-\u0008\u000b\u000c\u000e-\u001f]/g, (c) =>
    c === "&" ? "&amp;" : c === "<" ? "&lt;" : c === ">" ? "&gt;" : c === '"' ? "&quot;" : "",
  ).replace(/\r/g, "&#13;");
}

/**
 * A JUnit document of `cases` (one <testsuite> per suite, in first-seen
 * order), for tools that read JUnit (CI systems, `tml job results
 * --junit`). Reading it with JunitReader gives the same cases.
 */
export function* toJunitXml(cases: Iterable<ParsedCase>, name = "treadmill"): Generator<string> {
  const suites = new Map<string, ParsedCase[]>();
  for (const c of cases) {
    const list = suites.get(c.suite) ?? [];
    list.push(c);
    suites.set(c.suite, list);
  }
  const all = [...suites.values()].flat();
  const count = (o: Outcome, list: ParsedCase[]) => list.filter((c) => c.outcome === o).length;
  const time = (list: ParsedCase[]) => (list.reduce((t, c) => t + (c.durationMs ?? 0), 0) / 1000).toFixed(3);
  yield `<?xml version="1.0" encoding="UTF-8"?>\n`;
  yield `<testsuites name="${escape(name)}" tests="${all.length}" failures="${count("fail", all)}" errors="${count("error", all)}" skipped="${count("skip", all)}" time="${time(all)}">\n`;
  for (const [suite, list] of suites) {
    yield `  <testsuite name="${escape(suite)}" tests="${list.length}" failures="${count("fail", list)}" errors="${count("error", list)}" skipped="${count("skip", list)}" time="${time(list)}">\n`;
    for (const c of list) {
      const time = c.durationMs === undefined ? "" : ` time="${(c.durationMs / 1000).toFixed(3)}"`;
      const head = `    <testcase classname="${escape(c.suite)}" name="${escape(c.name)}"${time}`;
      if (c.outcome === "pass") {
        yield `${head}/>\n`;
        continue;
      }
      const tag = c.outcome === "fail" ? "failure" : c.outcome === "error" ? "error" : "skipped";
      yield `${head}>\n      <${tag}>${escape(c.message)}</${tag}>\n    </testcase>\n`;
    }
    yield `  </testsuite>\n`;
  }
  yield `</testsuites>\n`;
}
