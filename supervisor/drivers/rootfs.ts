/**
 * Root file systems of process jobs: rootfs tar+gzip layers unpacked once per
 * digest into a cache, a fresh per-job copy built from them, and snapshots of
 * what a job changed as a new layer.
 *
 * Untrusted archives: every member path is checked before anything touches
 * the disk. Absolute paths and `..` components are rejected, a member is never
 * written through a symbolic link (a link `a -> /etc` followed by `a/passwd`
 * is rejected), relative symlink targets must stay inside the root, and hard
 * links must name a member inside it. Absolute symlink targets are kept: they
 * are resolved against the job's own root inside the sandbox, and nothing on
 * the supervisor's side ever follows a link in a job's tree (copies, chown,
 * removal and snapshots all work on the links themselves).
 *
 * Why a copy and not overlayfs: the job owns its root (files owned by the
 * slot's uid), so a shared, root-owned lower directory would make every image
 * file read-only to it; a copy of a rootfs image is cheap (see docs/drivers.md
 * for the figures) and needs no mount privileges. `cp --reflink=auto` makes it
 * a clone on file systems that support it (btrfs, xfs).
 */

import { createHash, randomBytes } from "node:crypto";
import { execFile } from "node:child_process";
import { constants, createReadStream, createWriteStream } from "node:fs";
import {
  chmod,
  copyFile,
  link,
  lstat,
  lutimes,
  mkdir,
  open,
  readdir,
  readFile,
  readlink,
  rename,
  rm,
  symlink,
  utimes,
  writeFile,
} from "node:fs/promises";
import { join, posix } from "node:path";
import { Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { promisify } from "node:util";
import { createGunzip, createGzip } from "node:zlib";
import type { Logger } from "../../lib/logger.js";
import { ROOTFS_MEDIA_TYPE } from "../../lib/image/media-types.js";
import { DriverError, type ImageLayer, type SnapshotLayer } from "./driver.js";
import { padding, tarEnd, tarHeader, type TarWriteEntry } from "../../lib/image/tar.js";
import { readTar, TarFormatError, type TarHeader } from "./tar.js";

const execFileAsync = promisify(execFile);

/** A path in the archive is not acceptable (escapes the root, goes through a link...). */
export class UnsafeArchiveError extends Error {
  override readonly name = "UnsafeArchiveError";
}

/** A layer unpacked in the cache. */
export interface UnpackedLayer {
  digest: string;
  /** Directory holding the layer's files (whiteouts not materialised). */
  tree: string;
  /** Paths this layer deletes from the layers below (from `.wh.<name>` members). */
  whiteouts: string[];
  /** Directories whose lower contents this layer hides (from `.wh..wh..opq` members). */
  opaque: string[];
  /** Members skipped (devices, fifos: the sandbox provides /dev). */
  skipped: number;
}

/**
 * Normalises an archive path to a relative POSIX path without `.`
 * components; "" is the root. Throws `UnsafeArchiveError` for absolute paths
 * and `..` components.
 */
export function safeRelativePath(name: string): string {
  if (name.includes("\0")) throw new UnsafeArchiveError(`tar member path contains a nul byte`);
  if (name.startsWith("/")) throw new UnsafeArchiveError(`tar member ${JSON.stringify(name)} has an absolute path`);
  const parts = name.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.includes("..")) throw new UnsafeArchiveError(`tar member ${JSON.stringify(name)} has a ".." component`);
  return parts.join("/");
}

/** Throws unless a relative symlink target, seen from `rel`'s directory, stays inside the root. */
function checkSymlinkTarget(rel: string, target: string): void {
  if (target === "" || target.includes("\0")) throw new UnsafeArchiveError(`symbolic link ${rel} has an empty target`);
  if (target.startsWith("/")) return; // Resolved against the job's own root in the sandbox.
  let depth = rel.split("/").length - 1;
  for (const part of target.split("/")) {
    if (part === "..") depth--;
    else if (part !== "" && part !== ".") depth++;
    if (depth < 0) throw new UnsafeArchiveError(`symbolic link ${rel} points outside the root (${target})`);
  }
}

async function lstatOrUndefined(path: string) {
  try {
    return await lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw err;
  }
}

/**
 * Unpacks one (gzip-compressed) rootfs tar into `dest`, which must exist and
 * be empty. Verifies the blob's sha256 against `digest` on the way.
 */
export async function unpackLayer(
  blobPath: string,
  digest: string,
  dest: string,
): Promise<Omit<UnpackedLayer, "tree" | "digest">> {
  const hash = createHash("sha256");
  const hashing = new Transform({
    transform(chunk: Buffer, _enc, done) {
      hash.update(chunk);
      done(null, chunk);
    },
  });
  // `knownDirs` holds directories (relative) this extraction made or checked:
  // their ancestors are real directories, not links.
  const knownDirs = new Set<string>([""]);
  const dirModes = new Map<string, { mode: number; mtime: number }>();
  const whiteouts: string[] = [];
  const opaque: string[] = [];
  let skipped = 0;

  async function ensureDir(rel: string): Promise<void> {
    if (knownDirs.has(rel)) return;
    const parent = posix.dirname(rel) === "." ? "" : posix.dirname(rel);
    await ensureDir(parent);
    const abs = join(dest, rel);
    const st = await lstatOrUndefined(abs);
    if (st === undefined) await mkdir(abs, { mode: 0o755 });
    else if (!st.isDirectory()) {
      throw new UnsafeArchiveError(`tar member path goes through ${rel}, which is not a directory`);
    }
    knownDirs.add(rel);
  }

  async function clear(rel: string): Promise<void> {
    const abs = join(dest, rel);
    const st = await lstatOrUndefined(abs);
    if (st === undefined) return;
    await rm(abs, { recursive: true, force: true });
    for (const d of [...knownDirs]) if (d === rel || d.startsWith(`${rel}/`)) knownDirs.delete(d);
  }

  const onEntry = async (header: TarHeader, content: AsyncIterable<Buffer>): Promise<void> => {
    const rel = safeRelativePath(header.name);
    const base = posix.basename(rel);
    const parent = posix.dirname(rel) === "." ? "" : posix.dirname(rel);
    if (rel === "") {
      if (header.type === "dir") dirModes.set("", { mode: header.mode, mtime: header.mtime });
      return;
    }
    if (base === ".wh..wh..opq") {
      opaque.push(parent);
      await ensureDir(parent);
      return;
    }
    if (base.startsWith(".wh.")) {
      const target = safeRelativePath(posix.join(parent, base.slice(4)));
      if (target === "") throw new UnsafeArchiveError(`whiteout ${JSON.stringify(header.name)} names the root`);
      whiteouts.push(target);
      await ensureDir(parent);
      return;
    }
    await ensureDir(parent);
    const abs = join(dest, rel);
    switch (header.type) {
      case "dir": {
        const st = await lstatOrUndefined(abs);
        if (st !== undefined && !st.isDirectory()) await clear(rel);
        if (st === undefined || !st.isDirectory()) await mkdir(abs, { mode: 0o755 });
        knownDirs.add(rel);
        dirModes.set(rel, { mode: header.mode, mtime: header.mtime });
        return;
      }
      case "file": {
        await clear(rel);
        const fh = await open(abs, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
        try {
          for await (const chunk of content) await fh.write(chunk);
          // setuid/setgid bits are dropped: nothing in a job needs them and
          // the sandbox runs with no_new_privs anyway.
          await fh.chmod(header.mode & 0o1777);
          await fh.utimes(header.mtime, header.mtime);
        } finally {
          await fh.close();
        }
        return;
      }
      case "symlink": {
        checkSymlinkTarget(rel, header.linkname);
        await clear(rel);
        await symlink(header.linkname, abs);
        await lutimes(abs, header.mtime, header.mtime);
        return;
      }
      case "hardlink": {
        const target = safeRelativePath(header.linkname);
        if (target === "") throw new UnsafeArchiveError(`hard link ${rel} points at the root`);
        const targetParent = posix.dirname(target) === "." ? "" : posix.dirname(target);
        if (!knownDirs.has(targetParent)) {
          throw new UnsafeArchiveError(`hard link ${rel} points at ${target}, which is not in the archive`);
        }
        const st = await lstatOrUndefined(join(dest, target));
        if (st === undefined || st.isDirectory()) {
          throw new UnsafeArchiveError(`hard link ${rel} points at ${target}, which is not a file in the archive`);
        }
        await clear(rel);
        await link(join(dest, target), abs);
        return;
      }
      default:
        skipped++;
        return;
    }
  };

  await pipeline(createReadStream(blobPath), hashing, createGunzip(), (tar: AsyncIterable<Buffer>) => readTar(tar, onEntry));
  const actual = `sha256:${hash.digest("hex")}`;
  if (actual !== digest) throw new DriverError("image", `layer ${digest} does not match its digest (got ${actual})`);
  // Directory modes last, deepest first, so a read-only directory does not
  // block its own members.
  for (const [rel, { mode, mtime }] of [...dirModes].sort((a, b) => b[0].length - a[0].length)) {
    await chmod(join(dest, rel), mode & 0o1777);
    await utimes(join(dest, rel), mtime, mtime);
  }
  return { whiteouts, opaque, skipped };
}

/**
 * Unpacked rootfs layers, each digest once, under `dir/<hex>/tree` with the
 * layer's whiteouts in `dir/<hex>/layer.json`. Concurrent requests for one
 * digest share one unpack; an unpack goes to a temporary directory renamed into
 * place only when complete, so a crash leaves no half layer behind.
 */
export class LayerCache {
  private readonly inflight = new Map<string, Promise<UnpackedLayer>>();

  constructor(
    private readonly dir: string,
    private readonly logger: Logger,
  ) {}

  async init(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    await chmod(this.dir, 0o700);
    for (const entry of await readdir(this.dir)) {
      if (entry.startsWith("tmp-")) await rm(join(this.dir, entry), { recursive: true, force: true });
    }
  }

  /** The layer unpacked, from the cache or now. */
  get(layer: ImageLayer): Promise<UnpackedLayer> {
    if (layer.mediaType !== ROOTFS_MEDIA_TYPE) {
      return Promise.reject(new DriverError("image", `layer ${layer.digest} has media type ${layer.mediaType}, not ${ROOTFS_MEDIA_TYPE}`));
    }
    if (!/^sha256:[0-9a-f]{64}$/.test(layer.digest)) {
      return Promise.reject(new DriverError("image", `layer digest ${JSON.stringify(layer.digest)} is not sha256:<hex>`));
    }
    let pending = this.inflight.get(layer.digest);
    if (pending === undefined) {
      pending = this.load(layer).finally(() => this.inflight.delete(layer.digest));
      this.inflight.set(layer.digest, pending);
    }
    return pending;
  }

  private async load(layer: ImageLayer): Promise<UnpackedLayer> {
    const hex = layer.digest.slice("sha256:".length);
    const home = join(this.dir, hex);
    try {
      const meta = JSON.parse(await readFile(join(home, "layer.json"), "utf8")) as Omit<UnpackedLayer, "tree">;
      return { ...meta, tree: join(home, "tree") };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
    const tmp = join(this.dir, `tmp-${hex}-${randomBytes(4).toString("hex")}`);
    await mkdir(join(tmp, "tree"), { recursive: true, mode: 0o700 });
    const started = performance.now();
    try {
      const result = await unpackLayer(layer.path, layer.digest, join(tmp, "tree"));
      const meta = { digest: layer.digest, ...result };
      await writeFile(join(tmp, "layer.json"), JSON.stringify(meta));
      await rename(tmp, home);
      this.logger.info(
        { digest: layer.digest, durationMs: Math.round(performance.now() - started), skipped: result.skipped },
        "layer unpacked",
      );
      return { ...meta, tree: join(home, "tree") };
    } catch (err) {
      await rm(tmp, { recursive: true, force: true });
      if (err instanceof UnsafeArchiveError || err instanceof TarFormatError) {
        throw new DriverError("image", `layer ${layer.digest} rejected: ${err.message}`, { cause: err });
      }
      if (err instanceof DriverError) throw err;
      if ((err as NodeJS.ErrnoException).code === "Z_DATA_ERROR" || (err as NodeJS.ErrnoException).code === "Z_BUF_ERROR") {
        throw new DriverError("image", `layer ${layer.digest} is not valid gzip`, { cause: err });
      }
      throw err;
    }
  }
}

/** `rel`'s path under `root` if every ancestor is a real directory; undefined otherwise. */
async function resolveInside(root: string, rel: string): Promise<string | undefined> {
  const parts = rel.split("/");
  let cur = root;
  for (const part of parts.slice(0, -1)) {
    cur = join(cur, part);
    const st = await lstatOrUndefined(cur);
    if (st === undefined || !st.isDirectory()) return undefined;
  }
  return join(root, rel);
}

/** Copies `src` (a layer tree) over `dest`, never following a link on either side. */
async function mergeTree(src: string, dest: string): Promise<void> {
  for (const entry of await readdir(src, { withFileTypes: true })) {
    const s = join(src, entry.name);
    const d = join(dest, entry.name);
    const existing = await lstatOrUndefined(d);
    const st = await lstat(s);
    if (entry.isDirectory()) {
      if (existing !== undefined && !existing.isDirectory()) await rm(d, { recursive: true, force: true });
      if (existing === undefined || !existing.isDirectory()) await mkdir(d, { mode: 0o700 });
      await mergeTree(s, d);
      await chmod(d, st.mode & 0o7777);
      await utimes(d, st.atime, st.mtime);
      continue;
    }
    if (existing !== undefined) await rm(d, { recursive: true, force: true });
    if (entry.isSymbolicLink()) {
      await symlink(await readlink(s), d);
      await lutimes(d, st.atime, st.mtime);
    } else if (entry.isFile()) {
      await copyFile(s, d, constants.COPYFILE_FICLONE);
      await chmod(d, st.mode & 0o7777);
      await utimes(d, st.atime, st.mtime);
    }
  }
}

/**
 * Builds a job's root in `dest` (which must not exist) from unpacked layers,
 * bottom first, applying each layer's whiteouts, then gives the whole tree to
 * `owner` (without following links).
 */
export async function composeRootfs(
  layers: UnpackedLayer[],
  dest: string,
  owner?: { uid: number; gid: number },
): Promise<void> {
  const [first, ...rest] = layers;
  if (first === undefined) throw new DriverError("image", "image has no rootfs layer");
  await mkdir(dest, { mode: 0o755 });
  // The bottom layer into an empty directory: cp -a is safe (no links in the
  // destination yet) and fast, and clones where the file system can.
  await execFileAsync("cp", ["-a", "--reflink=auto", "--no-preserve=ownership", `${first.tree}/.`, `${dest}/`]);
  for (const layer of rest) {
    for (const dir of layer.opaque) {
      const abs = dir === "" ? dest : await resolveInside(dest, dir);
      if (abs === undefined) continue;
      const st = await lstatOrUndefined(abs);
      if (st?.isDirectory()) {
        for (const child of await readdir(abs)) await rm(join(abs, child), { recursive: true, force: true });
      }
    }
    for (const path of layer.whiteouts) {
      const abs = await resolveInside(dest, path);
      if (abs !== undefined) await rm(abs, { recursive: true, force: true });
    }
    await mergeTree(layer.tree, dest);
  }
  if (owner !== undefined) {
    // -h: change links themselves, never what they point at.
    await execFileAsync("chown", ["-R", "-h", `${owner.uid}:${owner.gid}`, dest]);
  }
}

interface EntryInfo {
  type: "file" | "dir" | "symlink" | "other";
  mode: number;
  size: bigint;
  mtimeNs: bigint;
  link?: string;
}

async function info(path: string): Promise<EntryInfo | undefined> {
  let st;
  try {
    st = await lstat(path, { bigint: true });
  } catch {
    return undefined;
  }
  const type = st.isFile() ? "file" : st.isDirectory() ? "dir" : st.isSymbolicLink() ? "symlink" : "other";
  return {
    type,
    mode: Number(st.mode & 0o7777n),
    size: st.size,
    mtimeNs: st.mtimeNs,
    link: type === "symlink" ? await readlink(path) : undefined,
  };
}

/** The merged view of the image's layers: relative path -> where the entry lives. */
async function lowerView(layers: UnpackedLayer[]): Promise<Map<string, string>> {
  const view = new Map<string, string>();
  const dropUnder = (rel: string, self: boolean) => {
    for (const key of [...view.keys()]) {
      if ((self && key === rel) || key.startsWith(rel === "" ? "" : `${rel}/`)) view.delete(key);
    }
  };
  for (const layer of layers) {
    for (const dir of layer.opaque) dropUnder(dir, false);
    for (const path of layer.whiteouts) dropUnder(path, true);
    const walk = async (rel: string): Promise<void> => {
      for (const entry of await readdir(join(layer.tree, rel), { withFileTypes: true })) {
        const child = rel === "" ? entry.name : `${rel}/${entry.name}`;
        if (!entry.isDirectory()) dropUnder(child, false); // A non-directory hides a lower directory's contents.
        view.set(child, join(layer.tree, child));
        if (entry.isDirectory()) await walk(child);
      }
    };
    await walk("");
  }
  return view;
}

function same(a: EntryInfo, b: EntryInfo): boolean {
  if (a.type !== b.type || a.mode !== b.mode) return false;
  if (a.type === "file") return a.size === b.size && a.mtimeNs === b.mtimeNs;
  if (a.type === "symlink") return a.link === b.link;
  return true;
}

/** Reads exactly `size` bytes of a file (zero-padded if it shrank), never following a link. */
async function* fileBytes(path: string, size: number): AsyncGenerator<Buffer> {
  let left = size;
  const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    const buf = Buffer.alloc(256 * 1024);
    while (left > 0) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, left));
      if (bytesRead === 0) break;
      left -= bytesRead;
      yield Buffer.from(buf.subarray(0, bytesRead));
    }
  } finally {
    await fh.close();
  }
  if (left > 0) yield Buffer.alloc(left);
}

/**
 * Writes what the job changed in `rootfs` relative to its image's layers as a
 * rootfs tar+gzip layer: new and modified entries, and a whiteout for each
 * deleted one. Paths under `exclude` (relative, e.g. `run/treadmill` where
 * secrets live) are left out entirely.
 */
export async function snapshotRootfs(
  layers: UnpackedLayer[],
  rootfs: string,
  outFile: string,
  exclude: string[],
): Promise<SnapshotLayer> {
  const lower = await lowerView(layers);
  const excluded = (rel: string) => exclude.some((e) => rel === e || rel.startsWith(`${e}/`));

  async function* entries(): AsyncGenerator<Buffer> {
    async function* walk(rel: string): AsyncGenerator<Buffer> {
      const names = (await readdir(rel === "" ? rootfs : join(rootfs, rel))).sort();
      const present = new Set(names);
      // Deletions: lower entries directly in this directory that are gone.
      const prefix = rel === "" ? "" : `${rel}/`;
      for (const key of lower.keys()) {
        if (!key.startsWith(prefix)) continue;
        const name = key.slice(prefix.length);
        if (name.includes("/") || present.has(name) || excluded(key)) continue;
        yield tarHeader({ name: `${prefix}.wh.${name}`, type: "file", mode: 0o644, mtime: 0, size: 0 });
      }
      for (const name of names) {
        const child = `${prefix}${name}`;
        if (excluded(child)) continue;
        const abs = join(rootfs, child);
        const mine = await info(abs);
        if (mine === undefined || mine.type === "other") continue;
        const from = lower.get(child);
        const theirs = from === undefined ? undefined : await info(from);
        const changed = theirs === undefined || !same(mine, theirs);
        const mtime = Number(mine.mtimeNs / 1_000_000_000n);
        if (mine.type === "dir") {
          if (changed) yield tarHeader({ name: `${child}/`, type: "dir", mode: mine.mode, mtime });
          yield* walk(child);
        } else if (changed && mine.type === "symlink") {
          yield tarHeader({ name: child, type: "symlink", mode: 0o777, mtime, linkname: mine.link! });
        } else if (changed && mine.type === "file") {
          const size = Number(mine.size);
          const entry: TarWriteEntry = { name: child, type: "file", mode: mine.mode, mtime, size };
          yield tarHeader(entry);
          yield* fileBytes(abs, size);
          yield padding(size);
        }
      }
    }
    yield* walk("");
    yield tarEnd();
  }

  const hash = createHash("sha256");
  let size = 0;
  const counting = new Transform({
    transform(chunk: Buffer, _enc, done) {
      hash.update(chunk);
      size += chunk.length;
      done(null, chunk);
    },
  });
  await pipeline(entries(), createGzip(), counting, createWriteStream(outFile, { mode: 0o600 }));
  return { mediaType: ROOTFS_MEDIA_TYPE, digest: `sha256:${hash.digest("hex")}`, size, path: outFile };
}
