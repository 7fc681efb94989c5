/**
 * The writer's spill of one channel: every closed frame is written here before
 * any log server sees it, and stays until every server acknowledged it. Files
 * roll at `segmentBytes`; a file is deleted once all its frames are dropped.
 * A bounded number of recent frames is also kept in memory, so a healthy
 * pipeline rarely reads the files back; a server that was down reads its
 * backlog from them.
 *
 * The spill is not fsynced: it bounds the writer's memory and carries frames
 * across log-server outages; it does not survive a crash of the writer itself.
 */
import { readSync, writeSync } from "node:fs";
import { open, rm, type FileHandle } from "node:fs/promises";
import { join } from "node:path";

export interface SpilledFrame {
  seq: number;
  captureMicros: number;
  data: Uint8Array;
}

interface SpillFile {
  path: string;
  handle: FileHandle;
  bytes: number;
  /** Highest seq in the file. */
  lastSeq: number;
}

interface Location {
  file: SpillFile;
  offset: number;
  length: number;
  captureMicros: number;
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

export class Spill {
  private readonly files: SpillFile[] = [];
  /** Locations of frames firstSeq... (a queue: dropped ones leave the front). */
  private locations: Location[] = [];
  private head = 0;
  /** Seq of locations[head]. */
  private firstSeq = 1;
  private nextFile = 0;
  private chain: Promise<unknown>;
  /** Highest seq written to the spill. */
  lastSeq = 0;
  private closed = false;

  private readonly dir: string;
  private readonly prefix: string;
  private readonly segmentBytes: number;
  private readonly cache: FrameCache;

  /** `ready` resolves once `dir` exists. */
  constructor(options: { dir: string; ready: Promise<void>; prefix: string; fileBytes: number; cache: FrameCache }) {
    this.dir = options.dir;
    this.prefix = options.prefix;
    this.segmentBytes = options.fileBytes;
    this.cache = options.cache;
    this.chain = options.ready;
  }

  /** Appends the next frame (seq lastSeq+1); resolves once it is in the spill. */
  append(captureMicros: number, data: Uint8Array): Promise<number> {
    const run = this.chain.then(async () => {
      if (this.closed) throw new Error("spill closed");
      let file = this.files[this.files.length - 1];
      if (!file || file.bytes >= this.segmentBytes) file = await this.newFile();
      const offset = file.bytes;
      // A write to the page cache takes microseconds: done on this thread,
      // not queued on the thread pool behind slow file-system calls.
      let done = 0;
      while (done < data.length) done += writeSync(file.handle.fd, data, done, data.length - done, offset + done);
      file.bytes += data.length;
      const seq = ++this.lastSeq;
      file.lastSeq = seq;
      this.locations.push({ file, offset, length: data.length, captureMicros });
      this.cache.put(this.key(seq), data);
      return seq;
    });
    this.chain = run.catch(() => undefined);
    return run;
  }

  private key(seq: number): string {
    return `${this.prefix}/${seq}`;
  }

  private async newFile(): Promise<SpillFile> {
    const path = join(this.dir, `${this.prefix}.${this.nextFile++}.spill`);
    const handle = await open(path, "w+");
    const file: SpillFile = { path, handle, bytes: 0, lastSeq: 0 };
    this.files.push(file);
    return file;
  }

  /** The frame `seq`, which must be spilled and not dropped. */
  async get(seq: number): Promise<SpilledFrame> {
    const loc = this.locations[this.head + seq - this.firstSeq];
    if (seq < this.firstSeq || !loc) throw new Error(`frame ${seq} is not in the spill`);
    const cached = this.cache.get(this.key(seq));
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

  /** Forgets frames up to `seq` (every server has them); deletes files left empty. */
  async dropThrough(seq: number): Promise<void> {
    seq = Math.min(seq, this.lastSeq);
    while (this.firstSeq <= seq) {
      this.cache.delete(this.key(this.firstSeq));
      this.head++;
      this.firstSeq++;
    }
    if (this.head > 1024 && this.head * 2 > this.locations.length) {
      this.locations = this.locations.slice(this.head);
      this.head = 0;
    }
    // Every file whose frames are all dropped goes, except the one being written.
    while (this.files.length > 1 && this.files[0].lastSeq < this.firstSeq) {
      const file = this.files.shift()!;
      await file.handle.close();
      await rm(file.path, { force: true });
    }
  }

  /** Closes and deletes every file. */
  async destroy(): Promise<void> {
    this.closed = true;
    await this.chain;
    for (const file of this.files.splice(0)) {
      await file.handle.close().catch(() => undefined);
      await rm(file.path, { force: true });
    }
  }
}
