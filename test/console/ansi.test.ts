import { describe, expect, it } from "@jest/globals";
import { AnsiLog, BOLD, DEFAULT_COLOUR, INVERSE, RGB_BASE, paletteColour, rgbColour } from "../../console/src/ansi.js";

const lines = (log: AnsiLog) => Array.from({ length: log.lineCount }, (_, i) => log.text(i));
const styleOf = (log: AnsiLog, line: number, segment: number) => log.styles[log.line(line)[segment].style];

describe("the console's ANSI log parser", () => {
  it("splits lines on LF and CRLF and keeps the line in progress", () => {
    const log = new AnsiLog();
    log.write("one\r\ntwo\nthr");
    expect(lines(log)).toEqual(["one", "two", "thr"]);
    log.write("ee\n");
    expect(lines(log)).toEqual(["one", "two", "three"]);
  });

  it("applies SGR colours and flags, and resets them", () => {
    const log = new AnsiLog();
    log.write("plain \x1b[1;31mbold red\x1b[0m back \x1b[38;5;208morange\x1b[48;2;1;2;3m on rgb\x1b[7m inverse\x1b[m\n");
    expect(lines(log)).toEqual(["plain bold red back orange on rgb inverse"]);
    const segments = log.line(0);
    expect(segments.map((s) => s.text)).toEqual(["plain ", "bold red", " back ", "orange", " on rgb", " inverse"]);
    expect(segments[0].style).toBe(0);
    expect(styleOf(log, 0, 1)).toEqual({ fg: 1, bg: DEFAULT_COLOUR, flags: BOLD });
    expect(segments[2].style).toBe(0);
    expect(styleOf(log, 0, 3)).toEqual({ fg: 208, bg: DEFAULT_COLOUR, flags: 0 });
    expect(styleOf(log, 0, 4)).toEqual({ fg: 208, bg: RGB_BASE + 0x010203, flags: 0 });
    expect(styleOf(log, 0, 5).flags).toBe(INVERSE);
    expect(paletteColour(208)).toBe("rgb(255, 135, 0)");
    expect(rgbColour(RGB_BASE + 0x010203)).toBe("rgb(1, 2, 3)");
  });

  it("copes with escape sequences split across chunks", () => {
    const log = new AnsiLog();
    for (const chunk of ["a\x1b", "[3", "2mgreen\x1b[", "0m\n"]) log.write(chunk);
    expect(lines(log)).toEqual(["agreen"]);
    expect(styleOf(log, 0, 1).fg).toBe(2);
  });

  it("drops cursor movement and OSC titles, and starts a line over on a lone CR", () => {
    const log = new AnsiLog();
    log.write("\x1b]0;title\x07\x1b[2K\x1b[1Gprogress 10%\rprogress 50%\r\x1b[Kdone\n");
    log.write("\x1b]2;other\x1b\\after\n");
    expect(lines(log)).toEqual(["done", "after"]);
  });

  it("keeps at most maxLines lines, dropping the oldest", () => {
    const log = new AnsiLog(3);
    log.write("1\n2\n3\n4\n5\n");
    expect(lines(log)).toEqual(["3", "4", "5"]);
    expect(log.dropped).toBe(2);
  });

  it("parses 100k coloured lines in one call, interning their styles", () => {
    const log = new AnsiLog();
    const text = Array.from({ length: 100_000 }, (_, i) => `\x1b[3${i % 8}mline ${i}\x1b[0m`).join("\n") + "\n";
    log.write(text);
    expect(log.lineCount).toBe(100_000);
    expect(log.text(99_999)).toBe("line 99999");
    // Styles are interned: eight colours, one entry each (plus the plain style).
    expect(log.styles.length).toBe(9);
  });
});
