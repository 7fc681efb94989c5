import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, readFile, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "@jest/globals";
import { ConsoleArtifacts } from "../../supervisor/console-artifacts.js";

const caps = { maxFileBytes: 4096n, maxJobBytes: 6000n, maxFiles: 2 };

/** The console lines that send `data` as `name`, base64 wrapped at 76 characters as base64(1) does. */
function lines(name: string, data: Buffer, eol = "\n"): string {
  const b64 = data.toString("base64").match(/.{1,76}/g) ?? [];
  const hex = createHash("sha256").update(data).digest("hex");
  return `${b64.map((l) => `TREADMILL_ARTIFACT ${name} ${l}${eol}`).join("")}TREADMILL_ARTIFACT_END ${name} ${hex}${eol}`;
}

/** Feeds `text` in pieces of `size` bytes, as a serial line delivers it. */
function feed(artifacts: ConsoleArtifacts, text: string, size = 7): void {
  const bytes = Buffer.from(text, "latin1");
  for (let i = 0; i < bytes.length; i += size) artifacts.write(bytes.subarray(i, i + size));
}

describe("artifacts sent over a job's console", () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "console-artifacts-"));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("decodes files split across console reads, with CRLF line ends and other output between, into their names", async () => {
    const a = new ConsoleArtifacts(join(dir, "spool"), caps);
    const report = randomBytes(1000);
    const log = Buffer.from("line 1\nline 2\n");
    feed(a, `booting...\r\n${lines("results/report.bin", report, "\r\n")}kernel: noise\n${lines("run.log", log)}`);
    expect(await a.finish()).toEqual([]);
    expect(await readFile(join(a.filesDir, "results", "report.bin"))).toEqual(report);
    expect(await readFile(join(a.filesDir, "run.log"))).toEqual(log);
  });

  it("skips a garbled file, one without an end line, and one over the per-file cap, saying why", async () => {
    const a = new ConsoleArtifacts(join(dir, "spool"), caps);
    const good = Buffer.from("fine\n");
    const garbled = lines("garbled.txt", Buffer.from("hello world, this is long enough")).replace("aGVsbG8g", "aGVsbG9g");
    const unfinished = lines("unfinished.txt", Buffer.from("never ends")).split("\n")[0] + "\n";
    feed(a, garbled + unfinished + lines("big.bin", randomBytes(5000)) + lines("ok.txt", good));
    const skipped = await a.finish();
    expect(skipped.map((s) => [s.name, s.reason])).toEqual([
      ["garbled.txt", "garbled on the console (its bytes do not match the sha256 of its end line)"],
      ["big.bin", "larger than the per-file cap of 4 KiB"],
      ["unfinished.txt", "incomplete on the console (no TREADMILL_ARTIFACT_END line)"],
    ]);
    expect(await readdir(a.filesDir)).toEqual(["ok.txt"]);
    await a.cleanup();
    await expect(readdir(join(dir, "spool"))).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("keeps to the per-job byte cap and the file count, and replaces a file sent again", async () => {
    const a = new ConsoleArtifacts(join(dir, "spool"), caps);
    feed(a, lines("one.bin", randomBytes(3000)) + lines("two.bin", randomBytes(3500)) + lines("three.bin", randomBytes(10)));
    const second = Buffer.from("second version");
    feed(a, lines("one.bin", second) + lines("four.bin", Buffer.from("x")));
    const skipped = await a.finish();
    expect(skipped.map((s) => [s.name, s.reason])).toEqual([
      ["two.bin", "over the per-job cap of 5.9 KiB"],
      ["four.bin", "over the cap of 2 files"],
    ]);
    expect((await readdir(a.filesDir)).sort()).toEqual(["one.bin", "three.bin"]);
    expect(await readFile(join(a.filesDir, "one.bin"))).toEqual(second);
  });
});
