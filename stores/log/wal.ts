/**
 * The log server's write-ahead log: one file that every channel's frames are
 * appended to, so that one fdatasync makes a whole batch of many jobs durable
 * (group commit, see log-store.ts). The segment files get the same records
 * right after, without an fsync of their own; a checkpoint fsyncs them.
 *
 * Files: `<dataDir>/wal/<n>.wal`, numbered upwards. The current file rolls at
 * `fileBytes`; the rolled file's checkpoint runs once every segment that
 * received records while it was current has been fsynced. So every segment
 * byte that may not be on disk is in a WAL file that still exists.
 *
 * Checkpointed files are recycled (as PostgreSQL does its WAL segments): up
 * to SPARE_FILES wait as `spare-<n>.wal` and become the next file, written
 * over from its start. Writing over a file's allocated blocks costs about a
 * third less CPU per byte than growing a new file, and its fdatasync has no
 * inode to write: ext4 writes a grown file's inode within fdatasync, under
 * the inode's lock, which the next round's write then waits for. Until
 * checkpoints give spares, a log in steady use gets zero-filled ones
 * (`spare-zero-<k>.wal`, as PostgreSQL's wal_init_zero), made in the
 * background once the current file is an eighth full, and rolls to the
 * first one at once. A recycled file holds the entries of its
 * earlier use past the new ones, so every entry names the file it was
 * written to (its generation), and replay stops at the first entry of
 * another.
 *
 * Entry (one channel's part of one batch):
 *   u32 magic "TMLX" · u32 meta length · u32 records length · u64 generation
 *   (the file's number) · u32 crc32 of the records' headers · u32 crc32 of
 *   the 24 bytes before it and the meta · meta: u32 attempt, u8 job id
 *   length, job id, u8 channel length, channel · records: segment records
 *   (segment.ts), whose data each record's header checks.
 * The crc of the records' headers ties the records to their entry: the bytes
 * of a torn entry's records may be left over from the file's earlier use,
 * well-formed records of another channel.
 *
 * On start, the files left over are replayed into the segments (a crash, or
 * a checkpoint that failed): every record is written again where it belongs,
 * which also repairs a segment whose unsynced pages reached the disk out of
 * order; a file's torn tail (never acknowledged) ends its replay.
 */
import { mkdir, open, readdir, readFile, rename, rm, stat, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import type { Logger } from "../../lib/logger.js";
import { HEADER_BYTES, MAX_FRAME_BYTES, syncDir, writeAllSync } from "./segment.js";

const MAGIC = 0x544d4c58; // "TMLX"
const ENTRY_HEADER_BYTES = 28;
/** Checkpointed files kept to be written over. */
const SPARE_FILES = 3;
/**
 * Segment fsyncs a checkpoint runs at once: it ends sooner (a spare sooner),
 * and leaves libuv's other two threads to the rounds' fdatasyncs.
 */
const CHECKPOINT_SYNCS = 2;

/** What a segment offers the WAL: an fsync at checkpoints. */
export interface Syncable {
  sync(): Promise<void>;
}

/** One channel's records of one batch, as read back. */
export interface WalEntry {
  jobId: string;
  attempt: number;
  channel: string;
  /** Segment records (header and data each). */
  records: Buffer;
}

/** One channel's records of one batch, to write: writev's buffers, `recordBytes` in all. */
export interface WalWrite extends Omit<WalEntry, "records"> {
  records: readonly Uint8Array[];
  recordBytes: number;
  /** The records' headers, back to back (the records hold the same bytes). */
  headers: Buffer;
}

interface WalFile {
  number: number;
  path: string;
  handle: FileHandle;
  bytes: number;
  /** Segments that received records while this file was current. */
  dirty: Set<Syncable>;
}

function fileName(n: number): string {
  return `${String(n).padStart(16, "0")}.wal`;
}

function spareName(n: number): string {
  return `spare-${fileName(n)}`;
}

/** The entry header and meta of `entry`, written to file `generation`. */
function encodeEntryHeader(entry: WalWrite, generation: number): Buffer {
  const job = Buffer.from(entry.jobId);
  const channel = Buffer.from(entry.channel);
  const metaBytes = 4 + 1 + job.length + 1 + channel.length;
  const buf = Buffer.allocUnsafe(ENTRY_HEADER_BYTES + metaBytes);
  buf.writeUInt32BE(MAGIC, 0);
  buf.writeUInt32BE(metaBytes, 4);
  buf.writeUInt32BE(entry.recordBytes, 8);
  buf.writeUInt32BE(Math.floor(generation / 0x100000000), 12);
  buf.writeUInt32BE(generation % 0x100000000, 16);
  buf.writeUInt32BE(crc32(entry.headers), 20);
  let at = ENTRY_HEADER_BYTES;
  buf.writeUInt32BE(entry.attempt, at);
  buf.writeUInt8(job.length, at + 4);
  job.copy(buf, at + 5);
  at += 5 + job.length;
  buf.writeUInt8(channel.length, at);
  channel.copy(buf, at + 1);
  buf.writeUInt32BE(crc32(buf.subarray(ENTRY_HEADER_BYTES), crc32(buf.subarray(0, 24))), 24);
  return buf;
}

/** The crc32 of the headers of the records in `records`; undefined when they do not fill it exactly. */
function recordHeadersCrc(records: Buffer): number | undefined {
  let crc = 0;
  let at = 0;
  while (at < records.length) {
    if (records.length - at < HEADER_BYTES) return undefined;
    const length = records.readUInt32BE(at + 4);
    if (length > MAX_FRAME_BYTES) return undefined;
    crc = crc32(records.subarray(at, at + HEADER_BYTES), crc);
    at += HEADER_BYTES + length;
  }
  return at === records.length ? crc : undefined;
}

/**
 * The entries of file `generation`'s contents, up to the first torn or
 * corrupt one, or one of the file's earlier use.
 */
export function* decodeEntries(buf: Buffer, generation: number): Generator<WalEntry> {
  let at = 0;
  while (buf.length - at >= ENTRY_HEADER_BYTES) {
    if (buf.readUInt32BE(at) !== MAGIC) return;
    const metaBytes = buf.readUInt32BE(at + 4);
    const recordsBytes = buf.readUInt32BE(at + 8);
    const metaStart = at + ENTRY_HEADER_BYTES;
    const end = metaStart + metaBytes + recordsBytes;
    if (metaBytes < 6 || metaBytes > 4 + 1 + 255 + 1 + 255 || end > buf.length) return;
    const crc = crc32(buf.subarray(metaStart, metaStart + metaBytes), crc32(buf.subarray(at, at + 24)));
    if (crc !== buf.readUInt32BE(at + 24)) return;
    if (buf.readUInt32BE(at + 12) * 0x100000000 + buf.readUInt32BE(at + 16) !== generation) return;
    const records = buf.subarray(metaStart + metaBytes, end);
    if (recordHeadersCrc(records) !== buf.readUInt32BE(at + 20)) return;
    const attempt = buf.readUInt32BE(metaStart);
    const jobBytes = buf.readUInt8(metaStart + 4);
    const jobId = buf.toString("utf8", metaStart + 5, metaStart + 5 + jobBytes);
    const channelAt = metaStart + 5 + jobBytes;
    const channel = buf.toString("utf8", channelAt + 1, channelAt + 1 + buf.readUInt8(channelAt));
    yield { jobId, attempt, channel, records };
    at = end;
  }
}

export class WriteAheadLog {
  private readonly dir: string;
  private readonly fileBytes: number;
  private readonly logger: Logger;
  private current: WalFile | undefined;
  /** Files left by an earlier run, oldest first, until replayed. */
  private leftOver: number[] = [];
  /** Checkpoints run one after another. */
  private checkpoints: Promise<void> = Promise.resolve();
  /** Rolled files whose checkpoint has not finished yet. */
  private rolled = 0;
  /** Checkpointed or zero-filled files to write over next (paths). */
  private spares: string[] = [];
  /** The current file is written over (a spare), not grown. */
  private overwriting = false;
  /** A zero-filled spare being made. */
  private preparing: Promise<void> | undefined;
  private zeroFilled = 0;
  /** Zero-filled spares made since open. */
  private zeroFillsThisRun = 0;

  private readonly zeroFill: boolean;

  constructor(options: { dir: string; fileBytes: number; logger: Logger; zeroFill?: boolean }) {
    this.zeroFill = options.zeroFill ?? true;
    this.dir = options.dir;
    this.fileBytes = options.fileBytes;
    this.logger = options.logger;
  }

  /** Finds the files left by an earlier run (see `replay`). */
  async open(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    const files = await readdir(this.dir);
    this.leftOver = files
      .filter((f) => /^\d{16}\.wal$/.test(f))
      .map((f) => Number(f.slice(0, 16)))
      .sort((a, b) => a - b);
    for (const f of files.filter((f) => /^spare-(\d{16}|zero-\d+)\.wal$/.test(f))) {
      // New zero-filled spares are numbered past the ones there are.
      const zero = /^spare-zero-(\d+)\.wal$/.exec(f);
      if (zero) this.zeroFilled = Math.max(this.zeroFilled, Number(zero[1]));
      await this.keepSpare(join(this.dir, f));
    }
  }

  /**
   * Keeps a checkpointed file to write over, or deletes it when there are
   * enough, or when it is short of `fileBytes` (rolled early): it would grow.
   */
  private async keepSpare(path: string): Promise<void> {
    const bytes = (await stat(path)).size;
    if (this.spares.length < SPARE_FILES && bytes >= this.fileBytes) this.spares.push(path);
    else await rm(path, { force: true });
  }

  /**
   * Hands every entry of the left-over files to `apply`, in order; then
   * `syncAll` (which must fsync every segment `apply` wrote to), then keeps
   * the files as spares (or deletes them) and starts the next one.
   */
  async replay(apply: (entry: WalEntry) => Promise<void>, syncAll: () => Promise<void>): Promise<number> {
    let entries = 0;
    for (const n of this.leftOver) {
      const buf = await readFile(join(this.dir, fileName(n)));
      for (const entry of decodeEntries(buf, n)) {
        await apply(entry);
        entries++;
      }
    }
    if (this.leftOver.length > 0) await syncAll();
    for (const n of this.leftOver) {
      const spare = join(this.dir, spareName(n));
      await rename(join(this.dir, fileName(n)), spare);
      await this.keepSpare(spare);
    }
    // Numbers go on above every file there is: a generation is never reused while a file may hold it.
    const numbered = this.spares.map((p) => /spare-(\d{16})\.wal$/.exec(p)?.[1]).filter((n) => n !== undefined);
    const next = Math.max(this.leftOver.at(-1) ?? 0, ...numbered.map(Number)) + 1;
    this.leftOver = [];
    await this.startFile(next);
    return entries;
  }

  /** Starts file `n`: a spare written over from its start, or a new file. */
  private async startFile(n: number): Promise<void> {
    const path = join(this.dir, fileName(n));
    const spare = this.spares.shift();
    if (spare !== undefined) await rename(spare, path);
    const handle = await open(path, spare !== undefined ? "r+" : "w");
    this.overwriting = spare !== undefined;
    await syncDir(this.dir);
    this.current = { number: n, path, handle, bytes: 0, dirty: new Set() };
  }

  /**
   * Appends entries to the page cache (no fsync; see `sync`); `segments[i]`
   * receives `entries[i]`'s records and is fsynced at the file's checkpoint.
   */
  write(entries: WalWrite[], segments: Syncable[]): void {
    const file = this.current;
    if (!file) throw new Error("write-ahead log is not open");
    const iov: Uint8Array[] = [];
    let bytes = 0;
    entries.forEach((entry, i) => {
      const header = encodeEntryHeader(entry, file.number);
      iov.push(header);
      for (const r of entry.records) iov.push(r);
      bytes += header.length + entry.recordBytes;
      file.dirty.add(segments[i]);
    });
    writeAllSync(file.handle.fd, iov, file.bytes);
    file.bytes += bytes;
    // A log in steady use gets a zero-filled file to roll to, rather than
    // growing a new one (see the module comment).
    if (this.zeroFill && !this.overwriting && this.spares.length === 0 && !this.preparing && file.bytes >= this.fileBytes / 8) {
      this.preparing = this.makeZeroSpare().finally(() => (this.preparing = undefined));
    }
  }

  /** Makes everything written so far durable. */
  async sync(): Promise<void> {
    await this.current!.handle.datasync();
  }

  /** The current file is full, or grows while a spare is ready (see `maybeRoll`). */
  needsRoll(): boolean {
    return this.current !== undefined && (this.current.bytes >= this.fileBytes || (this.zeroFill && !this.overwriting && this.spares.length > 0));
  }

  /** Makes a spare of `fileBytes` zeros, written and fsynced (in the background: thread-pool writes). */
  private async makeZeroSpare(): Promise<void> {
    const path = join(this.dir, `spare-zero-${++this.zeroFilled}.wal`);
    this.zeroFillsThisRun++;
    try {
      const handle = await open(path, "w");
      try {
        const zeros = Buffer.alloc(1 << 20);
        for (let at = 0; at < this.fileBytes; at += zeros.length) await handle.write(zeros, 0, Math.min(zeros.length, this.fileBytes - at), at);
        await handle.datasync();
      } finally {
        await handle.close();
      }
      await this.keepSpare(path);
    } catch (err) {
      this.logger.warn({ err, file: path }, "write-ahead log spare could not be made");
      await rm(path, { force: true });
    }
  }

  /**
   * Rolls to a new file once the current one is full (with no sync of it in
   * flight); its checkpoint runs in the background.
   */
  async maybeRoll(): Promise<void> {
    const file = this.current;
    if (!file || !this.needsRoll()) return;
    const full = file.bytes >= this.fileBytes;
    await this.startFile(file.number + 1);
    this.rolled++;
    this.checkpoints = this.checkpoints.then(() => this.checkpoint(file));
    // A file rolled full is a spare only once its checkpoint ends, after the
    // next roll has taken the last spare: with more spares in circulation
    // (up to SPARE_FILES), every roll finds one.
    if (full && this.zeroFill && this.spares.length === 0 && !this.preparing && this.zeroFillsThisRun < SPARE_FILES) {
      this.preparing = this.makeZeroSpare().finally(() => (this.preparing = undefined));
    }
  }

  /** Fsyncs the segments `file` covers, then keeps it as a spare (or deletes it). */
  private async checkpoint(file: WalFile): Promise<void> {
    try {
      const segments = [...file.dirty];
      await Promise.all(
        Array.from({ length: CHECKPOINT_SYNCS }, async () => {
          for (let segment = segments.shift(); segment; segment = segments.shift()) await segment.sync();
        }),
      );
      await file.handle.close();
      const spare = join(this.dir, spareName(file.number));
      await rename(file.path, spare);
      await this.keepSpare(spare);
    } catch (err) {
      // The file stays: the next start replays it.
      this.logger.error({ err, file: file.path }, "write-ahead log checkpoint failed");
      await file.handle.close().catch(() => undefined);
    } finally {
      this.rolled--;
    }
  }

  /** Files rolled but not yet checkpointed (tests, metrics). */
  get pendingCheckpoints(): number {
    return this.rolled;
  }

  /** Waits for the checkpoints and the zero-filling under way. */
  async checkpointed(): Promise<void> {
    await this.checkpoints;
    await this.preparing;
  }

  /**
   * Closes the log once every segment is closed (and so fsynced): the
   * current file and the spares are no longer needed and are deleted, unless
   * `keep` (a segment's fsync failed: the next start replays the file).
   */
  async close(keep = false): Promise<void> {
    await this.checkpoints;
    await this.preparing;
    for (const spare of this.spares.splice(0)) await rm(spare, { force: true });
    const file = this.current;
    this.current = undefined;
    if (!file) return;
    await file.handle.close();
    if (!keep) await rm(file.path, { force: true });
  }
}
