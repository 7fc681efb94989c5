/**
 * cli/headers.ts, which stands in for the global `Headers` in tml's bundle,
 * behaves as node's own: the same operations on both give the same answers
 * and the same refusals.
 */
import { describe, expect, it } from "@jest/globals";
import { LeanHeaders } from "../../cli/headers.js";

/** What both kinds have (the lib types here do not declare node's iterators). */
type AnyHeaders = Pick<LeanHeaders, "append" | "set" | "delete" | "get" | "has" | "forEach" | "getSetCookie" | "keys" | "values" | typeof Symbol.iterator>;
const kinds: [string, (init?: never) => AnyHeaders][] = [
  ["node's", (init) => new Headers(init) as unknown as AnyHeaders],
  ["lean", (init) => new LeanHeaders(init)],
];

/** What a sequence of operations gives on one kind of headers: every answer and the final contents, or the error class. */
function play(make: (init?: never) => AnyHeaders, init: unknown, steps: (h: AnyHeaders) => unknown[]): unknown {
  try {
    const headers = make(init as never);
    const answers = steps(headers);
    const seen: [string, string][] = [];
    headers.forEach((value, name) => seen.push([name, value]));
    return { answers, entries: [...headers], keys: [...headers.keys()], values: [...headers.values()], seen, cookies: headers.getSetCookie() };
  } catch (err) {
    return { threw: (err as Error).constructor.name };
  }
}

const cases: [string, unknown, (h: AnyHeaders) => unknown[]][] = [
  ["empty", undefined, (h) => [h.get("a"), h.has("a")]],
  ["a record", { "Content-Type": "application/grpc", "X-A": " padded\t" }, (h) => [h.get("content-type"), h.get("x-a"), h.has("X-A")]],
  ["pairs, repeated", [["a", "1"], ["A", "2"], ["b", "3"]], (h) => [h.get("a")]],
  ["another Headers", new Headers([["grpc-status", "0"], ["z", "9"]]), (h) => [h.get("grpc-status")]],
  [
    "append, set and delete",
    undefined,
    (h) => {
      h.append("Grpc-Timeout", "10S");
      h.append("grpc-timeout", "5S");
      const joined = h.get("GRPC-TIMEOUT");
      h.set("grpc-timeout", "1S");
      h.append("x", "y");
      h.delete("X");
      return [joined, h.get("grpc-timeout"), h.has("x")];
    },
  ],
  [
    "set-cookie apart, in name order",
    undefined,
    (h) => {
      h.append("set-cookie", "a=1");
      h.append("Set-Cookie", "b=2");
      h.append("b-header", "1");
      h.append("a-header", "2");
      return [h.get("set-cookie")];
    },
  ],
  ["an invalid name", undefined, (h) => [h.append("bad name", "x")]],
  ["a name with a colon", undefined, (h) => [h.set(":path", "/")]],
  ["a value with a line break inside", undefined, (h) => [h.append("x", "a\r\nb: c")]],
  ["a value with NUL", undefined, (h) => [h.append("x", "a\0b")]],
  ["whitespace-only and trailing line breaks", undefined, (h) => (h.append("x", " \r\n"), h.append("y", "v\r\n"), [h.get("x"), h.get("y")])],
  ["an invalid name in init", { "a b": "1" }, () => []],
  ["a bad pair in init", [["a", "1", "2"]], () => []],
  ["a string init", "nope", () => []],
  ["a get of an invalid name", undefined, (h) => [h.get("a b")]],
];

describe("tml's stand-in for Headers", () => {
  it.each(cases)("answers as node's Headers does: %s", (_name, init, steps) => {
    const [ours, theirs] = [play(kinds[1]![1], init, steps), play(kinds[0]![1], init, steps)];
    expect(ours).toEqual(theirs);
  });
});
