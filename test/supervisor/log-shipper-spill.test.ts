import { randomBytes } from "node:crypto";
import { appendFile, readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "@jest/globals";
import { FrameCache, RECORD_HEADER_BYTES, Spill, SpillBudget, type SpillOptions } from "../../supervisor/log-shipper/spill.js";
import { tempDir } from "../stores/log/helpers.js";

let dir: { path: string; remove(): Promise<void> };
beforeEach(async () => {
  dir = await tempDir("treadmill-spill-");
});
afterEach(async () => {
  await dir.remove();
});

const options = (budget = new SpillBudget(), extra: Partial<SpillOptions> = {}): SpillOptions => ({
  dir: dir.path,
  ready: Promise.resolve(),
  prefix: "job-1-console",
  fileBytes: 1024,
  // No frame stays in memory: reads come from the files.
  cache: new FrameCache(0),
  budget,
  syncIntervalMs: 0,
  ...extra,
});

async function fill(spill: Spill, count: number): Promise<Buffer[]> {
  const frames = Array.from({ length: count }, (_, i) => randomBytes(1 + ((i * 37) % 300)));
  for (const [i, data] of frames.entries()) {
    expect(spill.admit(data.length)).toBe(true);
    await spill.append(1_000_000 + i, data);
  }
  return frames;
}

const files = async () => (await readdir(dir.path)).filter((n) => n.endsWith(".spill")).sort();

describe("Spill", () => {
  it("reads back every frame an earlier process wrote, with its seq and capture time, and appends after them", async () => {
    const first = new Spill(options());
    const frames = await fill(first, 60);
    // The writer "dies": nothing is closed or synced, the files are as it left them.
    expect((await files()).length).toBeGreaterThan(3);

    const budget = new SpillBudget();
    const again = await Spill.open(options(budget));
    expect(again.lastSeq).toBe(60);
    expect(again.totalBytes).toBe(frames.reduce((n, f) => n + f.length, 0));
    for (let seq = 1; seq <= 60; seq++) {
      const frame = await again.get(seq);
      expect(Buffer.from(frame.data).equals(frames[seq - 1])).toBe(true);
      expect(frame.captureMicros).toBe(1_000_000 + seq - 1);
    }
    // Every byte on disk is charged to the host's budget.
    const sizes = await Promise.all((await files()).map(async (n) => (await stat(join(dir.path, n))).size));
    expect(budget.usedBytes).toBe(sizes.reduce((a, b) => a + b, 0));
    expect(again.diskBytes).toBe(budget.usedBytes);

    expect(again.admit(5)).toBe(true);
    expect(await again.append(7, Buffer.from("after"))).toBe(61);
    await again.destroy();
    await first.destroy();
    expect(await files()).toEqual([]);
    expect(budget.usedBytes).toBe(0);
  });

  it("cuts a torn last record and stops at a corrupt one, removing what follows", async () => {
    const first = new Spill(options());
    const frames = await fill(first, 40);
    const names = await files();
    // A write cut short by a crash of the machine: half a header at the end.
    await appendFile(join(dir.path, names[names.length - 1]), Buffer.alloc(RECORD_HEADER_BYTES / 2, 7));
    const damage: string[] = [];
    const torn = await Spill.open(options(), (what) => damage.push(what));
    expect(torn.lastSeq).toBe(40);
    expect(damage).toHaveLength(1);
    await torn.close();

    // A flipped byte in the data of the second file's first record.
    const second = join(dir.path, names[1]);
    const bytes = await readFile(second);
    const firstSeqOfSecond = Number(bytes.readBigInt64LE(8));
    bytes[RECORD_HEADER_BYTES] ^= 0xff;
    await writeFile(second, bytes);
    const corrupt = await Spill.open(options(), (what) => damage.push(what));
    expect(corrupt.lastSeq).toBe(firstSeqOfSecond - 1);
    for (let seq = 1; seq < firstSeqOfSecond; seq++) expect(Buffer.from((await corrupt.get(seq)).data).equals(frames[seq - 1])).toBe(true);
    expect(await files()).toEqual([names[0]]);
    await corrupt.destroy();
    await first.destroy();
  });

  it("deletes each file once all its frames are dropped, the one being written too, and gives its bytes back", async () => {
    const budget = new SpillBudget();
    const spill = new Spill(options(budget));
    await fill(spill, 30);
    const before = budget.usedBytes;
    expect(before).toBe(spill.diskBytes);
    await spill.dropThrough(10);
    expect(budget.usedBytes).toBeLessThan(before);
    expect(budget.usedBytes).toBe(spill.diskBytes);
    expect(spill.holds(10)).toBe(false);
    expect(spill.holds(11)).toBe(true);
    await spill.dropThrough(30);
    expect(await files()).toEqual([]);
    expect(budget.usedBytes).toBe(0);
    // The next frame starts a new file; seqs go on.
    expect(spill.admit(3)).toBe(true);
    expect(await spill.append(1, Buffer.from("abc"))).toBe(31);
    expect(await files()).toHaveLength(1);
    expect(spill.offsetAfter(30)).toBe(spill.totalBytes - 3);
    await spill.destroy();
  });

  it("refuses frames past the host's cap, shared by every spill, until dropped frames free room", async () => {
    const budget = new SpillBudget(4 * (RECORD_HEADER_BYTES + 100));
    const a = new Spill(options(budget, { prefix: "job-a-console" }));
    const b = new Spill(options(budget, { prefix: "job-b-console" }));
    for (const spill of [a, a, b, b]) {
      expect(spill.admit(100)).toBe(true);
      await spill.append(1, randomBytes(100));
    }
    expect(a.admit(100)).toBe(false);
    expect(b.admit(1)).toBe(false);
    // The supervisor's own notices pass the cap.
    expect(b.admit(10, { force: true })).toBe(true);
    await b.append(1, randomBytes(10));
    expect(budget.usedBytes).toBe(4 * (RECORD_HEADER_BYTES + 100) + RECORD_HEADER_BYTES + 10);
    await a.dropThrough(2);
    // Room for one frame, but not with a frame's worth to spare.
    expect(b.admit(100, { spare: 2 * (RECORD_HEADER_BYTES + 100) })).toBe(false);
    expect(b.admit(100)).toBe(true);
    b.refund(100);
    expect(budget.usedBytes).toBe(2 * (RECORD_HEADER_BYTES + 100) + RECORD_HEADER_BYTES + 10);
    await a.destroy();
    await b.destroy();
    expect(budget.usedBytes).toBe(0);
  });
});
