/**
 * The writer's spill of one channel: every closed frame is written here before
 * any log server sees it, and stays until every server acknowledged it. Files
 * roll at `fileBytes`; a file is deleted once all its frames are dropped. A
 * bounded number of recent frames is also kept in memory, so a healthy
 * pipeline rarely reads the files back; a server that was down reads its
 * backlog from them.
 *
 * Durability: a frame is written with one write(2) as soon as it closes, so a
 * crash of the writer's process (SIGKILL included) loses nothing already
 * spilled: the page cache belongs to the kernel. Files are fdatasynced (and
 * the directory fsynced after a new file) every `syncIntervalMs`, which bounds
 * what a crash of the machine itself can take. `Spill.open` reads the files of
 * an earlier process back: each record carries its length, seq, capture time,
 * channel offset and a CRC-32, and a torn or corrupt tail is cut off.
 *
 * Record layout (little-endian): u32 data length, u32 CRC-32 of the rest of
 * the header and the data, i64 seq, i64 capture time (µs), i64 channel
 * offset of the first byte, then the data.
 *
 * Every byte on disk is charged to a SpillBudget shared by the host's spills
 * (the per-host cap); deleting a file releases it.
 */
import { readSync, writeSync } from "node:fs";
import { open, readdir, readFile, rename, rm, type FileHandle } from "node:fs/promises";
import { dirname, join } from "node:path";
import { crc32 } from "node:zlib";

export const RECORD_HEADER_BYTES = 32;
/** Larger frames are not written by a shipper; a record claiming more is corrupt. */
const MAX_RECORD_DATA = 1 << 20;

export interface SpilledFrame {
  seq: number;
  captureMicros: number;
  data: Uint8Array;
}

interface SpillFile {
  path: string;
  handle: FileHandle;
  bytes: number;
  /** Frames in the file, and the highest seq among them. */
  frames: number;
  lastSeq: number;
}

interface Location {
  file: SpillFile;
  /** Where the data (not the header) starts in the file. */
  offset: number;
  length: number;
  captureMicros: number;
  /** Bytes of the channel before this frame. */
  channelOffset: number;
}

/**
 * Bytes the spills of one host may hold on disk. `tryCharge` refuses what
 * would pass the cap; `charge` takes it anyway (files found at start-up, the
 * supervisor's own short notices).
 */
export class SpillBudget {
  private used = 0;

  constructor(readonly capBytes: number = Number.POSITIVE_INFINITY) {}

  get usedBytes(): number {
    return this.used;
  }

  /** Charges `bytes` if they fit under the cap with `spare` bytes left over. */
  tryCharge(bytes: number, spare = 0): boolean {
    if (this.used + bytes + spare > this.capBytes) return false;
    this.used += bytes;
    return true;
  }

  charge(bytes: number): void {
    this.used += bytes;
  }

  release(bytes: number): void {
    this.used = Math.max(0, this.used - bytes);
  }
}

/** Shared memory budget of every spill of one shipper. */
export class FrameCache {
  private readonly frames = new Map<string, Uint8Array>();
  private bytes = 0;

  constructor(private readonly budgetBytes: number) {}

  put(key: string, data: Uint8Array): void {
    this.frames.set(key, data);
    this.bytes += data.length;
    for (const [k, v] of this.frames) {
      if (this.bytes <= this.budgetBytes) break;
      this.frames.delete(k);
      this.bytes -= v.length;
    }
  }

  get(key: string): Uint8Array | undefined {
    return this.frames.get(key);
  }

  delete(key: string): void {
    const v = this.frames.get(key);
    if (v) {
      this.frames.delete(key);
      this.bytes -= v.length;
    }
  }
}

export interface SpillOptions {
  dir: string;
  /** Resolves once `dir` exists. */
  ready: Promise<void>;
  /** File names are `<prefix>.<n>.spill`. */
  prefix: string;
  fileBytes: number;
  cache: FrameCache;
  budget: SpillBudget;
  /** Longest time a written frame waits for its fdatasync; 0: never synced. */
  syncIntervalMs: number;
  /** Told when a background fdatasync fails (the frames stay spilled, only less durable). */
  onSyncError?: (err: unknown) => void;
}

export class Spill {
  private files: SpillFile[] = [];
  /** Locations of frames firstSeq... (a queue: dropped ones leave the front). */
  private locations: Location[] = [];
  private head = 0;
  /** Seq of locations[head]. */
  private firstSeq = 1;
  /** Channel offset of the first frame not dropped. */
  private firstOffset = 0;
  private nextFile = 0;
  private chain: Promise<unknown>;
  /** Highest seq written to the spill. */
  lastSeq = 0;
  /** Bytes of the channel through lastSeq. */
  totalBytes = 0;
  private closed = false;
  /** Files written since their last fdatasync; the directory after a new file. */
  private readonly dirty = new Set<SpillFile>();
  private dirDirty = false;
  private syncTimer: NodeJS.Timeout | undefined;
  private syncing: Promise<void> = Promise.resolve();

  constructor(private readonly options: SpillOptions) {
    this.chain = options.ready;
  }

  /**
   * The spill of `prefix` as an earlier process left it: every valid record
   * of its files, charged to the budget. A torn or corrupt record ends the
   * spill there (the file is cut, later files removed): what an earlier
   * writer's crash can leave behind.
   */
  static async open(options: SpillOptions, onDamage?: (what: string) => void): Promise<Spill> {
    const spill = new Spill(options);
    await options.ready;
    const pattern = new RegExp(`^${escapeRegExp(options.prefix)}\\.(\\d+)\\.spill$`);
    const names = (await readdir(options.dir))
      .map((name) => ({ name, n: Number(pattern.exec(name)?.[1] ?? NaN) }))
      .filter((f) => !Number.isNaN(f.n))
      .sort((a, b) => a.n - b.n);
    let damaged = false;
    for (const { name, n } of names) {
      const path = join(options.dir, name);
      if (damaged) {
        await rm(path, { force: true });
        continue;
      }
      spill.nextFile = n + 1;
      const bytes = await readFile(path);
      const handle = await open(path, "r+");
      const file: SpillFile = { path, handle, bytes: 0, frames: 0, lastSeq: 0 };
      let pos = 0;
      while (pos < bytes.length) {
        const record = parseRecord(bytes, pos);
        const expected = spill.lastSeq === 0 ? undefined : spill.lastSeq + 1;
        if (!record || (expected !== undefined && record.seq !== expected)) {
          damaged = true;
          onDamage?.(`${name}: the record at byte ${pos} is torn or corrupt; the spill ends there`);
          break;
        }
        if (spill.lastSeq === 0) {
          spill.firstSeq = record.seq;
          spill.firstOffset = record.channelOffset;
        }
        spill.locations.push({
          file,
          offset: pos + RECORD_HEADER_BYTES,
          length: record.length,
          captureMicros: record.captureMicros,
          channelOffset: record.channelOffset,
        });
        spill.lastSeq = record.seq;
        spill.totalBytes = record.channelOffset + record.length;
        file.frames++;
        file.lastSeq = record.seq;
        pos += RECORD_HEADER_BYTES + record.length;
      }
      if (pos < bytes.length) await handle.truncate(pos);
      file.bytes = pos;
      if (file.frames === 0) {
        await handle.close();
        await rm(path, { force: true });
        continue;
      }
      options.budget.charge(file.bytes);
      spill.files.push(file);
    }
    return spill;
  }

  /** Bytes this spill holds on disk. */
  get diskBytes(): number {
    return this.files.reduce((sum, f) => sum + f.bytes, 0);
  }

  /**
   * Charges a frame of `dataLength` bytes to the budget before it is appended:
   * false when the cap refuses it, or would be left with less than `spare`
   * bytes (unless `force`). Synchronous, so that the frames of every channel
   * are admitted in the order they close.
   */
  admit(dataLength: number, options: { force?: boolean; spare?: number } = {}): boolean {
    const bytes = RECORD_HEADER_BYTES + dataLength;
    if (options.force) {
      this.options.budget.charge(bytes);
      return true;
    }
    return this.options.budget.tryCharge(bytes, options.spare);
  }

  /** Appends an admitted frame as seq lastSeq+1; resolves once it is in the spill. */
  append(captureMicros: number, data: Uint8Array): Promise<number> {
    const run = this.chain.then(async () => {
      if (this.closed) throw new Error("spill closed");
      let file = this.files[this.files.length - 1];
      if (!file || file.bytes >= this.options.fileBytes) file = await this.newFile();
      const seq = this.lastSeq + 1;
      // Not from the shared pool: the cache keeps a view of it.
      const record = Buffer.allocUnsafeSlow(RECORD_HEADER_BYTES + data.length);
      record.writeUInt32LE(data.length, 0);
      record.writeBigInt64LE(BigInt(seq), 8);
      record.writeBigInt64LE(BigInt(captureMicros), 16);
      record.writeBigInt64LE(BigInt(this.totalBytes), 24);
      record.set(data, RECORD_HEADER_BYTES);
      record.writeUInt32LE(crc32(record.subarray(8)), 4);
      const offset = file.bytes;
      // A write to the page cache takes microseconds: done on this thread,
      // not queued on the thread pool behind slow file-system calls.
      let done = 0;
      while (done < record.length) done += writeSync(file.handle.fd, record, done, record.length - done, offset + done);
      file.bytes += record.length;
      file.frames++;
      file.lastSeq = seq;
      this.lastSeq = seq;
      this.locations.push({ file, offset: offset + RECORD_HEADER_BYTES, length: data.length, captureMicros, channelOffset: this.totalBytes });
      this.totalBytes += data.length;
      const stored = record.subarray(RECORD_HEADER_BYTES);
      this.options.cache.put(this.key(seq), stored);
      this.dirty.add(file);
      this.scheduleSync();
      return seq;
    });
    this.chain = run.catch(() => undefined);
    return run;
  }

  /** Gives back the charge of an admitted frame that was not appended. */
  refund(dataLength: number): void {
    this.options.budget.release(RECORD_HEADER_BYTES + dataLength);
  }

  private key(seq: number): string {
    return `${this.options.prefix}/${seq}`;
  }

  private async newFile(): Promise<SpillFile> {
    const path = join(this.options.dir, `${this.options.prefix}.${this.nextFile++}.spill`);
    const handle = await open(path, "w+", 0o600);
    const file: SpillFile = { path, handle, bytes: 0, frames: 0, lastSeq: 0 };
    this.files.push(file);
    this.dirDirty = true;
    return file;
  }

  private scheduleSync(): void {
    if (this.syncTimer || this.options.syncIntervalMs <= 0) return;
    this.syncTimer = setTimeout(() => {
      this.syncTimer = undefined;
      void this.sync().catch((err: unknown) => this.options.onSyncError?.(err));
    }, this.options.syncIntervalMs);
    this.syncTimer.unref?.();
  }

  /** fdatasyncs every file written since its last sync (and the directory after a new file). */
  sync(): Promise<void> {
    const files = [...this.dirty];
    this.dirty.clear();
    const dir = this.dirDirty;
    this.dirDirty = false;
    const run = this.syncing.then(async () => {
      // A file dropped meanwhile needs no sync.
      await Promise.all(
        files.map((f) =>
          f.handle.datasync().catch((err: unknown) => {
            if (this.files.includes(f)) throw err;
          }),
        ),
      );
      if (dir) await syncDir(this.options.dir);
    });
    this.syncing = run.catch(() => undefined);
    return run;
  }

  /** The frame `seq`, which must be spilled and not dropped. */
  async get(seq: number): Promise<SpilledFrame> {
    const loc = this.location(seq);
    if (!loc) throw new Error(`frame ${seq} is not in the spill`);
    const cached = this.options.cache.get(this.key(seq));
    if (cached) return { seq, captureMicros: loc.captureMicros, data: cached };
    const data = Buffer.allocUnsafe(loc.length);
    let done = 0;
    while (done < loc.length) {
      const bytesRead = readSync(loc.file.handle.fd, data, done, loc.length - done, loc.offset + done);
      if (bytesRead === 0) throw new Error(`spill ${loc.file.path} is shorter than expected`);
      done += bytesRead;
    }
    return { seq, captureMicros: loc.captureMicros, data };
  }

  /** Whether frame `seq` can still be read (spilled and not dropped). */
  holds(seq: number): boolean {
    return this.location(seq) !== undefined;
  }

  private location(seq: number): Location | undefined {
    return seq < this.firstSeq ? undefined : this.locations[this.head + seq - this.firstSeq];
  }

  /** Bytes of the channel through frame `seq` (for seq at least the first not dropped minus one). */
  offsetAfter(seq: number): number {
    if (seq >= this.lastSeq) return this.totalBytes;
    const next = this.location(seq + 1);
    return next ? next.channelOffset : this.firstOffset;
  }

  /** Forgets frames up to `seq` (every server has them); deletes files left without frames. */
  async dropThrough(seq: number): Promise<void> {
    seq = Math.min(seq, this.lastSeq);
    while (this.firstSeq <= seq) {
      const loc = this.locations[this.head];
      if (loc) this.firstOffset = loc.channelOffset + loc.length;
      this.options.cache.delete(this.key(this.firstSeq));
      this.head++;
      this.firstSeq++;
    }
    if (this.head > 1024 && this.head * 2 > this.locations.length) {
      this.locations = this.locations.slice(this.head);
      this.head = 0;
    }
    // Every file whose frames are all dropped goes, the one being written
    // too (the next frame starts a new one); a file just created has none yet.
    while (this.files.length > 0 && this.files[0].frames > 0 && this.files[0].lastSeq < this.firstSeq) {
      const file = this.files.shift()!;
      this.dirty.delete(file);
      this.options.budget.release(file.bytes);
      await file.handle.close();
      await rm(file.path, { force: true });
    }
  }

  /** Closes the files, keeping them for a later `Spill.open`; releases their charge. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.syncTimer);
    await this.chain;
    await this.sync().catch(() => undefined);
    for (const file of this.files.splice(0)) {
      this.options.budget.release(file.bytes);
      await file.handle.close().catch(() => undefined);
    }
  }

  /** Closes and deletes every file. */
  async destroy(): Promise<void> {
    this.closed = true;
    clearTimeout(this.syncTimer);
    await this.chain;
    await this.syncing;
    this.dirty.clear();
    for (const file of this.files.splice(0)) {
      this.options.budget.release(file.bytes);
      await file.handle.close().catch(() => undefined);
      await rm(file.path, { force: true });
    }
  }
}

/** The record at `pos`, or undefined when it is torn or fails its CRC. */
function parseRecord(bytes: Buffer, pos: number): { length: number; seq: number; captureMicros: number; channelOffset: number } | undefined {
  if (pos + RECORD_HEADER_BYTES > bytes.length) return undefined;
  const length = bytes.readUInt32LE(pos);
  if (length === 0 || length > MAX_RECORD_DATA || pos + RECORD_HEADER_BYTES + length > bytes.length) return undefined;
  if (crc32(bytes.subarray(pos + 8, pos + RECORD_HEADER_BYTES + length)) !== bytes.readUInt32LE(pos + 4)) return undefined;
  const seq = Number(bytes.readBigInt64LE(pos + 8));
  if (seq < 1) return undefined;
  return {
    length,
    seq,
    captureMicros: Number(bytes.readBigInt64LE(pos + 16)),
    channelOffset: Number(bytes.readBigInt64LE(pos + 24)),
  };
}

/** Writes `text` to `path` through a temporary file, fsynced, renamed into place, the directory fsynced. */
export async function writeAtomic(path: string, text: string): Promise<void> {
  const temp = `${path}.tmp`;
  const handle = await open(temp, "w", 0o600);
  try {
    await handle.writeFile(text);
    await handle.datasync();
  } finally {
    await handle.close();
  }
  await rename(temp, path);
  await syncDir(dirname(path));
}

/** fsyncs a directory, so that files created or renamed in it survive a crash of the machine. */
export async function syncDir(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
