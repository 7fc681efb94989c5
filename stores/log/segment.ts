/**
 * One channel of one job attempt on disk: an append-only segment file of
 * self-describing records and an index file from seq to record offset.
 *
 * Record (32-byte header, then the data):
 *   u32 magic "TMLG" · u32 data length · u64 seq · i64 capture time (µs since
 *   the epoch) · u32 crc32 of the data · u32 crc32 of the first 24 bytes
 * Index: one u64 (big-endian) per frame, the record's offset in the segment;
 * entry k is seq k+1 (seqs are contiguous from 1).
 *
 * Neither file is fsynced before an acknowledgement: the records go to the
 * server's write-ahead log too (wal.ts), whose fsync makes them durable, and
 * a checkpoint fsyncs the segment later. On open, the index is checked
 * against the segment (an entry pointing at a record that is not there is
 * dropped) and the records past the last indexed one are scanned and indexed;
 * the segment is cut at the first incomplete or corrupt record, which is
 * where a crash mid-write leaves it. Then the write-ahead log replays every
 * record since the last checkpoint, so every acknowledged frame survives.
 */
import { writeSync, writevSync } from "node:fs";
import { crc32 } from "node:zlib";
import { open, readFile, rm, stat, writeFile, type FileHandle } from "node:fs/promises";
import { join } from "node:path";

export const HEADER_BYTES = 32;
/** writev takes at most IOV_MAX (1024 on Linux) buffers. */
const MAX_IOV = 1024;
const MAGIC = 0x544d4c47; // "TMLG"
/** Largest data of one frame (the contract's limit). */
export const MAX_FRAME_BYTES = 65536;

/** A frame as stored and as read back. */
export interface StoredFrame {
  seq: number;
  /** Byte offset of the data within the channel. */
  offset: number;
  captureMicros: number;
  data: Uint8Array;
}

/**
 * A frame's data as it arrived: views of the buffers it came in (a frame
 * often spans two HTTP/2 DATA frames), written out with writev and never
 * joined on the way to the disk.
 */
export type Pieces = readonly Uint8Array[];

/** The data of `pieces` as one buffer (copied only when there are several). */
export function joinPieces(pieces: Pieces): Uint8Array {
  return pieces.length === 1 ? pieces[0] : Buffer.concat(pieces);
}

/** A frame of a batch of records (see Segment.commit): its record is a header, then `data`. */
export interface BatchFrame {
  /** Data bytes. */
  length: number;
  captureMicros: number;
  data: Pieces;
}

/** Why the channel takes no more frames, persisted beside the segment. */
export type SegmentState = { kind: "open" } | { kind: "closed" } | { kind: "truncated"; message: string };

/** Encodes one record (header and data). */
export function encodeRecord(seq: number, captureMicros: number, data: Uint8Array): Buffer {
  const buf = Buffer.allocUnsafe(HEADER_BYTES + data.length);
  encodeHeaderInto(buf, 0, seq, captureMicros, [data], data.length);
  buf.set(data, HEADER_BYTES);
  return buf;
}

/** Encodes the header of a record of `length` data bytes, `data`, at `at` of `buf`. */
export function encodeHeaderInto(buf: Buffer, at: number, seq: number, captureMicros: number, data: Pieces, length: number): void {
  buf.writeUInt32BE(MAGIC, at);
  buf.writeUInt32BE(length, at + 4);
  // Two 32-bit halves: seqs and microseconds stay far below 2^53.
  buf.writeUInt32BE(Math.floor(seq / 0x100000000), at + 8);
  buf.writeUInt32BE(seq % 0x100000000, at + 12);
  const micros = Math.trunc(captureMicros);
  buf.writeInt32BE(Math.floor(micros / 0x100000000), at + 16);
  buf.writeUInt32BE(((micros % 0x100000000) + 0x100000000) % 0x100000000, at + 20);
  let crc = 0;
  for (const piece of data) crc = crc32(piece, crc);
  buf.writeUInt32BE(crc, at + 24);
  buf.writeUInt32BE(crc32(buf.subarray(at, at + 24)), at + 28);
}

/** The header at `at` of `buf`, or undefined when it is not a valid header. */
export function decodeHeader(buf: Buffer, at: number): { length: number; seq: number; captureMicros: number; dataCrc: number } | undefined {
  if (buf.length - at < HEADER_BYTES) return undefined;
  if (buf.readUInt32BE(at) !== MAGIC) return undefined;
  if (crc32(buf.subarray(at, at + 24)) !== buf.readUInt32BE(at + 28)) return undefined;
  const length = buf.readUInt32BE(at + 4);
  if (length > MAX_FRAME_BYTES) return undefined;
  return {
    length,
    seq: Number(buf.readBigUInt64BE(at + 8)),
    captureMicros: Number(buf.readBigInt64BE(at + 16)),
    dataCrc: buf.readUInt32BE(at + 24),
  };
}

/** A frame of the in-memory tail: its data as committed (pieces). */
interface TailFrame extends BatchFrame {
  seq: number;
  /** Byte offset of the data within the channel. */
  offset: number;
  /** Bytes of the buffers `data` views (at least `length`). */
  pinned: number;
}

/** A growable array of record offsets (8 bytes per frame in memory). */
class OffsetIndex {
  private values = new Float64Array(64);
  length = 0;

  push(v: number): void {
    if (this.length === this.values.length) {
      const next = new Float64Array(this.values.length * 2);
      next.set(this.values);
      this.values = next;
    }
    this.values[this.length++] = v;
  }

  get(i: number): number {
    return this.values[i];
  }

  truncate(length: number): void {
    this.length = Math.min(this.length, length);
  }
}

const READ_CHUNK = 1 << 20;
/** Index entries are written out to the index file once this many wait. */
const INDEX_OUT_ENTRIES = 512;
/** Recent frames kept in memory for followers (at least the last one): bytes of data... */
const TAIL_CACHE_BYTES = 64 * 1024;
/** ...and bytes of the buffers they keep alive (a frame's data are views of what it arrived in). */
const TAIL_PINNED_BYTES = 256 * 1024;

/** The files of one channel, opened (and recovered) with `Segment.open`. */
export class Segment {
  readonly dir: string;
  readonly name: string;
  private seg: FileHandle;
  private idx: FileHandle;
  private readonly index = new OffsetIndex();
  /** Bytes of the segment file holding complete records. */
  private segBytes: number;
  state: SegmentState;
  firstCaptureMicros = 0;
  lastCaptureMicros = 0;
  /** Milliseconds since the epoch of the last change (append, close). */
  lastChangeMs: number;
  private closedFiles = false;
  /** The most recent frames, so that followers rarely read the disk. */
  private tail: TailFrame[] = [];
  private tailBytes = 0;
  private tailPinned = 0;
  /** Written since the last fsync. */
  private dirty = false;
  /** Committed records not yet written to the file (from `writtenBytes` on), as writev's buffers. */
  private unwritten: Uint8Array[] = [];
  private writtenBytes: number;
  /** Index entries written to the index file. */
  private indexedOut = 0;

  private constructor(dir: string, name: string, seg: FileHandle, idx: FileHandle, segBytes: number, state: SegmentState, mtimeMs: number) {
    this.dir = dir;
    this.name = name;
    this.seg = seg;
    this.idx = idx;
    this.segBytes = segBytes;
    this.writtenBytes = segBytes;
    this.state = state;
    this.lastChangeMs = mtimeMs;
  }

  static paths(dir: string, name: string) {
    return {
      seg: join(dir, `${name}.seg`),
      idx: join(dir, `${name}.idx`),
      closed: join(dir, `${name}.closed`),
      truncated: join(dir, `${name}.truncated`),
    };
  }

  /**
   * Opens a channel's files, creating them when `create` is set (else throws
   * ENOENT), and recovers from a crash: see the module comment. Returns how
   * many bytes recovery cut from the segment, for the log.
   */
  static async open(dir: string, name: string, create: boolean): Promise<{ segment: Segment; cutBytes: number }> {
    const p = Segment.paths(dir, name);
    if (create) await (await open(p.seg, "a")).close();
    // Positional writes: never O_APPEND (Linux ignores the position there).
    const seg = await open(p.seg, "r+");
    let idx: FileHandle | undefined;
    try {
      await (await open(p.idx, "a")).close();
      idx = await open(p.idx, "r+");
      const st = await seg.stat();
      let state: SegmentState = { kind: "open" };
      const truncated = await readFile(p.truncated, "utf8").catch(() => undefined);
      if (truncated !== undefined) state = { kind: "truncated", message: truncated };
      else if (await exists(p.closed)) state = { kind: "closed" };
      const segment = new Segment(dir, name, seg, idx, 0, state, st.mtimeMs);
      const cutBytes = await segment.recover(st.size);
      return { segment, cutBytes };
    } catch (err) {
      await seg.close().catch(() => undefined);
      await idx?.close().catch(() => undefined);
      throw err;
    }
  }

  private async recover(fileBytes: number): Promise<number> {
    // 1. Trust the index as far as it agrees with the segment.
    const raw = await this.idx.readFile();
    const entries = Math.floor(raw.length / 8);
    const header = Buffer.allocUnsafe(HEADER_BYTES);
    let good = 0;
    for (let i = 0; i < entries; i++) {
      const off = Number(raw.readBigUInt64BE(i * 8));
      if (i === 0 ? off !== 0 : off <= this.index.get(i - 1)) break;
      this.index.push(off);
      good++;
    }
    // Check the last entries against the segment from the end (a lost tail
    // shows there); earlier ones were fsynced before later ones were written.
    while (this.index.length > 0) {
      const off = this.index.get(this.index.length - 1);
      const ok = off + HEADER_BYTES <= fileBytes && (await this.seg.read(header, 0, HEADER_BYTES, off)).bytesRead === HEADER_BYTES;
      const h = ok ? decodeHeader(header, 0) : undefined;
      if (h && h.seq === this.index.length && off + HEADER_BYTES + h.length <= fileBytes) {
        const data = Buffer.allocUnsafe(h.length);
        await this.seg.read(data, 0, h.length, off + HEADER_BYTES);
        if (crc32(data) === h.dataCrc) {
          this.segBytes = off + HEADER_BYTES + h.length;
          this.noteCapture(h.captureMicros, this.index.length === 1);
          break;
        }
      }
      this.index.truncate(this.index.length - 1);
    }
    if (this.index.length === 0) this.segBytes = 0;
    const indexedFrames = this.index.length;
    // 2. Index the complete records past the last indexed one.
    let pos = this.segBytes;
    let buf = Buffer.alloc(0);
    let bufStart = pos;
    while (pos < fileBytes) {
      if (pos + HEADER_BYTES > bufStart + buf.length) {
        const want = Math.min(READ_CHUNK + HEADER_BYTES + MAX_FRAME_BYTES, fileBytes - pos);
        buf = Buffer.allocUnsafe(want);
        const { bytesRead } = await this.seg.read(buf, 0, want, pos);
        buf = buf.subarray(0, bytesRead);
        bufStart = pos;
      }
      const h = decodeHeader(buf, pos - bufStart);
      if (!h || h.seq !== this.index.length + 1) break;
      const end = pos + HEADER_BYTES + h.length;
      if (end > fileBytes) break;
      if (end > bufStart + buf.length) {
        bufStart = -Infinity; // refill from pos
        buf = Buffer.alloc(0);
        const data = Buffer.allocUnsafe(HEADER_BYTES + h.length);
        await this.seg.read(data, 0, data.length, pos);
        if (crc32(data.subarray(HEADER_BYTES)) !== h.dataCrc) break;
      } else if (crc32(buf.subarray(pos - bufStart + HEADER_BYTES, end - bufStart)) !== h.dataCrc) {
        break;
      }
      this.index.push(pos);
      this.noteCapture(h.captureMicros, this.index.length === 1);
      pos = end;
      this.segBytes = end;
    }
    // The last frame's capture time is needed for ListChannels.
    if (this.index.length > 0 && this.lastCaptureMicros === 0) {
      const off = this.index.get(this.index.length - 1);
      await this.seg.read(header, 0, HEADER_BYTES, off);
      this.lastCaptureMicros = decodeHeader(header, 0)?.captureMicros ?? 0;
    }
    if (this.index.length > 0 && this.firstCaptureMicros === 0) {
      await this.seg.read(header, 0, HEADER_BYTES, 0);
      this.firstCaptureMicros = decodeHeader(header, 0)?.captureMicros ?? 0;
    }
    const cut = fileBytes - this.segBytes;
    if (cut > 0) {
      await this.seg.truncate(this.segBytes);
      await this.seg.datasync();
    }
    if (good !== this.index.length || indexedFrames !== this.index.length || raw.length !== this.index.length * 8) {
      await this.rewriteIndex();
    }
    this.writtenBytes = this.segBytes;
    this.indexedOut = this.index.length;
    return cut;
  }

  private async rewriteIndex(): Promise<void> {
    const out = Buffer.allocUnsafe(this.index.length * 8);
    for (let i = 0; i < this.index.length; i++) out.writeBigUInt64BE(BigInt(this.index.get(i)), i * 8);
    await this.idx.truncate(0);
    await this.idx.write(out, 0, out.length, 0);
    await this.idx.datasync();
  }

  private noteCapture(micros: number, first: boolean): void {
    if (first) this.firstCaptureMicros = micros;
    this.lastCaptureMicros = micros;
  }

  /** Frames stored (the highest seq). */
  get frameCount(): number {
    return this.index.length;
  }

  /** Bytes of data stored. */
  get sizeBytes(): number {
    return this.segBytes - this.index.length * HEADER_BYTES;
  }

  /** Bytes on disk (segment and index). */
  get diskBytes(): number {
    return this.segBytes + this.index.length * 8;
  }

  /** Data offset of frame `seq` (1-based); seq = frameCount+1 gives the size. */
  dataOffset(seq: number): number {
    if (seq > this.index.length) return this.sizeBytes;
    return this.index.get(seq - 1) - (seq - 1) * HEADER_BYTES;
  }

  /** The seq of the frame holding data offset `offset` (< sizeBytes). */
  seqAtOffset(offset: number): number {
    let lo = 1;
    let hi = this.index.length;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.dataOffset(mid) <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /**
   * Appends the records of frames `frameCount+1...` (already durable in the
   * write-ahead log): `records` are their bytes back to back (`recordBytes`
   * in all; for each frame a header from encodeHeaderInto, then its data),
   * `frames` describe them. Readers see them at once; `flush` writes them to
   * the file (reads, checkpoints and closes write what is left first).
   */
  commit(records: readonly Uint8Array[], recordBytes: number, frames: readonly BatchFrame[]): void {
    let offset = this.segBytes;
    for (const f of frames) {
      const seq = this.index.length + 1;
      let pinned = 0;
      for (const piece of f.data) pinned += piece.buffer.byteLength;
      this.tail.push({ seq, offset: offset - (seq - 1) * HEADER_BYTES, captureMicros: f.captureMicros, data: f.data, length: f.length, pinned });
      this.tailBytes += f.length;
      this.tailPinned += pinned;
      this.index.push(offset);
      this.noteCapture(f.captureMicros, this.index.length === 1);
      offset += HEADER_BYTES + f.length;
    }
    while (this.tail.length > 1 && (this.tailBytes > TAIL_CACHE_BYTES || this.tailPinned > TAIL_PINNED_BYTES)) {
      const old = this.tail.shift()!;
      this.tailBytes -= old.length;
      this.tailPinned -= old.pinned;
    }
    for (const r of records) this.unwritten.push(r);
    this.segBytes += recordBytes;
    this.lastChangeMs = Date.now();
  }

  /** Writes what `commit` took to the file (see `writeOut`), the index entries once enough wait. */
  flush(): void {
    this.writeRecords();
    if (this.index.length - this.indexedOut >= INDEX_OUT_ENTRIES) this.writeIndex();
  }

  /**
   * Writes what was committed and not written yet to the files' page cache
   * (on this thread: one writev per channel per commit round, right after
   * the round's acknowledgements went out). No fsync: the write-ahead log
   * holds the records until its checkpoint.
   */
  writeOut(): void {
    this.writeRecords();
    this.writeIndex();
  }

  /** Writes the committed records (kept for a later try when the write fails). */
  private writeRecords(): void {
    if (this.closedFiles || this.unwritten.length === 0) return;
    writeAllSync(this.seg.fd, this.unwritten, this.writtenBytes);
    this.unwritten = [];
    this.writtenBytes = this.segBytes;
    this.dirty = true;
  }

  private writeIndex(): void {
    if (this.closedFiles || this.indexedOut >= this.index.length) return;
    const idx = Buffer.allocUnsafe((this.index.length - this.indexedOut) * 8);
    for (let i = this.indexedOut; i < this.index.length; i++) {
      const off = this.index.get(i);
      idx.writeUInt32BE(Math.floor(off / 0x100000000), (i - this.indexedOut) * 8);
      idx.writeUInt32BE(off % 0x100000000, (i - this.indexedOut) * 8 + 4);
    }
    // Not fsynced: recovery rebuilds a lost index tail from the segment.
    writeFullySync(this.idx.fd, idx, this.indexedOut * 8);
    this.indexedOut = this.index.length;
  }

  /**
   * Replays records from the write-ahead log (see wal.ts): a record the
   * segment has is written again at its place (the same bytes, unless the
   * crash lost them), the next one is appended; returns how many were
   * appended. Stops at a record that does not fit (logged by the caller).
   */
  replay(records: Buffer): { appended: number; rewritten: number; misfit?: string } {
    let appended = 0;
    let rewritten = 0;
    for (let at = 0; at < records.length; ) {
      const h = decodeHeader(records, at);
      const end = at + HEADER_BYTES + (h?.length ?? 0);
      if (!h || end > records.length || crc32(records.subarray(at + HEADER_BYTES, end)) !== h.dataCrc) {
        return { appended, rewritten, misfit: `corrupt record at byte ${at}` };
      }
      const record = records.subarray(at, end);
      if (h.seq <= this.index.length) {
        const offset = this.index.get(h.seq - 1);
        if (this.recordEnd(h.seq) - offset !== record.length) {
          return { appended, rewritten, misfit: `record ${h.seq} differs in length from the segment's` };
        }
        this.writeOut();
        writeFullySync(this.seg.fd, record, offset);
        this.dirty = true;
        rewritten++;
      } else if (h.seq === this.index.length + 1) {
        const copy = Buffer.from(record);
        this.commit([copy], copy.length, [{ length: h.length, captureMicros: h.captureMicros, data: [copy.subarray(HEADER_BYTES)] }]);
        appended++;
      } else {
        return { appended, rewritten, misfit: `record ${h.seq} follows ${this.index.length}` };
      }
      at = end;
    }
    return { appended, rewritten };
  }

  /** Writes out and fsyncs what was committed (a checkpoint of the write-ahead log). */
  async sync(): Promise<void> {
    if (this.closedFiles) return;
    this.writeOut();
    if (!this.dirty) return;
    this.dirty = false;
    try {
      await this.seg.datasync();
    } catch (err) {
      this.dirty = true;
      // Closed meanwhile: close() fsynced it.
      if (!this.closedFiles) throw err;
    }
  }

  /**
   * Reads frames from `seq` (1-based) up to `maxSeq`, at most about
   * `maxBytes` of data (at least one frame).
   */
  async read(seq: number, maxSeq: number, maxBytes: number): Promise<StoredFrame[]> {
    const last = Math.min(maxSeq, this.index.length);
    if (seq > last) return [];
    if (this.tail.length > 0 && seq >= this.tail[0].seq) {
      const out: StoredFrame[] = [];
      let bytes = 0;
      for (let i = seq - this.tail[0].seq; i < this.tail.length && this.tail[i].seq <= last; i++) {
        const t = this.tail[i];
        if (out.length > 0 && bytes + t.length > maxBytes) break;
        out.push({ seq: t.seq, offset: t.offset, captureMicros: t.captureMicros, data: joinPieces(t.data) });
        bytes += t.length;
      }
      return out;
    }
    const start = this.index.get(seq - 1);
    if (this.recordEnd(last) > this.writtenBytes) this.writeOut();
    let end = seq;
    let endOff = this.recordEnd(seq);
    while (end < last && this.recordEnd(end + 1) - start <= maxBytes + HEADER_BYTES * (end + 1 - seq)) {
      end++;
      endOff = this.recordEnd(end);
    }
    const buf = Buffer.allocUnsafe(endOff - start);
    const { bytesRead } = await this.seg.read(buf, 0, buf.length, start);
    if (bytesRead !== buf.length) throw new Error(`segment ${this.name} is shorter than its index`);
    const frames: StoredFrame[] = [];
    let pos = 0;
    for (let s = seq; s <= end; s++) {
      const h = decodeHeader(buf, pos);
      if (!h || h.seq !== s) throw new Error(`segment ${this.name} has a bad record at seq ${s}`);
      frames.push({
        seq: s,
        offset: this.dataOffset(s),
        captureMicros: h.captureMicros,
        data: buf.subarray(pos + HEADER_BYTES, pos + HEADER_BYTES + h.length),
      });
      pos += HEADER_BYTES + h.length;
    }
    return frames;
  }

  private recordEnd(seq: number): number {
    return seq < this.index.length ? this.index.get(seq) : this.segBytes;
  }

  /** Forgets the in-memory tail (a closed channel has no followers to serve quickly). */
  dropTail(): void {
    this.tail = [];
    this.tailBytes = 0;
    this.tailPinned = 0;
  }

  /** Persists the closed or truncated state (fsynced, with its directory). */
  async setState(state: SegmentState): Promise<void> {
    const p = Segment.paths(this.dir, this.name);
    if (state.kind === "truncated") await writeDurably(p.truncated, state.message);
    else if (state.kind === "closed") await writeDurably(p.closed, "");
    await syncDir(this.dir);
    this.state = state;
    this.lastChangeMs = Date.now();
  }

  /**
   * Closes the files, fsyncing them first unless `sync` is false (deletion);
   * idempotent. Throws when the fsync fails (the files are closed anyway).
   */
  async close(sync = true): Promise<void> {
    if (this.closedFiles) return;
    try {
      this.writeOut();
      this.closedFiles = true;
      if (sync) {
        await this.idx.datasync().catch(() => undefined);
        await this.seg.datasync();
      }
    } finally {
      this.closedFiles = true;
      await Promise.all([this.seg.close(), this.idx.close()]);
    }
  }
}

function writeFullySync(fd: number, buf: Buffer, position: number): void {
  let done = 0;
  while (done < buf.length) done += writeSync(fd, buf, done, buf.length - done, position + done);
}

/** Writes `buffers` back to back at `position` (writev, retrying short writes). */
export function writeAllSync(fd: number, buffers: readonly Uint8Array[], position: number): void {
  for (let i = 0; i < buffers.length; i += MAX_IOV) {
    let iov = buffers.slice(i, i + MAX_IOV);
    let left = iov.reduce((n, b) => n + b.length, 0);
    while (left > 0) {
      const n = writevSync(fd, iov, position);
      position += n;
      left -= n;
      iov = skipBytes(iov, n);
    }
  }
}

/** `buffers` without their first `skip` bytes. */
function skipBytes(buffers: readonly Uint8Array[], skip: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const b of buffers) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    out.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return out;
}

async function writeDurably(path: string, text: string): Promise<void> {
  await writeFile(path, text);
  const f = await open(path, "r+");
  try {
    await f.datasync();
  } finally {
    await f.close();
  }
}

/** fsyncs a directory, so that files created in it survive a crash. */
export async function syncDir(dir: string): Promise<void> {
  const d = await open(dir, "r");
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Removes a channel's files (used by deletion). */
export async function removeSegmentFiles(dir: string, name: string): Promise<void> {
  const p = Segment.paths(dir, name);
  await Promise.all([p.seg, p.idx, p.closed, p.truncated].map((f) => rm(f, { force: true })));
}
