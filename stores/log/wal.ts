/**
 * The log server's write-ahead log: one file that every channel's frames are
 * appended to, so that one fdatasync makes a whole batch of many jobs durable
 * (group commit, see log-store.ts). The segment files get the same records at
 * the same time, without an fsync of their own; a checkpoint fsyncs them.
 *
 * Files: `<dataDir>/wal/<n>.wal`, numbered upwards. The current file rolls at
 * `fileBytes`; the rolled file is deleted once every segment that received
 * records while it was current has been fsynced (the checkpoint). So every
 * segment byte that may not be on disk is in a WAL file that still exists.
 *
 * Entry (one channel's part of one batch):
 *   u32 magic "TMLW" · u32 meta length · u32 records length · u32 crc32 of
 *   the 12 bytes before it and the meta · meta: u32 attempt, u8 job id
 *   length, job id, u8 channel length, channel · records: segment records
 *   (segment.ts), each checked by its own CRCs.
 *
 * On start, the files left over are replayed into the segments (a crash, or
 * a checkpoint that failed): every record is written again where it belongs,
 * which also repairs a segment whose unsynced pages reached the disk out of
 * order; a file's torn tail (never acknowledged) ends its replay.
 */
import { mkdir, open, readdir, readFile, rm, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import type { Logger } from "../../lib/logger.js";
import { syncDir, writeAllSync } from "./segment.js";

const MAGIC = 0x544d4c57; // "TMLW"
const ENTRY_HEADER_BYTES = 16;

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

/** The entry header and meta of `entry`. */
function encodeEntryHeader(entry: WalWrite): Buffer {
  const job = Buffer.from(entry.jobId);
  const channel = Buffer.from(entry.channel);
  const metaBytes = 4 + 1 + job.length + 1 + channel.length;
  const buf = Buffer.allocUnsafe(ENTRY_HEADER_BYTES + metaBytes);
  buf.writeUInt32BE(MAGIC, 0);
  buf.writeUInt32BE(metaBytes, 4);
  buf.writeUInt32BE(entry.recordBytes, 8);
  let at = ENTRY_HEADER_BYTES;
  buf.writeUInt32BE(entry.attempt, at);
  buf.writeUInt8(job.length, at + 4);
  job.copy(buf, at + 5);
  at += 5 + job.length;
  buf.writeUInt8(channel.length, at);
  channel.copy(buf, at + 1);
  const check = Buffer.concat([buf.subarray(0, 12), buf.subarray(ENTRY_HEADER_BYTES)]);
  buf.writeUInt32BE(crc32(check), 12);
  return buf;
}

/** The entries of a WAL file's contents, up to the first torn or corrupt one. */
export function* decodeEntries(buf: Buffer): Generator<WalEntry> {
  let at = 0;
  while (buf.length - at >= ENTRY_HEADER_BYTES) {
    if (buf.readUInt32BE(at) !== MAGIC) return;
    const metaBytes = buf.readUInt32BE(at + 4);
    const recordsBytes = buf.readUInt32BE(at + 8);
    const metaStart = at + ENTRY_HEADER_BYTES;
    const end = metaStart + metaBytes + recordsBytes;
    if (metaBytes < 6 || metaBytes > 4 + 1 + 255 + 1 + 255 || end > buf.length) return;
    const check = Buffer.concat([buf.subarray(at, at + 12), buf.subarray(metaStart, metaStart + metaBytes)]);
    if (crc32(check) !== buf.readUInt32BE(at + 12)) return;
    const attempt = buf.readUInt32BE(metaStart);
    const jobBytes = buf.readUInt8(metaStart + 4);
    const jobId = buf.toString("utf8", metaStart + 5, metaStart + 5 + jobBytes);
    const channelAt = metaStart + 5 + jobBytes;
    const channel = buf.toString("utf8", channelAt + 1, channelAt + 1 + buf.readUInt8(channelAt));
    yield { jobId, attempt, channel, records: buf.subarray(metaStart + metaBytes, end) };
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
  /** Rolled files whose checkpoint has not deleted them yet. */
  private rolled = 0;

  constructor(options: { dir: string; fileBytes: number; logger: Logger }) {
    this.dir = options.dir;
    this.fileBytes = options.fileBytes;
    this.logger = options.logger;
  }

  /** Finds the files left by an earlier run (see `replay`). */
  async open(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    this.leftOver = (await readdir(this.dir))
      .filter((f) => /^\d{16}\.wal$/.test(f))
      .map((f) => Number(f.slice(0, 16)))
      .sort((a, b) => a - b);
  }

  /**
   * Hands every entry of the left-over files to `apply`, in order; then
   * `syncAll` (which must fsync every segment `apply` wrote to), then deletes
   * the files and starts a new one.
   */
  async replay(apply: (entry: WalEntry) => Promise<void>, syncAll: () => Promise<void>): Promise<number> {
    let entries = 0;
    for (const n of this.leftOver) {
      const buf = await readFile(join(this.dir, fileName(n)));
      for (const entry of decodeEntries(buf)) {
        await apply(entry);
        entries++;
      }
    }
    if (this.leftOver.length > 0) await syncAll();
    for (const n of this.leftOver) await rm(join(this.dir, fileName(n)), { force: true });
    const next = (this.leftOver.at(-1) ?? 0) + 1;
    this.leftOver = [];
    await this.startFile(next);
    return entries;
  }

  private async startFile(n: number): Promise<void> {
    const path = join(this.dir, fileName(n));
    const handle = await open(path, "w");
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
      const header = encodeEntryHeader(entry);
      iov.push(header);
      for (const r of entry.records) iov.push(r);
      bytes += header.length + entry.recordBytes;
      file.dirty.add(segments[i]);
    });
    writeAllSync(file.handle.fd, iov, file.bytes);
    file.bytes += bytes;
  }

  /** Makes everything written so far durable. */
  async sync(): Promise<void> {
    await this.current!.handle.datasync();
  }

  /** The current file is full (see `maybeRoll`). */
  needsRoll(): boolean {
    return this.current !== undefined && this.current.bytes >= this.fileBytes;
  }

  /**
   * Rolls to a new file once the current one is full (with no sync of it in
   * flight); its checkpoint runs in the background.
   */
  async maybeRoll(): Promise<void> {
    const file = this.current;
    if (!file || !this.needsRoll()) return;
    await this.startFile(file.number + 1);
    this.rolled++;
    this.checkpoints = this.checkpoints.then(() => this.checkpoint(file));
  }

  /** Fsyncs the segments `file` covers, then deletes it. */
  private async checkpoint(file: WalFile): Promise<void> {
    try {
      for (const segment of file.dirty) await segment.sync();
      await file.handle.close();
      await rm(file.path, { force: true });
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

  /** Waits for the checkpoints under way. */
  async checkpointed(): Promise<void> {
    await this.checkpoints;
  }

  /**
   * Closes the log once every segment is closed (and so fsynced): the
   * current file is no longer needed and is deleted, unless `keep` (a
   * segment's fsync failed: the next start replays it).
   */
  async close(keep = false): Promise<void> {
    await this.checkpoints;
    const file = this.current;
    this.current = undefined;
    if (!file) return;
    await file.handle.close();
    if (!keep) await rm(file.path, { force: true });
  }
}
