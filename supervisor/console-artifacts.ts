/**
 * Artifacts sent over a job's console (docs/artifacts.md, "Boards and
 * VMs"): for a host without a directory the supervisor can read (a board,
 * a VM), the workload prints each file as lines on its console, which the
 * supervisor decodes into a spool directory while the job runs and uploads
 * when it ends, like a process job's artifacts directory:
 *
 *   TREADMILL_ARTIFACT <name> <base64 of the next bytes>     (any number)
 *   TREADMILL_ARTIFACT_END <name> <sha256 hex of the whole file>
 *
 * A line is decoded on its own (so `base64 FILE`'s lines, each a multiple of
 * four characters, work as they are); a carriage return at its end is
 * dropped (serial consoles). A file counts only once its end line came and
 * its bytes match the sha256 there; one without an end line, one whose
 * bytes differ (the line was garbled), and one over a cap are skipped with
 * why. A name sent again after its end replaces the file. The lines stay in
 * the console log like any other output.
 */
import { createHash, type Hash } from "node:crypto";
import { mkdir, open, rename, rm, type FileHandle } from "node:fs/promises";
import { dirname, join } from "node:path";
import type { ArtifactTarget, SkippedArtifactSchema } from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { formatBytes } from "../lib/bytes.js";

type Skipped = MessageInitShape<typeof SkippedArtifactSchema>;

const DATA = /^TREADMILL_ARTIFACT (\S+) ([A-Za-z0-9+/]*={0,2})$/;
const END = /^TREADMILL_ARTIFACT_END (\S+) ([0-9a-f]{64})$/;
/** Longest console line looked at (a protocol line is far shorter). */
const MAX_LINE = 64 * 1024;

interface Receiving {
  part: string;
  file: FileHandle | undefined;
  hash: Hash;
  size: number;
  /** Set when it went over a cap: the rest is ignored, the file skipped. */
  over?: string;
}

/** Whether `name` is an artifact name (coordinator/jobs/artifacts.ts isArtifactName, the same rule). */
function goodName(name: string): boolean {
  return name.length <= 1024 && name.split("/").every((p) => p !== "" && p !== "." && p !== "..");
}

/** Decodes console artifact lines of one job attempt into `dir` (files/ once complete). */
export class ConsoleArtifacts {
  private pending = "";
  private readonly receiving = new Map<string, Receiving>();
  private readonly done = new Map<string, number>();
  private readonly skipped = new Map<string, Skipped>();
  /** Writes in order, one at a time (output arrives synchronously). */
  private chain: Promise<void> = Promise.resolve();
  private partCount = 0;

  constructor(
    /** A directory of the supervisor's own, removed by `cleanup`. */
    readonly dir: string,
    private readonly caps: Pick<ArtifactTarget, "maxFileBytes" | "maxJobBytes" | "maxFiles">,
  ) {}

  /** Where complete files are (the root to upload). */
  get filesDir(): string {
    return join(this.dir, "files");
  }

  /** Console bytes of the job, in order. */
  write(bytes: Buffer): void {
    this.pending += bytes.toString("latin1");
    let nl: number;
    while ((nl = this.pending.indexOf("\n")) >= 0) {
      const line = this.pending.slice(0, nl).replace(/\r$/, "");
      this.pending = this.pending.slice(nl + 1);
      if (line.startsWith("TREADMILL_ARTIFACT")) this.line(line);
    }
    if (this.pending.length > MAX_LINE) this.pending = "";
  }

  private line(line: string): void {
    const data = DATA.exec(line);
    if (data && goodName(data[1])) {
      const [, name, b64] = data;
      const bytes = Buffer.from(b64, "base64");
      this.enqueue(name, () => this.append(name, bytes));
      return;
    }
    const end = END.exec(line);
    if (end && goodName(end[1])) {
      const [, name, hex] = end;
      this.enqueue(name, () => this.end(name, hex));
    }
  }

  /** Runs `step` after the steps before it; a failed write skips the file, never the job. */
  private enqueue(name: string, step: () => Promise<void>): void {
    this.chain = this.chain.then(step).catch((err: unknown) => {
      const r = this.receiving.get(name);
      if (r) r.over = `could not be written: ${err instanceof Error ? err.message : String(err)}`;
    });
  }

  private jobBytes(): number {
    let total = 0;
    for (const size of this.done.values()) total += size;
    for (const r of this.receiving.values()) total += r.size;
    return total;
  }

  private async append(name: string, bytes: Buffer): Promise<void> {
    let r = this.receiving.get(name);
    if (!r) {
      await mkdir(join(this.dir, "partial"), { recursive: true, mode: 0o700 });
      r = { part: join(this.dir, "partial", String(++this.partCount)), file: undefined, hash: createHash("sha256"), size: 0 };
      r.file = await open(r.part, "w", 0o600);
      this.receiving.set(name, r);
      this.skipped.delete(name);
    }
    if (r.over) return;
    const maxFile = Number(this.caps.maxFileBytes);
    const maxJob = Number(this.caps.maxJobBytes);
    if (r.size + bytes.length > maxFile) r.over = `larger than the per-file cap of ${formatBytes(maxFile)}`;
    else if (this.jobBytes() + bytes.length > maxJob) r.over = `over the per-job cap of ${formatBytes(maxJob)}`;
    if (r.over) {
      await r.file?.close();
      r.file = undefined;
      await rm(r.part, { force: true });
      return;
    }
    r.hash.update(bytes);
    r.size += bytes.length;
    await r.file!.write(bytes);
  }

  private async end(name: string, hex: string): Promise<void> {
    const r = this.receiving.get(name);
    if (!r) return;
    this.receiving.delete(name);
    await r.file?.close();
    const skip = (reason: string): void => void this.skipped.set(name, { name, sizeBytes: BigInt(r.size), reason });
    if (r.over) return skip(r.over);
    if (r.hash.digest("hex") !== hex) {
      await rm(r.part, { force: true });
      return skip("garbled on the console (its bytes do not match the sha256 of its end line)");
    }
    if (!this.done.has(name) && this.done.size >= this.caps.maxFiles) {
      await rm(r.part, { force: true });
      return skip(`over the cap of ${this.caps.maxFiles} files`);
    }
    const path = join(this.filesDir, ...name.split("/"));
    await mkdir(dirname(path), { recursive: true, mode: 0o700 });
    await rename(r.part, path);
    this.done.set(name, r.size);
  }

  /** Waits for every line so far; what never got its end line is skipped. */
  async finish(): Promise<Skipped[]> {
    await this.chain;
    for (const [name, r] of this.receiving) {
      await r.file?.close();
      this.skipped.set(name, { name, sizeBytes: BigInt(r.size), reason: r.over ?? "incomplete on the console (no TREADMILL_ARTIFACT_END line)" });
    }
    this.receiving.clear();
    return [...this.skipped.values()];
  }

  /** Removes the spool. Idempotent. */
  async cleanup(): Promise<void> {
    await this.chain.catch(() => undefined);
    await rm(this.dir, { recursive: true, force: true });
  }
}
