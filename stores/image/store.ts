/**
 * The blob store on disk: an OCI image layout (DESIGN.md §6).
 *
 *   <root>/oci-layout              {"imageLayoutVersion":"1.0.0"}
 *   <root>/index.json              the stored manifests (OCI image index)
 *   <root>/blobs/sha256/<hex>      blobs and manifests, content-addressed
 *   <root>/uploads/<hex>           the bytes of an upload in progress
 *   <root>/uploads/<hex>.json      its declared size and its writer
 *   <root>/holders/<hex>           who holds a blob or manifest, a user id a line
 *
 * Every path is built from a digest that matched `sha256:[0-9a-f]{64}`, so
 * nothing a client sends can name a file outside the root.
 *
 * An upload appends to its temp file, hashing as it writes; it is renamed into
 * `blobs/` only when size and digest match, so a blob in `blobs/` is always
 * complete and verified. The committed offset of an interrupted upload is the
 * length of its temp file (every byte in it was written in order at its
 * offset); a resume hashes that prefix again (or reuses the hash state kept
 * in memory since the interruption).
 *
 * Possession (docs/images.md): a blob or manifest is held by the users who
 * proved they have its bytes, by uploading them (verified against the
 * digest) or by mounting them from a manifest they may read. An upload's
 * writer is the write token's subject; an upload is resumed only by its own
 * writer, so nobody completes another's prefix. A writer that does not hold
 * an existing blob uploads it whole; the bytes are verified and thrown away
 * (the stored blob is not rewritten) and the writer becomes a holder.
 *
 * An upload whose digest comes at its end (PutBlobRequest.digest_at_end)
 * writes to `<root>/uploads/pending-<uuid>`, hashing as it writes, and is
 * renamed to the digest the client names at the end only when the hash
 * matches; it is never resumed (a broken one is removed). The
 * holders file of a digest is rewritten atomically on each change and goes
 * with the blob. A data directory from before holders existed is upgraded
 * once: its objects are held by LEGACY_HOLDER, which backs reads (as before)
 * but never a new manifest.
 */
import { createHash, randomUUID, type Hash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readFile, readdir, rename, rm, stat, statfs, writeFile, type FileHandle } from "node:fs/promises";
import { dirname, join } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Manifest } from "../../gen/treadmill/image/v1/manifest_pb.js";
import { BLOB_CHUNK_BYTES, BackgroundWriter } from "../../lib/image/blob-io.js";
import { DIGEST_PATTERN, digestOf } from "../../lib/image/digest.js";
import type { Logger } from "../../lib/logger.js";
import { INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE } from "../../lib/image/media-types.js";
import { manifestBlobs, parseManifest } from "./manifest.js";

/** A stored manifest, as the index keeps it in memory. */
export interface ManifestRecord {
  digest: string;
  /** Bytes of the manifest JSON. */
  size: number;
  createdMs: number;
  manifest: Manifest;
  /** Every referenced blob and its size. */
  blobs: Map<string, number>;
  /** Manifest plus every referenced blob. */
  totalSize: number;
}

export interface BlobStoreOptions {
  root: string;
  logger: Logger;
  /** Size cap of blobs, manifests and uploads in bytes; 0: none. */
  capBytes: number;
  /** Hash whole-blob reads and quarantine a blob that no longer matches. */
  verifyReads: boolean;
  clock?: () => number;
  /** Free bytes of the file system; default statfs of the root. */
  freeBytes?: () => Promise<number>;
}

/** The holder of every object of a data directory upgraded to holders (see the head comment). */
export const LEGACY_HOLDER = "*";

/**
 * Who writes: a user (the write token's subject), who becomes a holder of
 * what it uploads, or the store itself (a cache's fetch: `undefined`), which
 * records holders as its locations proved them.
 */
export type Writer = string | undefined;

/** The state of an upload that may be continued. */
export interface UploadState {
  exists: boolean;
  committedOffset: number;
  size: number;
}

/** What a finished PutBlob stream did. */
export interface UploadResult {
  committedSize: number;
  complete: boolean;
  alreadyExisted: boolean;
}

function hexOf(digest: string): string {
  if (!DIGEST_PATTERN.test(digest)) {
    // Callers validate first; this is the last line of defence for paths.
    throw new ConnectError("digest must be sha256:<64 lower-case hex digits>", Code.InvalidArgument);
  }
  return digest.slice("sha256:".length);
}

function isDiskFull(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return code === "ENOSPC" || code === "EDQUOT";
}

/** Bytes written between two background flushes of an upload (see Upload). */
const FLUSH_EVERY_BYTES = 64 * 1024 * 1024;

/**
 * An upload in progress: one PutBlob stream (or one blob of a cache fetch).
 *
 * Writes go through a BackgroundWriter: `write()` hashes the data and queues
 * it, so the disk writes while the next messages arrive, in order (the temp
 * file is always a prefix of the blob). Every FLUSH_EVERY_BYTES a datasync
 * starts in the background, so the disk writes back while bytes still arrive
 * and the final datasync (before the upload is answered) has little left.
 */
export class Upload {
  readonly #writer: BackgroundWriter;
  /** Bytes accepted by write() (written or queued). */
  #accepted: number;
  /** The background datasync in flight. */
  #flushing: Promise<void> | undefined;
  #flushedAt: number;
  /** The write failure, once seen (the file is then cut back to the written prefix). */
  #failure: Promise<never> | undefined;
  #done = false;

  constructor(
    private readonly store: BlobStore,
    readonly digest: string,
    readonly writer: Writer,
    readonly size: number,
    offset: number,
    private readonly file: FileHandle,
    private readonly hash: Hash,
    /** The temp file of a digest-at-end upload (`digest` is then ""). */
    readonly pendingPath?: string,
  ) {
    this.#accepted = offset;
    this.#flushedAt = offset;
    let counted = offset;
    this.#writer = new BackgroundWriter(file, offset, {
      onWritten: (written) => {
        this.store.addUsage(written - counted);
        counted = written;
        if (written - this.#flushedAt >= FLUSH_EVERY_BYTES && !this.#flushing) {
          this.#flushedAt = written;
          this.#flushing = file
            .datasync()
            .catch(() => undefined)
            .finally(() => (this.#flushing = undefined));
        }
      },
    });
  }

  /** Bytes accepted so far: the offset the next write continues at. */
  get offset(): number {
    return this.#accepted;
  }

  /**
   * Appends `data` (one buffer, or the pieces of one message) at the current
   * offset, hashing it, and queues it for the disk; waits only while the
   * disk is far behind. A failed write rejects a later write() or finish()
   * (ResourceExhausted when the disk is full). `data` must not change until
   * finish() or suspend() resolves.
   */
  async write(data: Uint8Array | readonly Uint8Array[]): Promise<void> {
    if (this.#done) throw new Error("upload already finished");
    const pieces = data instanceof Uint8Array ? [data] : data;
    let length = 0;
    for (const p of pieces) length += p.length;
    if (this.#accepted + length > this.size) {
      throw new ConnectError(`data past the declared size ${this.size} of ${this.digest || "the blob"}`, Code.OutOfRange);
    }
    if (length === 0) return;
    await this.#writer.write(pieces).catch((err: unknown) => this.#failed(err));
    for (const p of pieces) this.hash.update(p);
    this.#accepted += length;
  }

  /**
   * A write failed: the hash covers bytes not on disk, so the upload can only
   * be suspended (keeping exactly the written prefix) and resumed by hashing
   * that prefix again.
   */
  #failed(err: unknown): Promise<never> {
    this.#failure ??= (async () => {
      await this.#writer.settle().catch(() => undefined);
      await this.file.truncate(this.#writer.written).catch(() => undefined);
      this.#accepted = this.#writer.written;
      throw isDiskFull(err) ? new ConnectError("image store is full", Code.ResourceExhausted) : err;
    })();
    return this.#failure;
  }

  /** Waits for the writes and the background datasync; throws a write's failure. */
  async #settle(): Promise<void> {
    try {
      await this.#writer.settle().catch((err: unknown) => this.#failed(err));
    } finally {
      await this.#flushing;
    }
  }

  /**
   * Ends the upload: a complete one is verified and moved into place (a
   * mismatch removes it: InvalidArgument); an incomplete one is synced and
   * kept for a resume. A failed write rejects (the prefix is kept).
   */
  async finish(): Promise<UploadResult> {
    try {
      await this.#settle();
    } catch (err) {
      await this.suspend();
      throw err;
    }
    if (this.#writer.written < this.size) {
      await this.suspend();
      return { committedSize: this.#writer.written, complete: false, alreadyExisted: false };
    }
    this.#done = true;
    try {
      const actual = digestOf(this.hash);
      if (actual !== this.digest) {
        await this.file.close();
        await this.store.discardUpload(this.digest);
        throw new ConnectError(`digest mismatch: the data of ${this.digest} hashes to ${actual}`, Code.InvalidArgument);
      }
      await this.file.datasync();
      await this.file.close();
      await this.store.commitUpload(this.digest, this.writer);
      return { committedSize: this.size, complete: true, alreadyExisted: false };
    } finally {
      this.store.endUpload(this);
    }
  }

  /**
   * Ends a digest-at-end upload (BlobStore.beginPendingUpload): the whole
   * size must be there and hash to `digest`, else the bytes are removed
   * (InvalidArgument). Resolves with whether the writer held the blob
   * already; the writer holds it now.
   */
  async finishAs(digest: string): Promise<{ alreadyHeld: boolean }> {
    const path = this.pendingPath;
    if (path === undefined || this.writer === undefined) throw new Error("not a digest-at-end upload");
    try {
      await this.#settle();
    } catch (err) {
      await this.discard();
      throw err;
    }
    if (this.#writer.written < this.size) {
      await this.discard();
      throw new ConnectError(`the upload ended at ${this.#writer.written} of its size ${this.size}`, Code.InvalidArgument);
    }
    this.#done = true;
    try {
      const actual = digestOf(this.hash);
      if (actual !== digest) {
        await this.file.close();
        await this.store.discardPending(path);
        throw new ConnectError(`digest mismatch: the data hashes to ${actual}, not ${digest}`, Code.InvalidArgument);
      }
      await this.file.datasync();
      await this.file.close();
      return await this.store.commitPending(path, digest, this.writer);
    } finally {
      this.store.endUpload(this);
    }
  }

  /** Keeps what was written (synced) for a later resume; idempotent. */
  async suspend(): Promise<void> {
    if (this.#done) return;
    this.#done = true;
    try {
      await this.#settle().catch(() => undefined);
      await this.file.datasync().catch(() => undefined);
      await this.file.close().catch(() => undefined);
      if (!this.#failure) this.store.rememberHash(this.digest, this.#writer.written, this.hash);
    } finally {
      this.store.endUpload(this);
    }
  }

  /** Throws the upload away (e.g. a cache that got bad bytes from a location). */
  async discard(): Promise<void> {
    if (this.#done) return;
    this.#done = true;
    try {
      await this.#settle().catch(() => undefined);
      await this.file.close().catch(() => undefined);
      if (this.pendingPath !== undefined) await this.store.discardPending(this.pendingPath);
      else await this.store.discardUpload(this.digest);
    } finally {
      this.store.endUpload(this);
    }
  }
}

export class BlobStore {
  readonly root: string;
  readonly #log: Logger;
  readonly #options: BlobStoreOptions;
  readonly #clock: () => number;
  readonly #manifests = new Map<string, ManifestRecord>();
  /** How many stored manifests reference each blob. */
  readonly #refs = new Map<string, number>();
  /** Digests with an upload open now. */
  readonly #active = new Map<string, Upload>();
  /** Temp files of digest-at-end uploads open now. */
  readonly #pending = new Set<string>();
  /** Commits in turn, so that two uploads of one blob never both move theirs into place. */
  #commits: Promise<void> = Promise.resolve();
  /** Hash states of interrupted uploads, to resume without rehashing. */
  readonly #suspended = new Map<string, { offset: number; hash: Hash }>();
  /** Bytes promised to uploads in progress (what they may still write). */
  #reserved = 0;
  #usedBytes = 0;
  #blobCount = 0;
  #mutex: Promise<void> = Promise.resolve();
  #collecting = false;
  /** Holders by digest, as loaded from `holders/` (absent: not loaded yet). */
  readonly #holders = new Map<string, Set<string>>();
  /** Per digest, the holders file write in flight (writes of one digest run in turn). */
  readonly #holderWrites = new Map<string, Promise<void>>();
  /** Told when a blob is found corrupt and removed. */
  onCorrupt?: (digest: string) => void;

  constructor(options: BlobStoreOptions) {
    this.root = options.root;
    this.#options = options;
    this.#log = options.logger;
    this.#clock = options.clock ?? Date.now;
  }

  blobPath(digest: string): string {
    return join(this.root, "blobs", "sha256", hexOf(digest));
  }

  #uploadPath(digest: string): string {
    return join(this.root, "uploads", hexOf(digest));
  }

  #holdersPath(digest: string): string {
    return join(this.root, "holders", hexOf(digest));
  }

  get usedBytes(): number {
    return this.#usedBytes;
  }

  get capBytes(): number {
    return this.#options.capBytes;
  }

  get blobCount(): number {
    return this.#blobCount;
  }

  addUsage(bytes: number): void {
    this.#usedBytes += bytes;
  }

  async freeBytes(): Promise<number> {
    if (this.#options.freeBytes) return this.#options.freeBytes();
    const s = await statfs(this.root);
    return s.bavail * s.bsize;
  }

  /** Creates the layout, loads the index, counts usage, drops broken uploads. */
  async open(): Promise<void> {
    await mkdir(join(this.root, "blobs", "sha256"), { recursive: true });
    await mkdir(join(this.root, "uploads"), { recursive: true });
    const layout = join(this.root, "oci-layout");
    if (!(await stat(layout).catch(() => undefined))) {
      await writeFile(layout, JSON.stringify({ imageLayoutVersion: "1.0.0" }) + "\n");
    }
    for (const name of await readdir(join(this.root, "blobs", "sha256"))) {
      const s = await stat(join(this.root, "blobs", "sha256", name)).catch(() => undefined);
      if (!s?.isFile()) continue;
      this.#usedBytes += s.size;
      this.#blobCount++;
    }
    for (const name of await readdir(join(this.root, "uploads"))) {
      const path = join(this.root, "uploads", name);
      const hex = name.endsWith(".json") ? name.slice(0, -5) : name;
      const valid = /^[0-9a-f]{64}$/.test(hex) && !name.includes(".tmp");
      const meta = valid ? await this.#readUploadMeta(`sha256:${hex}`) : undefined;
      const data = valid ? await stat(join(this.root, "uploads", hex)).catch(() => undefined) : undefined;
      // An upload whose declared size is unknown or smaller than its bytes is junk.
      if (!meta || !data || data.size > meta.size) {
        this.#log.info({ file: name }, "removing broken upload file");
        await rm(path, { force: true });
        continue;
      }
      if (name === hex) this.#usedBytes += data.size;
    }
    await this.#loadIndex();
    await this.#upgradeHolders();
  }

  /**
   * A data directory without `holders/` predates possession: every blob in
   * it gets LEGACY_HOLDER, written to a side directory that is renamed into
   * place whole (a crash redoes it).
   */
  async #upgradeHolders(): Promise<void> {
    const dir = join(this.root, "holders");
    if (await stat(dir).catch(() => undefined)) return;
    const side = join(this.root, "holders.upgrade");
    await rm(side, { recursive: true, force: true });
    await mkdir(side);
    let count = 0;
    for (const hex of await readdir(join(this.root, "blobs", "sha256"))) {
      if (!/^[0-9a-f]{64}$/.test(hex)) continue;
      await writeFile(join(side, hex), `${LEGACY_HOLDER}\n`);
      count++;
    }
    await syncDir(side);
    await rename(side, dir);
    await syncDir(this.root);
    if (count > 0) this.#log.warn({ objects: count }, "data directory upgraded to holders: existing objects are held by legacy (readable as before); re-push private images");
  }

  // ---- holders ----

  async #loadHolders(digest: string): Promise<Set<string>> {
    let set = this.#holders.get(digest);
    if (set) return set;
    let text = "";
    try {
      text = await readFile(this.#holdersPath(digest), "utf8");
    } catch (err) {
      if ((err as { code?: string }).code !== "ENOENT") throw err;
    }
    // Another call may have loaded (or changed) it meanwhile.
    set = this.#holders.get(digest) ?? new Set(text.split("\n").filter((h) => h !== ""));
    this.#holders.set(digest, set);
    return set;
  }

  /**
   * Whether `holder` holds `digest` here. LEGACY_HOLDER counts only with
   * `legacy` (reads): a new manifest needs possession proven since.
   */
  async holds(digest: string, holder: string, options: { legacy: boolean }): Promise<boolean> {
    const set = await this.#loadHolders(digest);
    return set.has(holder) || (options.legacy && set.has(LEGACY_HOLDER));
  }

  /** Records `holder` as a holder of each of `digests` (durably, before it resolves). */
  async addHolder(digests: Iterable<string>, holder: string): Promise<void> {
    for (const digest of new Set(digests)) {
      const set = await this.#loadHolders(digest);
      if (set.has(holder)) continue;
      set.add(holder);
      await this.#writeHolders(digest);
    }
  }

  /** Rewrites the holders file of `digest` from memory; writes of one digest run in turn. */
  #writeHolders(digest: string): Promise<void> {
    const previous = this.#holderWrites.get(digest) ?? Promise.resolve();
    const write = previous.then(async () => {
      const set = this.#holders.get(digest);
      const path = this.#holdersPath(digest);
      if (!set || set.size === 0) await rm(path, { force: true });
      else await atomicWrite(path, [...set].join("\n") + "\n");
    });
    const settled = write.catch(() => undefined);
    this.#holderWrites.set(digest, settled);
    void settled.then(() => {
      if (this.#holderWrites.get(digest) === settled) this.#holderWrites.delete(digest);
    });
    return write;
  }

  /** Forgets the holders of a deleted blob. */
  async #dropHolders(digest: string): Promise<void> {
    this.#holders.set(digest, new Set());
    await this.#writeHolders(digest);
    this.#holders.delete(digest);
  }

  async #loadIndex(): Promise<void> {
    let index: { manifests?: { digest?: unknown; annotations?: Record<string, string> }[] };
    try {
      index = JSON.parse(await readFile(join(this.root, "index.json"), "utf8")) as typeof index;
    } catch (err) {
      if ((err as { code?: string }).code !== "ENOENT") throw err;
      await this.#writeIndex();
      return;
    }
    for (const entry of index.manifests ?? []) {
      const digest = entry.digest;
      if (typeof digest !== "string" || !DIGEST_PATTERN.test(digest)) continue;
      try {
        const json = await readFile(this.blobPath(digest));
        const created = Date.parse(entry.annotations?.["treadmill.created"] ?? "");
        this.#addRecord(digest, json, Number.isNaN(created) ? this.#clock() : created);
      } catch (err) {
        this.#log.error({ err, digest }, "stored manifest unreadable; dropped from the index");
      }
    }
  }

  async #writeIndex(): Promise<void> {
    const manifests = [...this.#manifests.values()]
      .sort((a, b) => (a.digest < b.digest ? -1 : 1))
      .map((r) => ({
        mediaType: MANIFEST_MEDIA_TYPE,
        digest: r.digest,
        size: r.size,
        annotations: { "treadmill.created": new Date(r.createdMs).toISOString() },
      }));
    const body = JSON.stringify({ schemaVersion: 2, mediaType: INDEX_MEDIA_TYPE, manifests }, null, 1);
    await atomicWrite(join(this.root, "index.json"), body + "\n");
  }

  #addRecord(digest: string, json: Uint8Array, createdMs: number): ManifestRecord {
    const manifest = parseManifest(json);
    const blobs = manifestBlobs(manifest);
    let totalSize = json.length;
    for (const size of blobs.values()) totalSize += size;
    const record: ManifestRecord = { digest, size: json.length, createdMs, manifest, blobs, totalSize };
    this.#manifests.set(digest, record);
    for (const blob of blobs.keys()) this.#refs.set(blob, (this.#refs.get(blob) ?? 0) + 1);
    this.#refs.set(digest, (this.#refs.get(digest) ?? 0) + 1);
    return record;
  }

  #removeRecord(digest: string): void {
    const record = this.#manifests.get(digest);
    if (!record) return;
    this.#manifests.delete(digest);
    for (const blob of [...record.blobs.keys(), digest]) {
      const n = (this.#refs.get(blob) ?? 1) - 1;
      if (n <= 0) this.#refs.delete(blob);
      else this.#refs.set(blob, n);
    }
  }

  /** Runs `fn` alone among index changes and sweeps. */
  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#mutex.then(fn);
    this.#mutex = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  // ---- blobs ----

  /** Size and commit time of a stored blob, or undefined. */
  async statBlob(digest: string): Promise<{ size: number; mtimeMs: number } | undefined> {
    const s = await stat(this.blobPath(digest)).catch(() => undefined);
    return s?.isFile() ? { size: s.size, mtimeMs: s.mtimeMs } : undefined;
  }

  /** An upload's declared size and writer ("" for the store itself). */
  async #readUploadMeta(digest: string): Promise<{ size: number; writer: string } | undefined> {
    try {
      const meta = JSON.parse(await readFile(`${this.#uploadPath(digest)}.json`, "utf8")) as { size?: unknown; writer?: unknown };
      if (typeof meta.size !== "number" || !Number.isSafeInteger(meta.size) || meta.size < 0) return undefined;
      return { size: meta.size, writer: typeof meta.writer === "string" ? meta.writer : "" };
    } catch {
      return undefined;
    }
  }

  /**
   * What QueryUpload answers `writer`: the blob exists only if the writer
   * holds it (the store itself: if it is stored); an interrupted upload
   * counts only if this writer started it.
   */
  async queryUpload(digest: string, writer: Writer): Promise<UploadState> {
    const blob = await this.statBlob(digest);
    if (blob && (writer === undefined || (await this.holds(digest, writer, { legacy: false })))) {
      return { exists: true, committedOffset: blob.size, size: blob.size };
    }
    const meta = await this.#readUploadMeta(digest);
    const data = await stat(this.#uploadPath(digest)).catch(() => undefined);
    if (!meta || !data || meta.writer !== (writer ?? "")) return { exists: false, committedOffset: 0, size: 0 };
    return { exists: false, committedOffset: data.size, size: meta.size };
  }

  /**
   * Opens an upload of `digest` (`size` bytes) by `writer` continuing at
   * `offset`, which must be the writer's committed offset. Returns "exists"
   * when the writer already holds the blob (the store itself: when it is
   * stored); a writer that does not hold a stored blob uploads it whole (a
   * proof of possession). Another writer's interrupted upload is discarded
   * by a fresh start. Checks the size cap and free space for the remaining
   * bytes before anything is written.
   */
  async beginUpload(digest: string, size: number, offset: number, writer: Writer): Promise<Upload | "exists"> {
    const state = await this.queryUpload(digest, writer);
    if (state.exists) return "exists";
    if (this.#active.has(digest)) {
      throw new ConnectError(`an upload of ${digest} is already in progress`, Code.Aborted);
    }
    const path = this.#uploadPath(digest);
    let committed = state.committedOffset;
    const meta = await this.#readUploadMeta(digest);
    if (meta && meta.writer !== (writer ?? "") && offset === 0) {
      // Another writer's prefix: never continued by this one.
      await this.discardUpload(digest);
    }
    if (state.size !== 0 && state.size !== size) {
      // A previous upload declared another size; only a fresh start may change it.
      if (offset !== 0) {
        throw new ConnectError(`size ${size} differs from the interrupted upload's size ${state.size}`, Code.InvalidArgument);
      }
      await this.discardUpload(digest);
      committed = 0;
    }
    if (offset !== committed) {
      throw new ConnectError(`offset ${offset} is not the committed offset ${committed} of ${digest}`, Code.OutOfRange);
    }
    if (offset > size) throw new ConnectError(`offset ${offset} is past the size ${size}`, Code.OutOfRange);
    if (this.#active.has(digest)) {
      throw new ConnectError(`an upload of ${digest} is already in progress`, Code.Aborted);
    }
    const remaining = size - offset;
    await this.reserve(remaining);
    // Claimed from here on: other uploads of this digest get Aborted.
    const placeholder = {} as Upload;
    this.#active.set(digest, placeholder);
    try {
      let hash: Hash;
      const kept = this.#suspended.get(digest);
      this.#suspended.delete(digest);
      if (offset === 0) {
        hash = createHash("sha256");
        await writeFile(`${path}.json`, JSON.stringify({ size, writer: writer ?? "" }));
        await writeFile(path, new Uint8Array(0));
      } else if (kept && kept.offset === offset) {
        hash = kept.hash;
      } else {
        hash = await hashPrefix(path, offset);
      }
      const file = await open(path, "r+");
      const upload = new Upload(this, digest, writer, size, offset, file, hash);
      this.#active.set(digest, upload);
      this.#reservations.set(upload, remaining);
      return upload;
    } catch (err) {
      this.#active.delete(digest);
      this.#reserved -= remaining;
      if (isDiskFull(err)) throw new ConnectError("image store is full", Code.ResourceExhausted);
      throw err;
    }
  }

  readonly #reservations = new Map<Upload, number>();

  /**
   * Opens a digest-at-end upload of `size` bytes by `writer`: a temp file of
   * its own, its digest named only at the end (Upload.finishAs). Checks the
   * size cap and free space for the whole size before anything is written.
   */
  async beginPendingUpload(size: number, writer: string): Promise<Upload> {
    await this.reserve(size);
    const path = join(this.root, "uploads", `pending-${randomUUID()}`);
    this.#pending.add(path);
    try {
      const file = await open(path, "wx");
      const upload = new Upload(this, "", writer, size, 0, file, createHash("sha256"), path);
      this.#reservations.set(upload, size);
      return upload;
    } catch (err) {
      this.#pending.delete(path);
      this.#reserved -= size;
      if (isDiskFull(err)) throw new ConnectError("image store is full", Code.ResourceExhausted);
      throw err;
    }
  }

  /**
   * Moves a verified digest-at-end upload into place as `digest`, or, when
   * the blob is stored already, throws the bytes away; the writer then holds
   * it. Tells whether the writer held it before.
   */
  async commitPending(path: string, digest: string, writer: string): Promise<{ alreadyHeld: boolean }> {
    const alreadyHeld = await this.holds(digest, writer, { legacy: false });
    await this.#inTurn(async () => {
      if (await this.statBlob(digest)) {
        await this.discardPending(path);
        return;
      }
      await rename(path, this.blobPath(digest));
      await syncDir(join(this.root, "blobs", "sha256"));
      this.#blobCount++;
    });
    await this.addHolder([digest], writer);
    return { alreadyHeld };
  }

  /** Removes a digest-at-end upload's temp file. */
  async discardPending(path: string): Promise<void> {
    const s = await stat(path).catch(() => undefined);
    await rm(path, { force: true });
    if (s) this.#usedBytes -= s.size;
  }

  /** Runs `fn` after every commit before it. */
  #inTurn(fn: () => Promise<void>): Promise<void> {
    const run = this.#commits.then(fn);
    this.#commits = run.catch(() => undefined);
    return run;
  }

  /** Reserves room for `bytes` more, or throws ResourceExhausted. */
  async reserve(bytes: number): Promise<void> {
    const cap = this.#options.capBytes;
    if (cap > 0 && this.#usedBytes + this.#reserved + bytes > cap) {
      throw new ConnectError(`image store is over its size cap of ${cap} bytes`, Code.ResourceExhausted);
    }
    const free = await this.freeBytes();
    if (free - this.#reserved < bytes) {
      throw new ConnectError("image store is full", Code.ResourceExhausted);
    }
    this.#reserved += bytes;
  }

  endUpload(upload: Upload): void {
    if (this.#active.get(upload.digest) === upload) this.#active.delete(upload.digest);
    if (upload.pendingPath !== undefined) this.#pending.delete(upload.pendingPath);
    this.#reserved -= this.#reservations.get(upload) ?? 0;
    this.#reservations.delete(upload);
  }

  rememberHash(digest: string, offset: number, hash: Hash): void {
    this.#suspended.set(digest, { offset, hash });
  }

  /**
   * Moves a verified upload into place, or, when the blob is stored already
   * (a proof of possession), throws the bytes away; the writer then holds it.
   */
  async commitUpload(digest: string, writer: Writer): Promise<void> {
    const path = this.#uploadPath(digest);
    await this.#inTurn(async () => {
      if (await this.statBlob(digest)) {
        await this.discardUpload(digest);
      } else {
        await rename(path, this.blobPath(digest));
        await rm(`${path}.json`, { force: true });
        await syncDir(join(this.root, "blobs", "sha256"));
        this.#blobCount++;
      }
    });
    if (writer !== undefined) await this.addHolder([digest], writer);
  }

  async discardUpload(digest: string): Promise<void> {
    const path = this.#uploadPath(digest);
    const s = await stat(path).catch(() => undefined);
    await rm(path, { force: true });
    await rm(`${path}.json`, { force: true });
    this.#suspended.delete(digest);
    if (s) this.#usedBytes -= s.size;
  }

  /** Whether an upload of `digest` is open now. */
  isUploading(digest: string): boolean {
    return this.#active.has(digest);
  }

  /**
   * Streams a blob from `offset`, `length` bytes (to the end when undefined).
   * A whole-blob read is hashed when verifyReads is on; a blob whose bytes no
   * longer match is removed and the stream fails with DataLoss.
   */
  async *readBlob(digest: string, offset: number, length: number | undefined, size: number): AsyncGenerator<{ offset: number; data: Buffer }> {
    const end = length === undefined ? size : Math.min(size, offset + length);
    const verify = this.#options.verifyReads && offset === 0 && end === size;
    const hash = verify ? createHash("sha256") : undefined;
    let file: FileHandle;
    try {
      file = await open(this.blobPath(digest), "r");
    } catch {
      throw new ConnectError(`blob ${digest} not found`, Code.NotFound);
    }
    try {
      let at = offset;
      while (at < end) {
        const want = Math.min(BLOB_CHUNK_BYTES, end - at);
        const buffer = Buffer.allocUnsafe(want);
        const { bytesRead } = await file.read(buffer, 0, want, at);
        if (bytesRead === 0) break;
        const data = bytesRead === want ? buffer : buffer.subarray(0, bytesRead);
        hash?.update(data);
        // Verify before the last chunk leaves, so a corrupt blob never reads as complete.
        if (hash && at + bytesRead >= end) await this.#checkRead(digest, hash);
        yield { offset: at, data };
        at += bytesRead;
      }
      if (at < end) throw new ConnectError(`blob ${digest} is shorter than its size`, Code.DataLoss);
      if (hash && size === 0) await this.#checkRead(digest, hash);
    } finally {
      await file.close();
    }
  }

  async #checkRead(digest: string, hash: Hash): Promise<void> {
    const actual = digestOf(hash);
    if (actual === digest) return;
    this.#log.error({ digest, actual }, "corrupt blob found on read; removed");
    await this.removeCorrupt(digest);
    throw new ConnectError(`blob ${digest} is corrupt on the store's disk`, Code.DataLoss);
  }

  /** Removes a blob whose bytes do not match its digest. */
  async removeCorrupt(digest: string): Promise<void> {
    await this.#deleteBlob(digest);
    this.onCorrupt?.(digest);
  }

  async #deleteBlob(digest: string): Promise<number> {
    const path = this.blobPath(digest);
    const s = await stat(path).catch(() => undefined);
    if (!s) return 0;
    await rm(path, { force: true });
    this.#usedBytes -= s.size;
    this.#blobCount--;
    await this.#dropHolders(digest);
    return s.size;
  }

  /** Hashes a stored blob; removes it when it does not match (true when it is sound). */
  async verifyBlob(digest: string): Promise<boolean> {
    const hash = createHash("sha256");
    try {
      for await (const chunk of createReadStream(this.blobPath(digest), { highWaterMark: BLOB_CHUNK_BYTES }) as AsyncIterable<Buffer>) {
        hash.update(chunk);
      }
    } catch {
      return false;
    }
    if (digestOf(hash) === digest) return true;
    this.#log.error({ digest }, "corrupt blob found; removed");
    await this.removeCorrupt(digest);
    return false;
  }

  // ---- manifests ----

  getManifestRecord(digest: string): ManifestRecord | undefined {
    return this.#manifests.get(digest);
  }

  manifestRecords(): ManifestRecord[] {
    return [...this.#manifests.values()].sort((a, b) => (a.digest < b.digest ? -1 : a.digest > b.digest ? 1 : 0));
  }

  /** How many stored manifests reference a blob (a manifest references itself). */
  referenceCount(digest: string): number {
    return this.#refs.get(digest) ?? 0;
  }

  /**
   * Stores a manifest: its digest is checked, its form validated, and every
   * blob it references must be present with the declared size and, for a
   * user writer, held by the writer or in `mountable` (blobs of manifests
   * the writer may read). The writer then holds the manifest and the mounted
   * blobs. A blob not held answers PermissionDenied whether it is stored or
   * not, so that no writer learns what another stored. Idempotent.
   */
  putManifest(digest: string, json: Uint8Array, writer: Writer, mountable: ReadonlySet<string> = new Set()): Promise<ManifestRecord> {
    const actual = digestOf(createHash("sha256").update(json));
    if (actual !== digest) {
      return Promise.reject(new ConnectError(`digest mismatch: manifest_json hashes to ${actual}`, Code.InvalidArgument));
    }
    const manifest = parseManifest(json);
    return this.#exclusive(async () => {
      const mounted: string[] = [];
      for (const [blob, size] of manifestBlobs(manifest)) {
        const s = await this.statBlob(blob);
        if (writer !== undefined) {
          const held = s !== undefined && (await this.holds(blob, writer, { legacy: false }));
          if (!held && !(s !== undefined && mountable.has(blob))) {
            throw new ConnectError(
              `blob ${blob} referenced by the manifest is not held by the writer in this store: upload it (PutBlob), ` +
                "or name an image that contains it in mount_tokens",
              Code.PermissionDenied,
            );
          }
          if (!held) mounted.push(blob);
        }
        if (!s) throw new ConnectError(`blob ${blob} referenced by the manifest is not in the store`, Code.FailedPrecondition);
        if (s.size !== size) {
          throw new ConnectError(`blob ${blob} has ${s.size} bytes, the manifest says ${size}`, Code.InvalidArgument);
        }
      }
      const existing = this.#manifests.get(digest);
      if (existing) {
        if (writer !== undefined) await this.addHolder([...mounted, digest], writer);
        return existing;
      }
      if (!(await this.statBlob(digest))) {
        await this.reserve(json.length);
        try {
          const tmp = `${this.#uploadPath(digest)}.manifest.tmp`;
          await atomicWrite(tmp, json);
          await rename(tmp, this.blobPath(digest));
          this.#usedBytes += json.length;
          this.#blobCount++;
        } catch (err) {
          if (isDiskFull(err)) throw new ConnectError("image store is full", Code.ResourceExhausted);
          throw err;
        } finally {
          this.#reserved -= json.length;
        }
      }
      if (writer !== undefined) await this.addHolder([...mounted, digest], writer);
      const record = this.#addRecord(digest, json, this.#clock());
      await this.#writeIndex();
      return record;
    });
  }

  /** The stored bytes of a manifest; verified (a corrupt one is removed: DataLoss). */
  async readManifest(digest: string): Promise<Uint8Array> {
    let json: Buffer;
    try {
      json = await readFile(this.blobPath(digest));
    } catch {
      throw new ConnectError(`manifest ${digest} not found`, Code.NotFound);
    }
    if (digestOf(createHash("sha256").update(json)) !== digest) {
      this.#log.error({ digest }, "corrupt manifest found on read; removed");
      await this.deleteManifest(digest).catch(() => undefined);
      await this.removeCorrupt(digest);
      throw new ConnectError(`manifest ${digest} is corrupt on the store's disk`, Code.DataLoss);
    }
    return json;
  }

  /** Removes a manifest from the index (its blobs stay until collected or evicted). */
  deleteManifest(digest: string): Promise<ManifestRecord> {
    return this.#exclusive(async () => {
      const record = this.#manifests.get(digest);
      if (!record) throw new ConnectError(`manifest ${digest} not found`, Code.NotFound);
      this.#removeRecord(digest);
      await this.#writeIndex();
      return record;
    });
  }

  /**
   * Deletes the given blobs that no manifest references and no upload holds
   * (cache eviction). Returns the bytes freed.
   */
  removeUnreferenced(digests: Iterable<string>): Promise<number> {
    return this.#exclusive(async () => {
      let freed = 0;
      for (const digest of digests) {
        if (this.referenceCount(digest) > 0 || this.#active.has(digest)) continue;
        freed += await this.#deleteBlob(digest);
      }
      return freed;
    });
  }

  /**
   * Mark and sweep: deletes blobs no manifest references whose commit time is
   * older than `graceMs`, and temp files of uploads not in progress that were
   * last written before it.
   */
  async collectGarbage(graceMs: number, dryRun: boolean): Promise<{ blobs: string[]; bytes: number; tempFiles: number }> {
    if (this.#collecting) throw new ConnectError("a garbage collection is already running", Code.Aborted);
    this.#collecting = true;
    try {
      const cutoff = this.#clock() - graceMs;
      const blobs: string[] = [];
      let bytes = 0;
      let tempFiles = 0;
      for (const hex of await readdir(join(this.root, "blobs", "sha256"))) {
        if (!/^[0-9a-f]{64}$/.test(hex)) continue;
        const digest = `sha256:${hex}`;
        await this.#exclusive(async () => {
          // Checked under the lock: a PutManifest cannot reference it meanwhile.
          if (this.referenceCount(digest) > 0) return;
          const s = await this.statBlob(digest);
          if (!s || s.mtimeMs > cutoff) return;
          blobs.push(digest);
          bytes += s.size;
          if (!dryRun) await this.#deleteBlob(digest);
        });
      }
      for (const name of await readdir(join(this.root, "uploads"))) {
        if (name.endsWith(".json")) continue;
        const hex = name.slice(0, 64);
        if (/^[0-9a-f]{64}$/.test(hex) && this.#active.has(`sha256:${hex}`)) continue;
        const path = join(this.root, "uploads", name);
        if (this.#pending.has(path)) continue;
        const s = await stat(path).catch(() => undefined);
        if (!s || s.mtimeMs > cutoff) continue;
        tempFiles++;
        if (dryRun) continue;
        await rm(path, { force: true });
        if (name === hex) {
          await rm(`${path}.json`, { force: true });
          this.#suspended.delete(`sha256:${hex}`);
          this.#usedBytes -= s.size;
        }
      }
      return { blobs, bytes, tempFiles };
    } finally {
      this.#collecting = false;
    }
  }
}

async function hashPrefix(path: string, length: number): Promise<Hash> {
  const hash = createHash("sha256");
  if (length === 0) return hash;
  for await (const chunk of createReadStream(path, { start: 0, end: length - 1, highWaterMark: BLOB_CHUNK_BYTES }) as AsyncIterable<Buffer>) {
    hash.update(chunk);
  }
  return hash;
}

/**
 * Writes a file so that a reader sees the old or the new content, never a
 * part, and a crash keeps one of them: a temp file of its own (concurrent
 * writers never share one), synced, renamed over `path`, the directory
 * synced. Concurrent writes of one path each land whole; the last rename wins.
 */
export async function atomicWrite(path: string, data: string | Uint8Array): Promise<void> {
  const tmp = `${path}.${process.pid}.${randomUUID()}.tmp`;
  try {
    const file = await open(tmp, "w");
    try {
      await file.writeFile(data);
      await file.datasync();
    } finally {
      await file.close();
    }
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  await syncDir(dirname(path));
}

async function syncDir(path: string): Promise<void> {
  const dir = await open(path, "r").catch(() => undefined);
  if (!dir) return;
  await dir.sync().catch(() => undefined);
  await dir.close();
}

