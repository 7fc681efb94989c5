/**
 * Images built offline, for npm start's example images and for tests: a
 * busybox rootfs (Debian's busybox-static, /bin/busybox) packed as a rootfs tar+gzip layer with system tar(1), hand-made
 * layers for hostile archives, and firmware images for the board driver. Each
 * comes with its OCI-style manifest (bytes and digest) so end-to-end tests can
 * push it to a store, and as the `JobImage` the drivers take.
 */

import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { chmod, copyFile, mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { digestFile } from "../lib/image/digest.js";
import { buildManifest } from "../lib/image/manifest.js";
import { FIRMWARE_MEDIA_TYPE, ROOTFS_MEDIA_TYPE } from "../lib/image/media-types.js";
import { padding, tarEnd, tarHeader, type TarWriteEntry } from "../lib/image/tar.js";
import type { ImageLayer, JobImage } from "../supervisor/drivers/driver.js";

const execFileAsync = promisify(execFile);

export const BUSYBOX = "/bin/busybox";

/** An image on local disk: what a driver takes, plus what a store would hold. */
export interface TestImage extends JobImage {
  /** The manifest's JSON bytes (its sha256 is `manifestDigest`). */
  manifestJson: Buffer;
  /** Every blob of the image: digest -> local file. */
  blobs: Map<string, string>;
}

export type FileSpec = string | { content: string | Buffer; mode?: number } | { symlink: string } | { dir: true; mode?: number };

/** Describes a blob file as an image layer. */
export async function layerOf(path: string, mediaType: string, annotations: Record<string, string> = {}): Promise<ImageLayer> {
  const { digest, size } = await digestFile(path);
  return { digest, mediaType, size, annotations, path };
}

/** Builds the manifest for `layers` and returns the whole test image. */
export function imageOf(layers: ImageLayer[], annotations: Record<string, string>): TestImage {
  const { manifestJson, manifestDigest } = buildManifest(layers, annotations);
  return {
    manifestDigest,
    layers,
    annotations,
    manifestJson,
    blobs: new Map(layers.map((l) => [l.digest, l.path])),
  };
}

/** Writes `files` (relative path -> content or link or directory) under `root`. */
export async function writeTree(root: string, files: Record<string, FileSpec>): Promise<void> {
  for (const [rel, spec] of Object.entries(files)) {
    const path = join(root, rel);
    await mkdir(join(path, ".."), { recursive: true });
    if (typeof spec === "string" || "content" in spec) {
      const content = typeof spec === "string" ? spec : spec.content;
      await writeFile(path, content);
      await chmod(path, typeof spec === "string" ? 0o644 : (spec.mode ?? 0o644));
    } else if ("symlink" in spec) {
      await symlink(spec.symlink, path);
    } else {
      await mkdir(path, { recursive: true });
      if (spec.mode !== undefined) await chmod(path, spec.mode);
    }
  }
}

/**
 * Packs a directory as a rootfs tar+gzip layer with system tar (owner root,
 * numeric), as an image built elsewhere would be: with a `./` root entry and
 * tar(1)'s own headers, which the process driver must read as well as it
 * reads lib/image/tar.ts's (what `tml image push DIR` writes).
 */
export async function packWithSystemTar(dir: string, outFile: string): Promise<ImageLayer> {
  await execFileAsync("tar", ["--owner=0", "--group=0", "--numeric-owner", "--sort=name", "-czf", outFile, "-C", dir, "."]);
  return layerOf(outFile, ROOTFS_MEDIA_TYPE);
}

/**
 * A busybox rootfs: /bin/busybox with a link per applet, /etc, /tmp, /root,
 * plus `files`. `entrypoint` becomes the `treadmill.entrypoint` annotation.
 */
export async function buildBusyboxImage(options: {
  dir: string;
  entrypoint?: string[];
  files?: Record<string, FileSpec>;
  title?: string;
}): Promise<TestImage> {
  await mkdir(options.dir, { recursive: true });
  const root = await mkdtemp(join(options.dir, "rootfs-"));
  await mkdir(join(root, "bin"));
  await copyFile(BUSYBOX, join(root, "bin", "busybox"));
  await chmod(join(root, "bin", "busybox"), 0o755);
  const { stdout } = await execFileAsync(BUSYBOX, ["--list"]);
  for (const applet of stdout.split("\n").filter((a) => a !== "" && a !== "busybox")) {
    await symlink("busybox", join(root, "bin", applet));
  }
  await writeTree(root, {
    etc: { dir: true, mode: 0o755 },
    tmp: { dir: true, mode: 0o1777 },
    root: { dir: true, mode: 0o755 },
    "etc/hostname": "treadmill-job\n",
    ...options.files,
  });
  const layer = await packWithSystemTar(root, join(options.dir, `layer-${root.slice(-6)}.tar.gz`));
  await rm(root, { recursive: true, force: true });
  return imageOf([layer], {
    "org.opencontainers.image.title": options.title ?? "busybox",
    "treadmill.driver": "process",
    "treadmill.entrypoint": JSON.stringify(options.entrypoint ?? ["/bin/sh", "-c", "echo hello from busybox"]),
  });
}

/** A member of a hand-made layer (any name, hostile ones included). */
export type RawEntry = TarWriteEntry & { content?: string | Buffer };

/** Writes a tar+gzip layer member by member, without any checks: for hostile archives. */
export async function buildRawLayer(outFile: string, entries: RawEntry[]): Promise<ImageLayer> {
  const parts: Buffer[] = [];
  for (const entry of entries) {
    const content = entry.content === undefined ? Buffer.alloc(0) : Buffer.from(entry.content);
    parts.push(tarHeader({ ...entry, size: entry.type === "file" ? content.length : 0 }));
    if (entry.type === "file") parts.push(content, padding(content.length));
  }
  parts.push(tarEnd());
  await writeFile(outFile, gzipSync(Buffer.concat(parts)));
  return layerOf(outFile, ROOTFS_MEDIA_TYPE);
}

/** A board firmware image: one firmware layer holding `script` (a shell script, for the simulated board). */
export async function buildFirmwareImage(options: { dir: string; script: string; title?: string }): Promise<TestImage> {
  await mkdir(options.dir, { recursive: true });
  const file = join(options.dir, `firmware-${createHash("sha256").update(options.script).digest("hex").slice(0, 12)}.sh`);
  await writeFile(file, options.script);
  const layer = await layerOf(file, FIRMWARE_MEDIA_TYPE, { "org.opencontainers.image.title": "firmware.sh" });
  return imageOf([layer], { "org.opencontainers.image.title": options.title ?? "sim-board firmware", "treadmill.driver": "board" });
}
