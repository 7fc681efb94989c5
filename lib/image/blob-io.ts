/**
 * Blob bytes on local disk, for every side that reads or writes them (the
 * store's uploads, the cache's fetches, a client's downloads and uploads):
 * the chunk size of a blob message, writing a message's pieces with writev
 * behind the reader (BackgroundWriter), and reading a file as a blob source
 * from an offset, at a limited rate if asked.
 */
import { createReadStream } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import { sleep } from "../retry.js";

/** Bytes per PutBlob/GetBlob message: FACTS.md, 256 KiB-1 MiB is best. */
export const BLOB_CHUNK_BYTES = 1024 * 1024;

/** Most iovecs one writev takes (Linux's IOV_MAX is 1024). */
const MAX_IOVECS = 1024;

/** Writes every piece at `position` on, in order (writev; a short write goes on with the rest). */
async function writePieces(file: FileHandle, pieces: readonly Uint8Array[], position: number): Promise<void> {
  let rest = pieces.filter((p) => p.length > 0);
  while (rest.length > 0) {
    const { bytesWritten } = await file.writev(rest.slice(0, MAX_IOVECS), position);
    if (bytesWritten === 0) throw new Error("a write made no progress");
    position += bytesWritten;
    let skip = bytesWritten;
    let used = 0;
    while (used < rest.length && skip >= rest[used].length) skip -= rest[used++].length;
    rest = rest.slice(used);
    if (skip > 0) rest[0] = rest[0].subarray(skip);
  }
}

/**
 * Appends to a file from `position` on without making its caller wait for
 * each write: what `write()` is given joins a backlog that one writev at a
 * time takes whole, so the disk writes while the next bytes arrive and a
 * slow write (a busy machine, a full page cache) costs no round trip per
 * message. Bytes land in order, so the file is always a prefix of the
 * stream. `write()` waits only while `maxBacklogBytes` are not yet written;
 * the first failure rejects every later `write()` and `settle()`.
 */
export class BackgroundWriter {
  #backlog: Uint8Array[] = [];
  #backlogBytes = 0;
  /** Bytes being written by the writev in flight. */
  #writingBytes = 0;
  #written: number;
  #running: Promise<void> | undefined;
  #failure: { error: unknown } | undefined;
  #waiters: (() => void)[] = [];

  constructor(
    private readonly file: FileHandle,
    position: number,
    private readonly options: { maxBacklogBytes?: number; onWritten?: (written: number) => void } = {},
  ) {
    this.#written = position;
  }

  /** The end of what is on the file (in order): the committed prefix. */
  get written(): number {
    return this.#written;
  }

  /** Queues `pieces` after everything queued before; they must not change until written. */
  async write(pieces: readonly Uint8Array[]): Promise<void> {
    const max = this.options.maxBacklogBytes ?? 8 * 1024 * 1024;
    while (!this.#failure && this.#backlogBytes + this.#writingBytes >= max) {
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
    if (this.#failure) throw this.#failure.error;
    for (const p of pieces) {
      if (p.length === 0) continue;
      this.#backlog.push(p);
      this.#backlogBytes += p.length;
    }
    this.#running ??= this.#run();
  }

  /** Resolves once everything queued is written; rejects with the first failure. */
  async settle(): Promise<void> {
    await this.#running;
    if (this.#failure) throw this.#failure.error;
  }

  async #run(): Promise<void> {
    try {
      while (this.#backlog.length > 0 && !this.#failure) {
        const batch = this.#backlog;
        const bytes = this.#backlogBytes;
        this.#backlog = [];
        this.#backlogBytes = 0;
        this.#writingBytes = bytes;
        try {
          await writePieces(this.file, batch, this.#written);
          this.#written += bytes;
          this.options.onWritten?.(this.#written);
        } catch (error) {
          this.#failure = { error };
          this.#backlog = [];
          this.#backlogBytes = 0;
        } finally {
          this.#writingBytes = 0;
          for (const wake of this.#waiters.splice(0)) wake();
        }
      }
    } finally {
      this.#running = undefined;
    }
  }
}

/** Where an upload reads its bytes: `read(offset)` yields the blob from `offset` on. */
export type BlobSource = (offset: number) => AsyncIterable<Uint8Array>;

/** A BlobSource reading a file in chunks of `chunkBytes`. */
export function fileSource(path: string, chunkBytes = BLOB_CHUNK_BYTES): BlobSource {
  return (offset) => createReadStream(path, { start: offset, highWaterMark: chunkBytes }) as AsyncIterable<Buffer>;
}

/** A source that sends at most `bytesPerSecond` (for slow links, and to leave bandwidth to others). */
export function limitedSource(source: BlobSource, bytesPerSecond: number): BlobSource {
  const slice = Math.max(4096, Math.floor(bytesPerSecond / 20));
  return async function* (offset) {
    const started = Date.now();
    let sent = 0;
    for await (const chunk of source(offset)) {
      for (let i = 0; i < chunk.length; i += slice) {
        const piece = chunk.subarray(i, i + slice);
        const due = started + (sent * 1000) / bytesPerSecond;
        if (due > Date.now()) await sleep(due - Date.now());
        sent += piece.length;
        yield piece;
      }
    }
  };
}
