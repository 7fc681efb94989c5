/**
 * The lines `tml job run -f` keeps for a matrix's jobs (JobBoard): redrawn
 * in place on a terminal, a line per change elsewhere.
 */
import { describe, expect, it } from "@jest/globals";
import { PassThrough } from "node:stream";
import { JobBoard } from "../../cli/commands/job-file.js";

function stream(tty: boolean): { out: PassThrough & { isTTY?: boolean }; text: () => string } {
  const out: PassThrough & { isTTY?: boolean } = new PassThrough();
  out.isTTY = tty;
  const chunks: Buffer[] = [];
  out.on("data", (d: Buffer) => chunks.push(d));
  return { out, text: () => Buffer.concat(chunks).toString() };
}

describe("JobBoard", () => {
  it("on a terminal, redraws the block of lines in place, a job's line changing where it stands", async () => {
    const { out, text } = stream(true);
    const board = new JobBoard(out, ["a submitted", "b submitted"]);
    board.set(1, "b running");
    board.set(1, "b running");
    board.set(0, "a succeeded");
    await new Promise((r) => setImmediate(r));
    const draw = (a: string, b: string) => `\r\x1b[2K${a}\n\r\x1b[2K${b}\n`;
    expect(text()).toBe(draw("a submitted", "b submitted") + "\x1b[2A" + draw("a submitted", "b running") + "\x1b[2A" + draw("a succeeded", "b running"));
  });

  it("elsewhere, prints each line once and then a line per change", async () => {
    const { out, text } = stream(false);
    const board = new JobBoard(out, ["a submitted", "b submitted"], (t) => `[${t}]`);
    board.set(1, "b running");
    board.set(1, "b running");
    await new Promise((r) => setImmediate(r));
    expect(text()).toBe("[a submitted]\n[b submitted]\n[b running]\n");
  });
});
