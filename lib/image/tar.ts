/**
 * The one tar writer of image layers (POSIX ustar with pax headers): member
 * headers for code that streams its own archive (a process job's snapshot,
 * the testbed's hand-made layers), and `packDirectory`, which packs a
 * directory as a reproducible rootfs layer (`tml image push DIR`). Owner
 * root (0:0); a name or link target that does not fit ustar, or is not
 * printable ASCII, goes in a pax header. Reading archives is the process
 * driver's (supervisor/drivers/tar.ts), which checks every path first.
 */
import { createReadStream, createWriteStream } from "node:fs";
import { lstat, readdir, readlink } from "node:fs/promises";
import { join } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { createGzip } from "node:zlib";

/** Bytes per tar block. */
export const TAR_BLOCK = 512;
const BLOCK = TAR_BLOCK;

/** A member to write; `content` is required for files of non-zero size. */
export interface TarWriteEntry {
  name: string;
  type: "file" | "dir" | "symlink" | "hardlink";
  mode: number;
  mtime: number;
  size?: number;
  linkname?: string;
}

function octal(value: number, length: number): string {
  return value.toString(8).padStart(length - 1, "0") + "\0";
}

function paxRecord(key: string, value: string): Buffer {
  const body = ` ${key}=${value}\n`;
  let len = Buffer.byteLength(body) + 1;
  while (String(len).length + Buffer.byteLength(body) !== len) len = String(len).length + Buffer.byteLength(body);
  return Buffer.from(`${len}${body}`);
}

function rawHeader(entry: TarWriteEntry, typeflag: string, name: string, linkname: string, size: number): Buffer {
  const block = Buffer.alloc(BLOCK);
  block.write(name, 0, 100, "utf8");
  block.write(octal(entry.mode & 0o7777, 8), 100, "latin1");
  block.write(octal(0, 8), 108, "latin1");
  block.write(octal(0, 8), 116, "latin1");
  block.write(octal(size, 12), 124, "latin1");
  block.write(octal(Math.max(0, Math.floor(entry.mtime)), 12), 136, "latin1");
  block.write("        ", 148, "latin1");
  block.write(typeflag, 156, "latin1");
  block.write(linkname, 157, 100, "utf8");
  block.write("ustar\0", 257, "latin1");
  block.write("00", 263, "latin1");
  block.write("root", 265, "latin1");
  block.write("root", 297, "latin1");
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += block[i]!;
  block.write(octal(sum, 7) + " ", 148, "latin1");
  return block;
}

/**
 * Encodes one member's header block(s): a pax header first when the name or
 * link target does not fit ustar's fields or the size exceeds 8 GiB.
 */
export function tarHeader(entry: TarWriteEntry): Buffer {
  const flag = { file: "0", dir: "5", symlink: "2", hardlink: "1" }[entry.type];
  const size = entry.type === "file" ? (entry.size ?? 0) : 0;
  const linkname = entry.linkname ?? "";
  const records: Buffer[] = [];
  const fits = (s: string) => Buffer.byteLength(s) < 100 && /^[\x20-\x7e]*$/.test(s);
  let name = entry.name;
  if (!fits(name)) {
    records.push(paxRecord("path", name));
    name = Buffer.from(name).subarray(0, 99).toString("latin1").replace(/[^\x20-\x7e]/g, "_");
  }
  let link = linkname;
  if (!fits(link)) {
    records.push(paxRecord("linkpath", link));
    link = "";
  }
  if (size >= 8 ** 11) records.push(paxRecord("size", String(size)));
  const blocks: Buffer[] = [];
  if (records.length > 0) {
    const body = Buffer.concat(records);
    blocks.push(rawHeader({ ...entry, mode: 0o644 }, "x", "PaxHeader", "", body.length), body, padding(body.length));
  }
  blocks.push(rawHeader(entry, flag, name, link, size >= 8 ** 11 ? 0 : size));
  return Buffer.concat(blocks);
}

/** Zero bytes to pad `size` bytes of content to a whole block. */
export function padding(size: number): Buffer {
  return Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK);
}

/** The end-of-archive marker: two zero blocks. */
export function tarEnd(): Buffer {
  return Buffer.alloc(BLOCK * 2);
}

/** A member of a directory being packed, with where its content is. */
interface PackEntry extends TarWriteEntry {
  path: string;
}

async function walk(root: string, rel: string, out: PackEntry[], skipped: string[]): Promise<void> {
  const names = (await readdir(join(root, rel))).sort();
  for (const name of names) {
    const relPath = rel === "" ? name : `${rel}/${name}`;
    const path = join(root, relPath);
    const st = await lstat(path);
    const base = { name: relPath, path, mode: st.mode & 0o7777, mtime: Math.floor(st.mtimeMs / 1000) };
    if (st.isDirectory()) {
      out.push({ ...base, name: `${relPath}/`, type: "dir" });
      await walk(root, relPath, out, skipped);
    } else if (st.isFile()) out.push({ ...base, type: "file", size: st.size });
    else if (st.isSymbolicLink()) out.push({ ...base, type: "symlink", linkname: await readlink(path) });
    else skipped.push(relPath);
  }
}

async function* tarStream(entries: PackEntry[]): AsyncGenerator<Buffer> {
  for (const entry of entries) {
    yield tarHeader(entry);
    if (entry.type !== "file") continue;
    const size = entry.size ?? 0;
    let written = 0;
    for await (const chunk of createReadStream(entry.path) as AsyncIterable<Buffer>) {
      const piece = written + chunk.length > size ? chunk.subarray(0, size - written) : chunk;
      written += piece.length;
      yield piece;
    }
    if (written !== size) throw new Error(`${entry.path} changed size while it was packed`);
    yield padding(size);
  }
  yield tarEnd();
}

/**
 * Packs `dir` into `outFile` as a rootfs layer (tar+gzip): entries sorted by
 * name, modes and modification times from the files, gzip without a
 * timestamp. The same tree gives the same bytes, hence the same digest, so
 * re-running an interrupted push resumes its upload. Returns the paths left
 * out (sockets, devices, fifos).
 */
export async function packDirectory(dir: string, outFile: string): Promise<{ skipped: string[] }> {
  const entries: PackEntry[] = [];
  const skipped: string[] = [];
  await walk(dir, "", entries, skipped);
  await pipeline(Readable.from(tarStream(entries)), createGzip({ level: 6 }), createWriteStream(outFile, { mode: 0o600 }));
  return { skipped };
}
