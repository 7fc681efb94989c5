/**
 * Packs a directory as a reproducible gzip-compressed tar (a rootfs layer):
 * entries sorted by name, owner root (0:0), modes and modification times
 * from the files, PAX headers for long names, gzip without a timestamp. The
 * same tree gives the same bytes, hence the same digest, so re-running an
 * interrupted `tml image push DIR` resumes the upload.
 */
import { createReadStream, createWriteStream } from "node:fs";
import { lstat, readdir, readlink } from "node:fs/promises";
import { join } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { createGzip } from "node:zlib";

interface Entry {
  name: string;
  path: string;
  type: "file" | "dir" | "symlink";
  mode: number;
  size: number;
  mtime: number;
  linkname: string;
}

async function walk(root: string, rel: string, out: Entry[], skipped: string[]): Promise<void> {
  const names = (await readdir(join(root, rel))).sort();
  for (const name of names) {
    const relPath = rel === "" ? name : `${rel}/${name}`;
    const path = join(root, relPath);
    const st = await lstat(path);
    const base = { name: relPath, path, mode: st.mode & 0o7777, mtime: Math.floor(st.mtimeMs / 1000), size: 0, linkname: "" };
    if (st.isDirectory()) {
      out.push({ ...base, name: `${relPath}/`, type: "dir" });
      await walk(root, relPath, out, skipped);
    } else if (st.isFile()) out.push({ ...base, type: "file", size: st.size });
    else if (st.isSymbolicLink()) out.push({ ...base, type: "symlink", linkname: await readlink(path) });
    else skipped.push(relPath);
  }
}

function octal(value: number, length: number): string {
  return value.toString(8).padStart(length - 1, "0") + "\0";
}

function header(name: string, entry: Pick<Entry, "mode" | "size" | "mtime" | "linkname">, typeflag: string): Buffer {
  const block = Buffer.alloc(512);
  block.write(name, 0, 100, "utf8");
  block.write(octal(entry.mode, 8), 100, "latin1");
  block.write(octal(0, 8), 108, "latin1");
  block.write(octal(0, 8), 116, "latin1");
  block.write(octal(entry.size, 12), 124, "latin1");
  block.write(octal(entry.mtime, 12), 136, "latin1");
  block.write("        ", 148, "latin1");
  block.write(typeflag, 156, "latin1");
  block.write(entry.linkname, 157, 100, "utf8");
  block.write("ustar\u000000", 257, "latin1");
  block.write("root", 265, "latin1");
  block.write("root", 297, "latin1");
  let sum = 0;
  for (const byte of block) sum += byte;
  block.write(octal(sum, 7) + " ", 148, "latin1");
  return block;
}

function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  let length = Buffer.byteLength(body) + 1;
  while (String(length).length + Buffer.byteLength(body) !== length) length = String(length).length + Buffer.byteLength(body);
  return `${length}${body}`;
}

const pad = (n: number) => Buffer.alloc((512 - (n % 512)) % 512);

async function* tarStream(entries: Entry[]): AsyncGenerator<Buffer> {
  for (const entry of entries) {
    const records: string[] = [];
    if (Buffer.byteLength(entry.name) > 99) records.push(paxRecord("path", entry.name));
    if (Buffer.byteLength(entry.linkname) > 99) records.push(paxRecord("linkpath", entry.linkname));
    if (entry.size > 0o77777777777) records.push(paxRecord("size", String(entry.size)));
    if (records.length > 0) {
      const body = Buffer.from(records.join(""));
      yield header("PaxHeader", { mode: 0o644, size: body.length, mtime: entry.mtime, linkname: "" }, "x");
      yield body;
      yield pad(body.length);
    }
    const typeflag = entry.type === "dir" ? "5" : entry.type === "symlink" ? "2" : "0";
    const size = entry.size > 0o77777777777 ? 0 : entry.size;
    yield header(entry.name.slice(0, 100), { ...entry, size, linkname: entry.linkname.slice(0, 100) }, typeflag);
    if (entry.type === "file") {
      let written = 0;
      for await (const chunk of createReadStream(entry.path) as AsyncIterable<Buffer>) {
        const piece = written + chunk.length > entry.size ? chunk.subarray(0, entry.size - written) : chunk;
        written += piece.length;
        yield piece;
      }
      if (written !== entry.size) throw new Error(`${entry.path} changed size while it was packed`);
      yield pad(entry.size);
    }
  }
  yield Buffer.alloc(1024);
}

/** Packs `dir` into `outFile` (tar+gzip). Returns the paths left out (sockets, devices, fifos). */
export async function packDirectory(dir: string, outFile: string): Promise<{ skipped: string[] }> {
  const entries: Entry[] = [];
  const skipped: string[] = [];
  await walk(dir, "", entries, skipped);
  await pipeline(Readable.from(tarStream(entries)), createGzip({ level: 6 }), createWriteStream(outFile, { mode: 0o600 }));
  return { skipped };
}
