/**
 * The log server's storage: jobs, attempts and channels on disk, the group
 * commit that makes frames durable before they are acknowledged, and the
 * in-process notifications that wake followers and Append streams.
 *
 * Layout: `<dataDir>/jobs/<job>/<attempt>/<channel>.{seg,idx,closed,truncated}`
 * (see segment.ts). A job is loaded (its segments opened and recovered) the
 * first time an RPC touches it, and stays loaded until deleted.
 *
 * Group commit (GroupCommit): accepted frames wait in their channel's pending
 * list; one round at a time writes everything pending, of every channel, to
 * the write-ahead log (wal.ts) and the segments, makes it durable with one
 * fdatasync of the log and acknowledges it. Frames arriving during a round
 * form the next one, so the server syncs once per round rather than once per
 * channel or frame.
 */
import { mkdir, readdir, rm, stat, statfs } from "node:fs/promises";
import { setMaxListeners } from "node:events";
import { join } from "node:path";
import { Notifier } from "../../lib/async/notifier.js";
import type { Logger } from "../../lib/logger.js";
import {
  HEADER_BYTES,
  MAX_FRAME_BYTES,
  Segment,
  encodeHeaderInto,
  syncDir,
  type BatchFrame,
  type Pieces,
  type SegmentState,
  type StoredFrame,
} from "./segment.js";
import { WriteAheadLog } from "./wal.js";

export const CHANNEL_NAME = /^[a-z][a-z0-9_-]{0,31}$/;
export const JOB_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;
/** Accepted but unflushed bytes per channel above which a writer's stream waits. */
const PENDING_HIGH_WATER = 8 << 20;
/**
 * Group-commit rounds written whose fdatasync may still be running. Three:
 * the first frames of a writer's refill often make a small round of their
 * own (they start one while none is in flight), and with two slots the bulk
 * of the refill then waited behind it.
 */
const MAX_ROUNDS_IN_FLIGHT = 3;
/**
 * A round takes channels until it holds this many bytes; the rest form the
 * next one. Without a cap, many writers' windows pile up into rounds of tens
 * of MB whose write and fdatasync take so long that the disk idles between
 * them.
 */
const ROUND_MAX_BYTES = 4 << 20;
/**
 * With a round in flight, the next one starts only once it has this much
 * (or when the one in flight ends): an fdatasync costs about the same for a
 * frame as for a window of them, and a writer's refill arrives a TCP read at
 * a time.
 */
const OVERLAP_MIN_BYTES = 256 << 10;
/** Accepted bytes waiting for a round (all channels) above which every writer's stream waits (memory). */
const GLOBAL_PENDING_HIGH_WATER = 32 << 20;

/** Whoever receives the acknowledgements of a job attempt (its Append stream). */
export interface AckSink {
  ack(channel: string, seq: number): void;
  /** Ends the stream with this error (superseded, deleted, disk failure). */
  abort(err: Error): void;
}

/** The outcome of offering a frame to a channel. */
export type Offer =
  | { kind: "accepted" }
  | { kind: "duplicate"; durable: boolean }
  | { kind: "gap"; expected: number }
  | { kind: "rejected"; code: "closed" | "size_cap"; message: string };

/** A channel's frames taken for one commit round, as segment records (writev's buffers: a header, then the data's pieces, per frame). */
interface Batch {
  channel: Channel;
  records: Uint8Array[];
  recordBytes: number;
  /** The records' headers, back to back (views of it are in `records`). */
  headers: Buffer;
  frames: BatchFrame[];
}

export class Channel {
  readonly job: Job;
  readonly attempt: number;
  readonly name: string;
  readonly segment: Segment;
  /** Highest seq accepted (durable or pending). */
  writtenSeq: number;
  private pending: BatchFrame[] = [];
  private pendingBytes = 0;
  readonly changed = new Notifier();

  constructor(job: Job, attempt: number, name: string, segment: Segment) {
    this.job = job;
    this.attempt = attempt;
    this.name = name;
    this.segment = segment;
    this.writtenSeq = segment.frameCount;
  }

  get durableSeq(): number {
    return this.segment.frameCount;
  }

  get state(): SegmentState {
    return this.segment.state;
  }

  /** Nothing accepted is waiting to become durable. */
  get settled(): boolean {
    return this.writtenSeq === this.durableSeq;
  }

  private get commits(): GroupCommit {
    return this.job.store.commits;
  }

  /**
   * Offers a frame (already validated for name and size): its data as one
   * buffer, or as the pieces it arrived in (kept as they are, not copied).
   */
  offer(seq: number, captureMicros: number, data: Uint8Array | Pieces): Offer {
    const pieces: Pieces = data instanceof Uint8Array ? [data] : data;
    let length = 0;
    for (const p of pieces) length += p.length;
    if (seq <= this.writtenSeq) return { kind: "duplicate", durable: seq <= this.durableSeq };
    if (this.job.truncatedMessage !== undefined && this.state.kind !== "closed") {
      void this.job.truncate(this.job.truncatedMessage);
      return { kind: "rejected", code: "size_cap", message: this.job.truncatedMessage };
    }
    if (this.state.kind === "closed") return { kind: "rejected", code: "closed", message: `channel ${this.name} is closed` };
    if (this.state.kind === "truncated") return { kind: "rejected", code: "size_cap", message: this.state.message };
    if (seq !== this.writtenSeq + 1) return { kind: "gap", expected: this.writtenSeq + 1 };
    const cap = this.job.store.options.jobSizeCapBytes;
    if (cap > 0 && this.job.sizeBytes + length > cap) {
      const message = `job log reached its size cap of ${cap} bytes; later output was not stored`;
      void this.job.truncate(message);
      return { kind: "rejected", code: "size_cap", message };
    }
    this.pending.push({ captureMicros, data: pieces, length });
    this.pendingBytes += length;
    this.writtenSeq = seq;
    this.job.sizeBytes += length;
    this.commits.add(this, length);
    return { kind: "accepted" };
  }

  /** Data bytes accepted and not taken by a commit round yet. */
  get pendingDataBytes(): number {
    return this.pendingBytes;
  }

  /** When too much is pending, resolves once a commit round took it (backpressure). */
  async backpressure(): Promise<void> {
    while ((this.pendingBytes > PENDING_HIGH_WATER || this.commits.full) && !this.job.deleted) await this.commits.nextRound();
  }

  /** Takes what is pending as the segment's next records (for GroupCommit). */
  takeBatch(): Batch | undefined {
    if (this.pending.length === 0 || this.job.deleted) return undefined;
    const frames = this.pending;
    const headers = Buffer.allocUnsafe(frames.length * HEADER_BYTES);
    const records: Uint8Array[] = [];
    let seq = this.writtenSeq - frames.length + 1;
    frames.forEach((f, i) => {
      const at = i * HEADER_BYTES;
      encodeHeaderInto(headers, at, seq++, f.captureMicros, f.data, f.length);
      records.push(headers.subarray(at, at + HEADER_BYTES), ...f.data);
    });
    const recordBytes = this.pendingBytes + frames.length * HEADER_BYTES;
    this.pending = [];
    this.pendingBytes = 0;
    return { channel: this, records, recordBytes, headers, frames };
  }

  /** The batch is durable: readers see it, the writer gets its ack (the segment file gets it next: `writeCommitted`). */
  committed(batch: Batch): void {
    this.segment.commit(batch.records, batch.recordBytes, batch.frames);
    this.job.sessions.get(this.attempt)?.ack(this.name, this.durableSeq);
    this.changed.notify();
  }

  /** Writes committed records to the segment file. */
  writeCommitted(): void {
    try {
      this.segment.flush();
    } catch (err) {
      // Only the write to the segment file failed (the segment keeps the
      // records to write again): the frames are durable in the write-ahead
      // log, which keeps its file (its checkpoint fails too) until a restart
      // replays it.
      this.job.store.logger.error({ err, jobId: this.job.id, attempt: this.attempt, channel: this.name }, "log segment write failed");
    }
  }

  /**
   * The batch could not be made durable: it is forgotten with what came after
   * it, so that the writer's resend starts from the durable seq again.
   */
  failed(batch: Batch, err: unknown): void {
    const lost = batch.recordBytes - batch.frames.length * HEADER_BYTES + this.pendingBytes;
    this.job.sizeBytes -= lost;
    if (this.commits.dirtyHas(this)) this.commits.dropped(this.pendingBytes);
    this.pending = [];
    this.pendingBytes = 0;
    this.writtenSeq = this.durableSeq;
    this.job.store.logger.error({ err, jobId: this.job.id, attempt: this.attempt, channel: this.name }, "log append failed");
    this.job.sessions.get(this.attempt)?.abort(new Error("append failed"));
    this.changed.notify();
  }

  /** Resolves once everything accepted so far is durable (or failed). */
  async settle(): Promise<void> {
    while (!this.settled && !this.job.deleted) await this.commits.nextRound();
  }

  /** Closes the channel once what it accepted is durable. Idempotent. */
  async close(): Promise<void> {
    await this.settle();
    if (this.state.kind === "open" && !this.job.deleted) await this.segment.setState({ kind: "closed" });
    // Nothing more comes: the files get everything now, memory is freed.
    if (!this.job.deleted) this.segment.writeOut();
    this.segment.dropTail();
    this.changed.notify();
  }

  /** Waits for a commit round that holds this channel's frames, even of a deleted job. */
  async drain(): Promise<void> {
    while (this.commits.holds(this)) await this.commits.nextRound();
  }

  async truncate(message: string): Promise<void> {
    await this.settle();
    if (this.state.kind !== "open" || this.job.deleted) return;
    // Readers see the end only once what was accepted before is durable.
    await this.segment.setState({ kind: "truncated", message });
    this.changed.notify();
  }

  /** Data offset of frame `seq`; past the end: the channel's size. */
  dataOffset(seq: number): number {
    return this.segment.dataOffset(seq);
  }

  read(seq: number, maxBytes: number): Promise<StoredFrame[]> {
    return this.segment.read(seq, this.durableSeq, maxBytes);
  }
}

/**
 * The group commit: every channel's accepted frames are gathered for one
 * event-loop turn (at most ROUND_MAX_BYTES), written to the write-ahead log,
 * made durable by one fdatasync of the log, acknowledged, and then written
 * to their segments. Frames arriving meanwhile form the next round, so the
 * server syncs once per round whatever the number of channels.
 *
 * Up to MAX_ROUNDS_IN_FLIGHT rounds may be in flight: the next round is
 * written and its fdatasync issued while earlier ones' still run (an
 * fdatasync covers everything written before it started), so the disk's
 * flush and this thread's work on the next frames overlap; a round joins
 * others in flight only with OVERLAP_MIN_BYTES. Outcomes are settled in
 * order: a round is acknowledged only after the one before it, and fails
 * with it.
 */
export class GroupCommit {
  private readonly wal: WriteAheadLog;
  private readonly logger: Logger;
  private readonly dirty = new Set<Channel>();
  /** Bytes accepted and not taken by a round yet. */
  private pendingBytes = 0;
  /** Channels with frames in a round in flight, and in how many rounds. */
  private readonly inFlight = new Map<Channel, number>();
  /** Rounds written and not settled yet. */
  private active = 0;
  /** Whether every round so far became durable, settled in order. */
  private tail: Promise<boolean> = Promise.resolve(true);
  private scheduled = false;
  private rolling = false;
  private readonly rounds = new Notifier();

  constructor(wal: WriteAheadLog, logger: Logger) {
    this.wal = wal;
    this.logger = logger;
  }

  /** `channel` has pending frames. */
  add(channel: Channel, bytes: number): void {
    this.pendingBytes += bytes;
    this.dirty.add(channel);
    this.schedule();
  }

  /** So much waits for a round that writers should wait too (memory). */
  get full(): boolean {
    return this.pendingBytes > GLOBAL_PENDING_HIGH_WATER;
  }

  /** `channel` has frames no round took yet. */
  dirtyHas(channel: Channel): boolean {
    return this.dirty.has(channel);
  }

  /** Pending frames of a dirty channel were forgotten (a failed round). */
  dropped(bytes: number): void {
    this.pendingBytes -= bytes;
  }

  /** A round under way holds frames of `channel`. */
  holds(channel: Channel): boolean {
    return this.inFlight.has(channel);
  }

  /** Resolves at the end of the next round (at once when none is coming). */
  nextRound(): Promise<void> {
    if (this.active === 0 && !this.scheduled && !this.rolling) return new Promise((resolve) => setImmediate(resolve));
    return this.rounds.wait();
  }

  /**
   * No round may start now: one is rolling the log; enough are in flight; or
   * some are, and the log is full (it waits for them) or too little waits
   * to be worth a round of its own (OVERLAP_MIN_BYTES).
   */
  private held(): boolean {
    return this.rolling || this.active >= MAX_ROUNDS_IN_FLIGHT || (this.active > 0 && (this.wal.needsRoll() || this.pendingBytes < OVERLAP_MIN_BYTES));
  }

  private schedule(): void {
    if (this.scheduled || this.dirty.size === 0 || this.held()) return;
    this.scheduled = true;
    // One event-loop turn gathers every frame that arrived together.
    setImmediate(() => {
      this.scheduled = false;
      this.start();
    });
  }

  /** Writes what is pending as a round and issues its fdatasync; settles it after the round before. */
  private start(): void {
    if (this.held()) return;
    const batches: Batch[] = [];
    let roundBytes = 0;
    for (const channel of this.dirty) {
      if (roundBytes >= ROUND_MAX_BYTES) break;
      this.dirty.delete(channel);
      this.pendingBytes -= channel.pendingDataBytes;
      const batch = channel.takeBatch();
      if (batch) {
        batches.push(batch);
        roundBytes += batch.recordBytes;
      }
    }
    if (batches.length === 0) return;
    this.active++;
    for (const b of batches) this.inFlight.set(b.channel, (this.inFlight.get(b.channel) ?? 0) + 1);
    let synced: Promise<void>;
    try {
      this.wal.write(
        batches.map((b) => ({
          jobId: b.channel.job.id,
          attempt: b.channel.attempt,
          channel: b.channel.name,
          records: b.records,
          recordBytes: b.recordBytes,
          headers: b.headers,
        })),
        batches.map((b) => b.channel.segment),
      );
      synced = this.wal.sync();
    } catch (err) {
      synced = Promise.reject(err);
    }
    synced.catch(() => undefined);
    const before = this.tail;
    this.tail = this.settle(batches, synced, before);
    // Channels left out by the size cap form the next round.
    this.schedule();
  }

  private async settle(batches: Batch[], synced: Promise<void>, before: Promise<boolean>): Promise<boolean> {
    let error: unknown;
    try {
      await synced;
    } catch (err) {
      error = err;
    }
    // The round before may still be syncing; its outcome comes first.
    if (!(await before) && error === undefined) error = new Error("an earlier write-ahead log round failed");
    if (error === undefined) {
      for (const b of batches) b.channel.committed(b);
      // The acknowledgements go out first; the segments' page-cache writes next.
      setImmediate(() => {
        for (const b of batches) b.channel.writeCommitted();
      });
    } else {
      for (const b of batches) b.channel.failed(b, error);
    }
    for (const b of batches) {
      const n = this.inFlight.get(b.channel)! - 1;
      if (n === 0) this.inFlight.delete(b.channel);
      else this.inFlight.set(b.channel, n);
    }
    this.active--;
    if (this.active === 0 && this.wal.needsRoll() && !this.rolling) {
      // Rolls between rounds, none in flight.
      this.rolling = true;
      await this.wal.maybeRoll().catch((err: unknown) => this.logger.error({ err }, "write-ahead log roll failed"));
      this.rolling = false;
    }
    this.rounds.notify();
    this.schedule();
    return error === undefined;
  }
}

export class Job {
  readonly store: LogStore;
  readonly id: string;
  readonly dir: string;
  /** attempt -> channel name -> channel */
  readonly attempts = new Map<number, Map<string, Channel>>();
  private creating = new Map<string, Promise<Channel>>();
  /** The Append stream of each attempt. */
  readonly sessions = new Map<number, AckSink>();
  /** Bytes of data stored or accepted, every attempt and channel. */
  sizeBytes = 0;
  deleted = false;
  /** Wakes readers waiting for a channel to appear (and on deletion). */
  readonly changed = new Notifier();
  private truncating: Promise<void> | undefined;

  constructor(store: LogStore, id: string) {
    this.store = store;
    this.id = id;
    this.dir = join(store.jobsDir, id);
  }

  /** Opens (and recovers) every channel on disk. */
  async load(): Promise<void> {
    let attempts: string[];
    try {
      attempts = await readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
      throw err;
    }
    for (const a of attempts) {
      if (!/^[1-9]\d{0,9}$/.test(a)) continue;
      const attempt = Number(a);
      const files = await readdir(join(this.dir, a));
      for (const f of files) {
        const name = f.endsWith(".seg") ? f.slice(0, -4) : undefined;
        if (name === undefined || !CHANNEL_NAME.test(name)) continue;
        const { segment, cutBytes } = await Segment.open(join(this.dir, a), name, false);
        if (cutBytes > 0) {
          this.store.logger.warn({ jobId: this.id, attempt, channel: name, cutBytes, frames: segment.frameCount }, "log segment recovered: incomplete tail cut");
        }
        this.add(new Channel(this, attempt, name, segment));
        this.sizeBytes += segment.sizeBytes;
      }
    }
  }

  private add(channel: Channel): void {
    let channels = this.attempts.get(channel.attempt);
    if (!channels) {
      channels = new Map();
      this.attempts.set(channel.attempt, channels);
    }
    channels.set(channel.name, channel);
  }

  channel(attempt: number, name: string): Channel | undefined {
    return this.attempts.get(attempt)?.get(name);
  }

  /** The channel, created on disk when missing. */
  async createChannel(attempt: number, name: string): Promise<Channel> {
    const existing = this.channel(attempt, name);
    if (existing) return existing;
    const key = `${attempt}/${name}`;
    let creating = this.creating.get(key);
    if (!creating) {
      creating = (async () => {
        const dir = join(this.dir, String(attempt));
        const fresh = await mkdir(dir, { recursive: true });
        const { segment } = await Segment.open(dir, name, true);
        await syncDir(dir);
        if (fresh !== undefined) {
          await syncDir(this.dir);
          await syncDir(this.store.jobsDir);
        }
        const channel = new Channel(this, attempt, name, segment);
        if (this.deleted) {
          await segment.close();
          throw new Error("job deleted");
        }
        this.add(channel);
        if (this.truncatedMessage !== undefined) await channel.truncate(this.truncatedMessage);
        this.changed.notify();
        return channel;
      })().finally(() => this.creating.delete(key));
      this.creating.set(key, creating);
    }
    return creating;
  }

  /** The message of the size cap, once reached. */
  truncatedMessage: string | undefined;

  /** Marks every open channel of the job truncated (the size cap). */
  truncate(message: string): Promise<void> {
    this.truncatedMessage ??= message;
    this.truncating ??= (async () => {
      this.store.logger.warn({ jobId: this.id, capBytes: this.store.options.jobSizeCapBytes }, "job log reached its size cap");
      for (const channel of this.allChannels()) await channel.truncate(message);
    })();
    return this.truncating;
  }

  allChannels(): Channel[] {
    return [...this.attempts.values()].flatMap((m) => [...m.values()]);
  }

  /** Remaining bytes before the cap; -1 without a cap. */
  remainingBytes(): number {
    const cap = this.store.options.jobSizeCapBytes;
    return cap > 0 ? Math.max(0, cap - this.sizeBytes) : -1;
  }
}

export interface LogStoreOptions {
  dataDir: string;
  /** Per-job cap of stored data bytes; 0: none. */
  jobSizeCapBytes: number;
  logger: Logger;
  /** The write-ahead log rolls (and checkpoints) at this size; default 64 MiB. */
  walFileBytes?: number;
  /** Whether the write-ahead log makes zero-filled files to roll to (wal.ts); default true. */
  walZeroFill?: boolean;
}

/** A job as found on disk, for retention. */
export interface JobOnDisk {
  jobId: string;
  diskBytes: number;
  /** Every channel is closed or truncated, and no writer is connected. */
  finalized: boolean;
  lastChangeMs: number;
}

export class LogStore {
  readonly options: LogStoreOptions;
  readonly logger: Logger;
  readonly jobsDir: string;
  readonly wal: WriteAheadLog;
  readonly commits: GroupCommit;
  private jobs = new Map<string, Promise<Job>>();
  /** Aborted when the server stops: followers and writers end with Unavailable. */
  private readonly stopping = new AbortController();

  constructor(options: LogStoreOptions) {
    // Every open stream listens for the stop.
    setMaxListeners(0, this.stopping.signal);
    this.options = options;
    this.logger = options.logger;
    this.jobsDir = join(options.dataDir, "jobs");
    this.wal = new WriteAheadLog({
      dir: join(options.dataDir, "wal"),
      fileBytes: options.walFileBytes ?? 64 << 20,
      zeroFill: options.walZeroFill,
      logger: this.logger,
    });
    this.commits = new GroupCommit(this.wal, this.logger);
  }

  /** Opens the store, replaying what the write-ahead log holds beyond the segments (a crash). */
  async open(): Promise<void> {
    await mkdir(this.jobsDir, { recursive: true });
    await this.wal.open();
    const touched = new Set<Segment>();
    let appended = 0;
    const entries = await this.wal.replay(
      async (entry) => {
        const job = await this.job(entry.jobId);
        const channel = job.channel(entry.attempt, entry.channel);
        if (!channel) return; // deleted
        const before = channel.segment.sizeBytes;
        const r = channel.segment.replay(entry.records);
        touched.add(channel.segment);
        job.sizeBytes += channel.segment.sizeBytes - before;
        channel.writtenSeq = channel.durableSeq;
        appended += r.appended;
        if (r.misfit !== undefined) {
          this.logger.warn({ jobId: job.id, attempt: channel.attempt, channel: channel.name, problem: r.misfit }, "write-ahead log record not replayed");
        }
      },
      async () => {
        for (const segment of touched) await segment.sync();
      },
    );
    if (entries > 0) this.logger.info({ entries, framesRecovered: appended }, "write-ahead log replayed");
  }

  get stopSignal(): AbortSignal {
    return this.stopping.signal;
  }

  /** The job, loaded from disk on first use (it may have no channels). */
  job(jobId: string): Promise<Job> {
    let job = this.jobs.get(jobId);
    if (!job) {
      const j = new Job(this, jobId);
      job = j.load().then(() => j);
      job.catch(() => this.jobs.delete(jobId));
      this.jobs.set(jobId, job);
    }
    return job;
  }

  /** Ends streams (Unavailable), then makes everything accepted durable and closes the files. */
  beginStop(): void {
    this.stopping.abort();
    for (const job of this.loadedJobs()) job.then((j) => j.changed.notify(), () => undefined);
  }

  async close(): Promise<void> {
    this.beginStop();
    let unsynced = false;
    for (const p of this.loadedJobs()) {
      const job = await p.catch(() => undefined);
      if (!job) continue;
      for (const channel of job.allChannels()) {
        await channel.settle();
        try {
          await channel.segment.close();
        } catch (err) {
          this.logger.error({ err, jobId: job.id, channel: channel.name }, "log segment fsync failed at close");
          unsynced = true;
        }
        channel.changed.notify();
      }
    }
    // Every segment is fsynced: the write-ahead log is no longer needed.
    await this.wal.close(unsynced);
  }

  private loadedJobs(): Promise<Job>[] {
    return [...this.jobs.values()];
  }

  /**
   * Deletes every log of a job; open Append streams end Aborted, readers get
   * their end. Returns the bytes freed (0 when there was nothing).
   */
  async deleteJob(jobId: string, reason: string): Promise<number> {
    const job = await this.job(jobId);
    job.deleted = true;
    this.jobs.delete(jobId);
    for (const session of job.sessions.values()) session.abort(new Error(reason));
    for (const channel of job.allChannels()) {
      channel.changed.notify();
      await channel.drain();
      await channel.segment.close(false);
    }
    job.changed.notify();
    const bytes = await diskUsage(job.dir);
    await rm(job.dir, { recursive: true, force: true });
    if (bytes > 0) this.logger.info({ jobId, bytesFreed: bytes, reason }, "job logs deleted");
    return bytes;
  }

  /** Every job on disk with its size and whether it is finalized. */
  async jobsOnDisk(): Promise<JobOnDisk[]> {
    let ids: string[];
    try {
      ids = await readdir(this.jobsDir);
    } catch {
      return [];
    }
    const out: JobOnDisk[] = [];
    for (const jobId of ids) {
      if (!JOB_ID.test(jobId)) continue;
      const loaded = this.jobs.get(jobId);
      let busy = false;
      if (loaded) {
        const job = await loaded.catch(() => undefined);
        busy = job !== undefined && (job.sessions.size > 0 || job.allChannels().some((c) => c.state.kind === "open" || !c.settled));
        // The sizes on disk include what is committed but not written out yet.
        if (job && !job.deleted) for (const c of job.allChannels()) c.segment.writeOut();
      }
      const info = await scanJobDir(join(this.jobsDir, jobId));
      out.push({ jobId, diskBytes: info.bytes, finalized: !busy && info.allEnded, lastChangeMs: info.lastChangeMs });
    }
    return out;
  }

  /** Free and total bytes of the file system holding the logs. */
  async diskSpace(): Promise<{ capacityBytes: number; freeBytes: number }> {
    const s = await statfs(this.options.dataDir);
    return { capacityBytes: s.blocks * s.bsize, freeBytes: s.bavail * s.bsize };
  }
}

async function scanJobDir(dir: string): Promise<{ bytes: number; allEnded: boolean; lastChangeMs: number }> {
  let bytes = 0;
  let allEnded = true;
  let lastChangeMs = 0;
  const walk = async (d: string) => {
    const entries = await readdir(d, { withFileTypes: true }).catch(() => []);
    const names = new Set(entries.map((e) => e.name));
    for (const e of entries) {
      const path = join(d, e.name);
      if (e.isDirectory()) {
        await walk(path);
        continue;
      }
      const st = await stat(path).catch(() => undefined);
      if (!st) continue;
      bytes += st.size;
      lastChangeMs = Math.max(lastChangeMs, st.mtimeMs);
      if (e.name.endsWith(".seg")) {
        const base = e.name.slice(0, -4);
        if (!names.has(`${base}.closed`) && !names.has(`${base}.truncated`)) allEnded = false;
      }
    }
  };
  await walk(dir);
  if (lastChangeMs === 0) lastChangeMs = (await stat(dir).catch(() => undefined))?.mtimeMs ?? 0;
  return { bytes, allEnded, lastChangeMs };
}

async function diskUsage(dir: string): Promise<number> {
  return (await scanJobDir(dir)).bytes;
}

export { MAX_FRAME_BYTES };
