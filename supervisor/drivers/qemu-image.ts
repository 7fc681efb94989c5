/**
 * VM images for the qemu driver (DESIGN.md §6, docs/qemu.md): which layers of
 * a manifest are disks, kernel and initrd, and in which order the disks form
 * one backing chain. Pure apart from reading each disk's first bytes.
 *
 * A VM image's disk layers are qcow2 (or, at the bottom only, raw) blobs.
 * Every disk layer but the bottom one names the digest of the layer below it
 * in its `treadmill.disk.lower` annotation, and its own qcow2 header names
 * that digest as its backing file (`qemu-img rebase -u -b sha256:...`): a
 * path would mean nothing on another host. The driver never follows the
 * backing names inside the blobs: it states the whole chain to QEMU with
 * `-blockdev`, each node pointing at the blob where the site cache keeps it.
 */

import { open } from "node:fs/promises";
import {
  INITRD_MEDIA_TYPE,
  KERNEL_MEDIA_TYPE,
  QCOW2_MEDIA_TYPE,
  RAW_MEDIA_TYPE,
} from "../../lib/image/media-types.js";
import { DriverError, type ImageLayer, type JobImage } from "./driver.js";

/** Layer annotation of a qcow2 layer: the digest of the disk layer it is based on. */
export const LOWER_ANNOTATION = "treadmill.disk.lower";
/** Kernel layer (or manifest) annotation: the kernel command line for direct boot. */
export const CMDLINE_ANNOTATION = "treadmill.kernel.cmdline";

export type DiskFormat = "qcow2" | "raw";

/** One disk of the chain, bottom first. */
export interface ChainLink {
  layer: ImageLayer;
  format: DiskFormat;
  /** The disk's size as the guest sees it, in bytes. */
  virtualSize: number;
  /** The QEMU block node name (`layer0` at the bottom). */
  nodeName: string;
}

/** How to boot a VM image. */
export interface VmPlan {
  /** The disk chain, bottom first; the job's overlay goes on top of the last one. */
  chain: ChainLink[];
  kernel?: ImageLayer;
  initrd?: ImageLayer;
  /** The kernel command line (direct boot only). */
  cmdline?: string;
}

/** What the first bytes of a disk blob say. */
export interface DiskHeader {
  format: DiskFormat;
  virtualSize: number;
  /** Whether a qcow2 header names a backing file. */
  hasBacking: boolean;
}

const QCOW2_MAGIC = 0x514649fb;

/** Parses a qcow2 header (its first 32 bytes); undefined when it is not one. */
export function parseQcow2Header(head: Buffer): { version: number; hasBacking: boolean; virtualSize: number } | undefined {
  if (head.length < 32 || head.readUInt32BE(0) !== QCOW2_MAGIC) return undefined;
  return {
    version: head.readUInt32BE(4),
    hasBacking: head.readBigUInt64BE(8) !== 0n,
    virtualSize: Number(head.readBigUInt64BE(24)),
  };
}

/** Reads a disk layer's header; throws `DriverError("image")` when the blob is not what its media type says. */
export async function readDiskHeader(layer: ImageLayer): Promise<DiskHeader> {
  const head = Buffer.alloc(32);
  const file = await open(layer.path, "r").catch((err: unknown) => {
    throw new DriverError("image", `disk layer ${layer.digest} cannot be read`, { cause: err });
  });
  try {
    await file.read(head, 0, 32, 0);
  } finally {
    await file.close();
  }
  if (layer.mediaType === RAW_MEDIA_TYPE) return { format: "raw", virtualSize: layer.size, hasBacking: false };
  const qcow2 = parseQcow2Header(head);
  if (qcow2 === undefined) throw new DriverError("image", `disk layer ${layer.digest} is not a qcow2 image (bad header)`);
  if (qcow2.version !== 2 && qcow2.version !== 3) {
    throw new DriverError("image", `disk layer ${layer.digest} has qcow2 version ${qcow2.version} (2 or 3 expected)`);
  }
  return { format: "qcow2", virtualSize: qcow2.virtualSize, hasBacking: qcow2.hasBacking };
}

const DISK_TYPES = new Set([QCOW2_MEDIA_TYPE, RAW_MEDIA_TYPE]);

/**
 * Orders the image's disk layers into one chain (bottom first) from their
 * `treadmill.disk.lower` annotations, and picks the kernel and initrd.
 * Throws `DriverError("image")` naming the layer for anything that cannot
 * boot: no disk, a lower layer missing from the image, a fork or a loop in
 * the chain, raw above the bottom, an unknown media type.
 */
export function planChain(image: JobImage): Omit<VmPlan, "chain"> & { disks: ImageLayer[] } {
  const disks: ImageLayer[] = [];
  let kernel: ImageLayer | undefined;
  let initrd: ImageLayer | undefined;
  for (const layer of image.layers) {
    if (DISK_TYPES.has(layer.mediaType)) disks.push(layer);
    else if (layer.mediaType === KERNEL_MEDIA_TYPE) kernel = layer;
    else if (layer.mediaType === INITRD_MEDIA_TYPE) initrd = layer;
    else throw new DriverError("image", `layer ${layer.digest} has media type ${layer.mediaType}, which the qemu driver cannot use`);
  }
  if (disks.length === 0) throw new DriverError("image", "image has no disk layer (qcow2 or raw)");
  if (initrd !== undefined && kernel === undefined) throw new DriverError("image", "image has an initrd layer but no kernel layer");
  const byDigest = new Map(disks.map((d) => [d.digest, d]));
  const above = new Map<string, ImageLayer>();
  const bottoms: ImageLayer[] = [];
  for (const disk of disks) {
    const lower = disk.annotations[LOWER_ANNOTATION];
    if (lower === undefined || lower === "") {
      bottoms.push(disk);
      continue;
    }
    if (disk.mediaType !== QCOW2_MEDIA_TYPE) throw new DriverError("image", `raw disk layer ${disk.digest} cannot have a lower layer`);
    if (!byDigest.has(lower)) throw new DriverError("image", `disk layer ${disk.digest} names lower layer ${lower}, which is not in the image`);
    if (above.has(lower)) throw new DriverError("image", `disk layer ${lower} is the lower layer of two layers`);
    above.set(lower, disk);
  }
  if (bottoms.length !== 1) {
    throw new DriverError("image", `disk layers do not form one chain (${bottoms.length} layers name no lower layer)`);
  }
  const ordered = [bottoms[0]!];
  for (let next = above.get(bottoms[0]!.digest); next !== undefined; next = above.get(next.digest)) ordered.push(next);
  if (ordered.length !== disks.length) throw new DriverError("image", "disk layers do not form one chain (a loop)");
  const cmdline = kernel?.annotations[CMDLINE_ANNOTATION] ?? image.annotations[CMDLINE_ANNOTATION];
  return { disks: ordered, kernel, initrd, ...(cmdline === undefined ? {} : { cmdline }) };
}

/** `planChain` plus every disk's header checked against its place in the chain. */
export async function planVmImage(image: JobImage): Promise<VmPlan> {
  const { disks, ...boot } = planChain(image);
  const chain: ChainLink[] = [];
  for (const [i, layer] of disks.entries()) {
    const header = await readDiskHeader(layer);
    if (i === 0 && header.hasBacking) {
      throw new DriverError("image", `disk layer ${layer.digest} has a backing file but names no lower layer`);
    }
    chain.push({ layer, format: header.format, virtualSize: header.virtualSize, nodeName: `layer${i}` });
  }
  return { chain, ...boot };
}
