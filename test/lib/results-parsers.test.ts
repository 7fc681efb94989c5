import { readFileSync } from "node:fs";
import { describe, expect, it } from "@jest/globals";
import type { ParsedCase } from "../../lib/results/case.js";
import { JunitReader, XmlError, parseJunit, toJunitXml } from "../../lib/results/junit.js";
import { LineSplitter, TapParser } from "../../lib/results/tap.js";
import { caseMessage, parsedCase } from "../../lib/results/wire.js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { TestCaseSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";

const fixture = (name: string) => readFileSync(new URL(`./results/fixtures/${name}`, import.meta.url), "utf8");

/** Feeds `text` to a TapParser through a LineSplitter in chunks of `chunk` bytes, as a console delivers it. */
function parseTap(text: string, chunk = 7): { cases: ParsedCase[]; problems: string[] } {
  const cases: ParsedCase[] = [];
  const problems: string[] = [];
  const parser = new TapParser("console", (c) => cases.push(c), (p) => problems.push(p));
  const lines = new LineSplitter((line, start, end) => parser.line(line, start, end));
  const bytes = Buffer.from(text);
  for (let i = 0; i < bytes.length; i += chunk) lines.push(bytes.subarray(i, i + chunk));
  lines.end();
  parser.end(lines.position);
  return { cases, problems };
}

const brief = (cases: ParsedCase[]) => cases.map((c) => `${c.suite}|${c.name}|${c.outcome}`);

describe("JUnit reader", () => {
  it("reads a pytest report: classname as the suite, failure, error and skip messages, times, system-out ignored", () => {
    const cases = parseJunit(fixture("pytest.xml"));
    expect(brief(cases)).toEqual([
      "pytest/tests.test_login|test_login_ok|pass",
      "pytest/tests.test_login|test_login_bad_password|fail",
      "pytest/tests.test_login|test_login_sso|skip",
      "pytest/tests.test_db|test_migrate[postgres-16]|error",
      "pytest/tests.test_db|test_unicode_ñame|pass",
    ]);
    expect(cases[0]!.durationMs).toBeCloseTo(101);
    expect(cases[1]!.message).toContain("AssertionError: assert 401 == 403");
    expect(cases[1]!.message).toContain(">       assert r.status_code == 403");
    expect(cases[2]!.message).toBe("pytest.skip: sso not configured\ntests/test_login.py:20: sso not configured");
    expect(cases[3]!.message).toContain('failed on setup with "ConnectionRefusedError');
    expect(cases[4]!.message).toBe("");
  });

  it("reads a bare testsuite root with nested suites, properties and thousands separators in times", () => {
    const cases = parseJunit(fixture("jenkins.xml"));
    expect(brief(cases)).toEqual(["openqa/boot|grub|pass", "openqa/boot|login|fail", "openqa/console|zypper|skip"]);
    expect(cases[1]!.message).toBe("needle\nno candidate needle with tag(s) 'login' matched");
    expect(cases[2]!.durationMs).toBe(1_200_000);
  });

  it("delivers the same cases whatever the chunking of the stream", () => {
    const text = fixture("pytest.xml");
    for (const size of [1, 3, 17, 4096]) {
      const cases: ParsedCase[] = [];
      const reader = new JunitReader((c) => cases.push(c));
      for (let i = 0; i < text.length; i += size) reader.write(text.slice(i, i + size));
      reader.end();
      expect(cases).toEqual(parseJunit(text));
    }
  });

  it.each([
    ["<testsuites><testsuite name='a'><testcase name='x'></testsuite></testsuites>", "line 1, column 52: </testsuite> closes <testcase>"],
    ["<testsuites>\n<testcase name='x' name='y'/></testsuites>", "line 2, column 1: attribute name twice in <testcase>"],
    ["<testsuites><testcase name='a&b'/></testsuites>", "a bare & (write &amp;)"],
    ["<testsuites><testcase name='&nbsp;'/></testsuites>", "an unknown entity &nbsp;"],
    ["<testsuites><testcase name='x'/>", "<testsuites> is not closed"],
    ["<html><body/></html>", "the root element is <html>, not <testsuites> or <testsuite>"],
    ["<testsuites/><testsuites/>", "a second root element <testsuites>"],
    ["not xml at all", "text before the root element"],
    ["", "no root element"],
  ])("refuses malformed XML %j with a message naming where and why", (text, message) => {
    expect(() => parseJunit(text)).toThrow(XmlError);
    expect(() => parseJunit(text)).toThrow(message);
  });

  it("round-trips its own export: suites, names, outcomes, messages and times come back the same", () => {
    const cases: ParsedCase[] = [
      { suite: "net/tcp", name: "connect <fast> & \"quoted\"", outcome: "pass", durationMs: 12, message: "" },
      { suite: "net/tcp", name: "retransmit", outcome: "fail", durationMs: 1500, message: "expected 3 got 4\n  at line 9 <x>" },
      { suite: "", name: "top level", outcome: "skip", message: "not on this board" },
      { suite: "pytest/tests.test_db", name: "migrate[ñ]", outcome: "error", durationMs: 0, message: "ConnectionRefused" },
    ];
    const xml = [...toJunitXml(cases)].join("");
    expect(parseJunit(xml)).toEqual(cases);
  });
});

describe("a parsed case on the wire", () => {
  it("encodes any duration a report gives (to the microsecond), and comes back the same", () => {
    for (const durationMs of [12.3, 0.0004, 1500, 86_400_000.5]) {
      const c: ParsedCase = { suite: "s", name: "n", outcome: "fail", durationMs, message: "m\u0000!" };
      const wire = fromBinary(TestCaseSchema, toBinary(TestCaseSchema, create(TestCaseSchema, caseMessage(c))));
      expect(parsedCase(wire)).toEqual({ ...c, durationMs: Math.round(durationMs * 1000) / 1000, message: "m!" });
    }
  });
});

describe("TAP and KTAP parser", () => {
  it("reads a kernel KTAP log with printk timestamps: nested subtests as suites, skips, the failure's diagnostics", () => {
    const { cases, problems } = parseTap(fixture("kunit-example.ktap"));
    expect(problems).toEqual([]);
    expect(brief(cases)).toEqual([
      "example|example_simple_test|pass",
      "example|example_skip_test|skip",
      "example/example_params_test|example value 3|skip",
      "example/example_params_test|example value 2|pass",
      "example/example_params_test|example value 1|pass",
      "example|example_failing_test|fail",
      "list-kunit-test|list_test_init|pass",
      "list-kunit-test|list_test_add|pass",
    ]);
    expect(cases[1]!.message).toBe("SKIP this test should be skipped");
    expect(cases[5]!.message).toContain("EXPECTATION FAILED at lib/kunit/kunit-example-test.c:42");
  });

  it("gives each case the byte range of its output in the channel", () => {
    const text = "boot noise ok 1\nTAP version 14\n1..2\nhello from a\nok 1 - a\nnot ok 2 - b\n";
    const { cases } = parseTap(text, 5);
    const at = (c: ParsedCase) => text.slice(c.log!.start, c.log!.end);
    expect(at(cases[0]!)).toBe("TAP version 14\n1..2\nhello from a\nok 1 - a\n");
    expect(at(cases[1]!)).toBe("not ok 2 - b\n");
  });

  it("reads TAP 14 subtests, TODO, a YAML block with its duration, and ignores output before the version line", () => {
    const text = [
      "ok 1 - this is not a result: no document yet",
      "TAP version 14",
      "1..3",
      "# Subtest: math",
      "    1..2",
      "    ok 1 - add",
      "    not ok 2 - divide",
      "      ---",
      "      message: division by zero",
      "      duration_ms: 4.5",
      "      ...",
      "not ok 1 - math",
      "not ok 2 - known bug # TODO fix later",
      "ok 3 - escaped \\# hash",
      "",
    ].join("\n");
    const { cases, problems } = parseTap(text);
    expect(problems).toEqual([]);
    expect(brief(cases)).toEqual(["math|add|pass", "math|divide|fail", "|known bug|skip", "|escaped # hash|pass"]);
    expect(cases[1]!.message).toBe("message: division by zero\nduration_ms: 4.5");
    expect(cases[1]!.durationMs).toBe(4.5);
  });

  it("reports garbage as problems and goes on: an unknown version, numbers out of sequence, an unmet plan, a bail out", () => {
    const text = ["TAP version 99", "1..4", "ok 1 - a", "ok 7 - b", "\u0000\u0001garbage", "ok 8 - c", "Bail out! disk on fire", "TAP version 13", "ok 1 - after", ""].join("\n");
    const { cases, problems } = parseTap(text);
    expect(brief(cases)).toEqual(["|a|pass", "|b|pass", "|c|pass", "|bail out|error", "|after|pass"]);
    expect(cases[3]!.message).toBe("disk on fire");
    expect(problems).toEqual([
      "console line 1: TAP version 99 is not supported (TAP 13 or 14, KTAP 1 or 2); reading it as TAP 14",
      "console line 4: test number 7 is out of sequence (expected 2)",
    ]);
    const unmet = parseTap("TAP version 13\n1..3\nok 1\n").problems;
    expect(unmet).toEqual(["console line 3: the plan said 3 tests, 1 ran"]);
  });

  it("gives the last result at once when the console goes quiet, unless a YAML block is open", () => {
    const cases: ParsedCase[] = [];
    const parser = new TapParser("console", (c) => cases.push(c), () => undefined);
    const lines = ["TAP version 14", "ok 1 - first", "not ok 2 - second", "  ---", "  message: still coming"];
    let at = 0;
    for (const line of lines.slice(0, 2)) parser.line(line, at, (at += line.length + 1));
    expect(cases).toHaveLength(0); // a YAML block may follow
    parser.flush();
    expect(brief(cases)).toEqual(["|first|pass"]);
    for (const line of lines.slice(2)) parser.line(line, at, (at += line.length + 1));
    parser.flush();
    expect(cases).toHaveLength(1);
    parser.line("  ...", at, (at += 6));
    parser.end(at);
    expect(cases[1]!.message).toBe("message: still coming");
  });

  it("ignores an overlong line with a problem instead of holding it", () => {
    const { cases, problems } = parseTap(`TAP version 13\n${"x".repeat(70_000)}\nok 1 - fine\n`, 4096);
    expect(brief(cases)).toEqual(["|fine|pass"]);
    expect(problems).toEqual(["console line 2: a line of 70001 bytes, longer than 65536, was ignored"]);
  });
});
