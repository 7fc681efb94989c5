/**
 * A small tar reader (POSIX ustar with pax and GNU long-name extensions),
 * enough for rootfs layers. Written here rather than shelling out to tar(1)
 * so that every path of an untrusted archive passes our own checks before
 * anything touches the disk (see rootfs.ts). The writer is lib/image/tar.ts.
 */
import { TAR_BLOCK as BLOCK } from "../../lib/image/tar.js";

/** One archive member as the reader yields it. */
export interface TarHeader {
  /** The member's path exactly as the archive names it (pax/GNU long names applied). */
  name: string;
  /** `file`, `dir`, `symlink`, `hardlink`, or `other` (devices, fifos, unknown types). */
  type: "file" | "dir" | "symlink" | "hardlink" | "other";
  /** The raw type flag, for messages about `other` members. */
  typeflag: string;
  /** Permission bits (0o7777). */
  mode: number;
  /** Content size in bytes (0 for anything but files). */
  size: number;
  /** Modification time, seconds since the epoch. */
  mtime: number;
  /** Symbolic link target, or the archive path a hard link points to. */
  linkname: string;
}

/** The archive is not a well-formed tar: truncated, bad checksum, bad number. */
export class TarFormatError extends Error {
  override readonly name = "TarFormatError";
}

/** Pulls exact byte counts out of an async stream of chunks. */
class ByteReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private readonly it: AsyncIterator<Buffer | string>;
  private done = false;

  constructor(source: AsyncIterable<Buffer | string>) {
    this.it = source[Symbol.asyncIterator]();
  }

  /** Ensures `n` bytes are buffered; false at a clean end of input. */
  private async fill(n: number): Promise<boolean> {
    while (this.buffered < n && !this.done) {
      const next = await this.it.next();
      if (next.done) {
        this.done = true;
        break;
      }
      const chunk = typeof next.value === "string" ? Buffer.from(next.value) : next.value;
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    return this.buffered >= n;
  }

  /** Exactly `n` bytes, or undefined at end of input with nothing buffered. */
  async read(n: number): Promise<Buffer | undefined> {
    if (!(await this.fill(n))) {
      if (this.buffered === 0) return undefined;
      throw new TarFormatError("archive is truncated");
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }

  /** Yields up to `n` bytes in the chunks they arrive in. */
  async *stream(n: number): AsyncGenerator<Buffer> {
    let left = n;
    while (left > 0) {
      if (this.buffered === 0 && !(await this.fill(1))) throw new TarFormatError("archive is truncated");
      const head = this.chunks[0]!;
      if (head.length <= left) {
        this.chunks.shift();
        this.buffered -= head.length;
        left -= head.length;
        yield head;
      } else {
        this.chunks[0] = head.subarray(left);
        this.buffered -= left;
        yield head.subarray(0, left);
        left = 0;
      }
    }
  }

  /** Consumes the rest of the input (so a hash over the source sees all of it). */
  async drain(): Promise<void> {
    this.chunks = [];
    this.buffered = 0;
    while (!this.done) if ((await this.it.next()).done) this.done = true;
  }

  async skip(n: number): Promise<void> {
    for await (const chunk of this.stream(n)) void chunk;
  }
}

function cstring(buf: Buffer, start: number, length: number): string {
  const field = buf.subarray(start, start + length);
  const end = field.indexOf(0);
  return field.subarray(0, end === -1 ? length : end).toString("utf8");
}

function number(buf: Buffer, start: number, length: number, field: string): number {
  const raw = buf.subarray(start, start + length);
  if (raw[0]! & 0x80) {
    // GNU base-256: big-endian two's complement with the top bit as a marker.
    let value = 0;
    for (let i = 1; i < raw.length; i++) value = value * 256 + raw[i]!;
    if (!Number.isSafeInteger(value)) throw new TarFormatError(`tar header ${field} is out of range`);
    return value;
  }
  const text = raw.toString("latin1").replace(/\0.*$/s, "").trim();
  if (text === "") return 0;
  if (!/^[0-7]+$/.test(text)) throw new TarFormatError(`tar header ${field} is not an octal number`);
  return parseInt(text, 8);
}

function checksumOk(block: Buffer): boolean {
  const stored = number(block, 148, 8, "checksum");
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : block[i]!;
  return sum === stored;
}

function parsePax(data: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let pos = 0;
  while (pos < data.length) {
    const space = data.indexOf(0x20, pos);
    if (space === -1) break;
    const len = parseInt(data.subarray(pos, space).toString("latin1"), 10);
    if (!Number.isSafeInteger(len) || len <= 0 || pos + len > data.length) {
      throw new TarFormatError("pax header record is malformed");
    }
    const record = data.subarray(space + 1, pos + len - 1).toString("utf8");
    const eq = record.indexOf("=");
    if (eq > 0) out[record.slice(0, eq)] = record.slice(eq + 1);
    pos += len;
  }
  return out;
}

const TYPES: Record<string, TarHeader["type"]> = {
  "0": "file",
  "\0": "file",
  "7": "file",
  "1": "hardlink",
  "2": "symlink",
  "5": "dir",
};

/**
 * Reads a (decompressed) tar stream. For each member, `onEntry` gets the
 * header and, for files, an async iterable of the content it must consume
 * fully before returning (or not at all: the rest is skipped).
 */
export async function readTar(
  source: AsyncIterable<Buffer | string>,
  onEntry: (header: TarHeader, content: AsyncIterable<Buffer>) => Promise<void>,
): Promise<void> {
  const reader = new ByteReader(source);
  let pax: Record<string, string> = {};
  let longName: string | undefined;
  let longLink: string | undefined;
  for (;;) {
    const block = await reader.read(BLOCK);
    if (block === undefined) return; // No end-of-archive marker; tolerated like GNU tar.
    if (block.every((b) => b === 0)) return reader.drain();
    if (!checksumOk(block)) throw new TarFormatError("tar header checksum mismatch");
    const typeflag = String.fromCharCode(block[156]!);
    let size = number(block, 124, 12, "size");
    if (pax.size !== undefined) size = Number(pax.size);
    if (!Number.isSafeInteger(size) || size < 0) throw new TarFormatError("tar member size is invalid");
    const padded = Math.ceil(size / BLOCK) * BLOCK;

    if (typeflag === "x" || typeflag === "g" || typeflag === "L" || typeflag === "K") {
      if (size > 1024 * 1024) throw new TarFormatError("tar extended header is larger than 1 MiB");
      const data = (await reader.read(padded)) ?? Buffer.alloc(0);
      const body = data.subarray(0, size);
      if (typeflag === "x") pax = { ...pax, ...parsePax(body) };
      else if (typeflag === "L") longName = cstring(body, 0, body.length);
      else if (typeflag === "K") longLink = cstring(body, 0, body.length);
      // "g" (global) carries nothing we use.
      continue;
    }

    const magic = block.subarray(257, 263).toString("latin1");
    const prefix = magic.startsWith("ustar") ? cstring(block, 345, 155) : "";
    const baseName = cstring(block, 0, 100);
    const header: TarHeader = {
      name: pax.path ?? longName ?? (prefix !== "" ? `${prefix}/${baseName}` : baseName),
      type: TYPES[typeflag] ?? "other",
      typeflag,
      mode: number(block, 100, 8, "mode") & 0o7777,
      size: TYPES[typeflag] === "file" ? size : 0,
      mtime: pax.mtime !== undefined ? Math.floor(Number(pax.mtime)) : number(block, 136, 12, "mtime"),
      linkname: pax.linkpath ?? longLink ?? cstring(block, 157, 100),
    };
    pax = {};
    longName = undefined;
    longLink = undefined;

    let consumed = 0;
    const content: AsyncIterable<Buffer> = {
      [Symbol.asyncIterator]: async function* () {
        for await (const chunk of reader.stream(header.size)) {
          consumed += chunk.length;
          yield chunk;
        }
      },
    };
    await onEntry(header, content);
    await reader.skip(size - consumed);
    await reader.skip(padded - size);
  }
}
