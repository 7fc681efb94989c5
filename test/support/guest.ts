/**
 * A tiny VM guest for the qemu driver's tests and benchmark, built from
 * Debian packages at test time and cached under `.cache/guest/<key>` in the
 * checkout (the key hashes every input):
 *
 * - kernel: Debian's `linux-image-<abi>-amd64` (the version `linux-image-amd64`
 *   depends on; `apt-get download`, or TREADMILL_GUEST_KERNEL_DEB), unpacked
 *   with `dpkg-deb --fsys-tarfile`. Its xz-compressed bzImage is decompressed
 *   to the ELF vmlinux, which QEMU boots directly (PVH): under TCG that saves
 *   the seconds the decompressor would take.
 * - initrd: busybox (Debian's busybox-static) and the virtio, ext4, network and
 *   fw_cfg modules (Debian builds them all as modules); its /init mounts the
 *   disk, reads the job's parameters from fw_cfg, prints
 *   `treadmill-guest: booted`, runs `/treadmill/run` from the disk, and prints
 *   `TREADMILL_EXIT=<code>` before powering off.
 * - disk: two qcow2 layers: `base` (ext4 made with `mke2fs -d`) and `upper`
 *   (the same file system with /treadmill/run and /etc/layer added, stored as
 *   the clusters that differ from base), whose backing name is base's digest.
 *   `/treadmill/run` evals the `script` parameter.
 */

import { execFile, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { chmod, mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { imageOf, layerOf, writeTree, type TestImage } from "../../testbed/images.js";
import { INITRD_MEDIA_TYPE, KERNEL_MEDIA_TYPE, QCOW2_MEDIA_TYPE } from "../../lib/image/media-types.js";
import { CMDLINE_ANNOTATION, LOWER_ANNOTATION } from "../../supervisor/drivers/qemu-image.js";

const execFileAsync = promisify(execFile);

/** Modules the initrd loads, in dependency order (FACTS.md "QEMU"). */
const MODULES = [
  "virtio_ring",
  "virtio_pci_modern_dev",
  "virtio_pci_legacy_dev",
  "virtio",
  "virtio_pci",
  "virtio_blk",
  "crc32c_generic",
  "jbd2",
  "mbcache",
  "crc16",
  "ext4",
  "failover",
  "net_failover",
  "virtio_net",
  "qemu_fw_cfg",
];

const INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in ${MODULES.join(" ")}; do insmod /lib/modules/$m.ko 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
mount -t ext4 /dev/vda /mnt || { echo "treadmill-guest: cannot mount the disk"; echo TREADMILL_EXIT=99; poweroff -f; }
ip link set lo up
ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
p=/sys/firmware/qemu_fw_cfg/by_name/opt/treadmill/parameters/raw
[ -r $p ] && . $p
echo "treadmill-guest: booted"
cd /mnt
sh /mnt/treadmill/run
code=$?
cd /
sync
umount /mnt
echo "TREADMILL_EXIT=$code"
poweroff -f
`;

const RUN = `#!/bin/sh
echo "guest layer: $(cat /mnt/etc/layer)"
[ -n "$TREADMILL_PARAM_script" ] && eval "$TREADMILL_PARAM_script"
`;

export const GUEST_CMDLINE = "console=ttyS0 quiet panic=-1 mitigations=off i8042.noaux i8042.nokbd i8042.nopnp 8250.nr_uarts=1 tsc=reliable no_timer_check";

export interface Guest {
  /** The two-layer VM image: kernel, initrd, base and upper disks (bottom first). */
  image: TestImage;
  kernel: string;
  initrd: string;
  base: string;
  upper: string;
  dir: string;
}

async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return `sha256:${hash.digest("hex")}`;
}

/** The kernel package of this Debian release (what `linux-image-amd64` depends on). */
async function kernelPackage(): Promise<string> {
  const { stdout } = await execFileAsync("apt-cache", ["depends", "linux-image-amd64"]);
  const m = /Depends:\s*(linux-image-[0-9][^\s]*-amd64)/.exec(stdout);
  if (m === null) throw new Error("apt-cache names no kernel package for linux-image-amd64");
  return m[1]!;
}

/** A newc cpio archive of `entries` (dirs end in "/"). */
function cpioNewc(entries: { name: string; mode: number; data?: Buffer }[]): Buffer {
  const parts: Buffer[] = [];
  const pad4 = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  let ino = 1;
  const add = (name: string, mode: number, data: Buffer) => {
    const hex = (n: number) => n.toString(16).padStart(8, "0");
    const nameBytes = Buffer.from(`${name}\0`);
    const header = Buffer.from(
      `070701${hex(ino++)}${hex(mode)}${hex(0)}${hex(0)}${hex(1)}${hex(0)}${hex(data.length)}${hex(0)}${hex(0)}${hex(0)}${hex(0)}${hex(nameBytes.length)}${hex(0)}`,
    );
    parts.push(header, nameBytes, pad4(header.length + nameBytes.length), data, pad4(data.length));
  };
  for (const e of entries) add(e.name, e.mode, e.data ?? Buffer.alloc(0));
  add("TRAILER!!!", 0, Buffer.alloc(0));
  return Buffer.concat(parts);
}

/** Unpacks the kernel package's bzImage and modules and returns the vmlinux ELF and the module files. */
async function unpackKernel(deb: string, dir: string): Promise<{ vmlinux: string; modules: Map<string, string> }> {
  const root = join(dir, "kernel-root");
  await rm(root, { recursive: true, force: true });
  await mkdir(root, { recursive: true });
  const tar = spawn("tar", ["-x", "-C", root, "--wildcards", "./boot/vmlinuz-*", "./lib/modules/*.ko"], { stdio: ["pipe", "ignore", "inherit"] });
  const deb2tar = spawn("dpkg-deb", ["--fsys-tarfile", deb], { stdio: ["ignore", "pipe", "inherit"] });
  deb2tar.stdout.pipe(tar.stdin);
  await Promise.all([deb2tar, tar].map((p) => new Promise<void>((res, rej) => p.once("close", (c) => (c === 0 ? res() : rej(new Error(`${p.spawnargs[0]} exited ${c}`)))))));
  const vmlinuz = join(root, "boot", (await readdir(join(root, "boot"))).find((f) => f.startsWith("vmlinuz-"))!);
  const bz = await readFile(vmlinuz);
  const at = bz.indexOf(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]));
  if (at < 0) throw new Error("the kernel image is not xz-compressed");
  const vmlinux = join(dir, "vmlinux");
  // xz complains about the bytes after its stream (exit 1) but writes the kernel.
  await new Promise<void>((res) => {
    const xz = spawn("sh", ["-c", `tail -c +${at + 1} "$0" | xz -dc > "$1" 2>/dev/null; true`, vmlinuz, vmlinux], { stdio: "ignore" });
    xz.once("close", () => res());
  });
  const head = await readFile(vmlinux).then((b) => b.subarray(0, 4));
  if (!head.equals(Buffer.from([0x7f, 0x45, 0x4c, 0x46]))) throw new Error("decompressing the kernel gave no ELF image");
  const modules = new Map<string, string>();
  const walk = async (d: string): Promise<void> => {
    for (const entry of await readdir(d, { withFileTypes: true })) {
      const p = join(d, entry.name);
      if (entry.isDirectory()) await walk(p);
      else if (entry.name.endsWith(".ko")) modules.set(entry.name.slice(0, -3), p);
    }
  };
  await walk(join(root, "lib", "modules"));
  return { vmlinux, modules };
}

async function buildInitrd(modules: Map<string, string>, out: string): Promise<void> {
  const entries: { name: string; mode: number; data?: Buffer }[] = [];
  for (const d of ["bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules"]) entries.push({ name: d, mode: 0o40755 });
  entries.push({ name: "init", mode: 0o100755, data: Buffer.from(INIT) });
  entries.push({ name: "bin/busybox", mode: 0o100755, data: await readFile("/bin/busybox") });
  for (const m of MODULES) {
    const path = modules.get(m);
    if (path === undefined) throw new Error(`the kernel package has no module ${m}`);
    entries.push({ name: `lib/modules/${m}.ko`, mode: 0o100644, data: await readFile(path) });
  }
  await writeFile(out, gzipSync(cpioNewc(entries), { level: 1 }));
}

/** An ext4 image of `files`, reproducible (fixed UUID and time). */
async function ext4(dir: string, files: Parameters<typeof writeTree>[1], out: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  await writeTree(dir, files);
  await rm(out, { force: true });
  await execFileAsync("mke2fs", ["-q", "-t", "ext4", "-U", "6f0c1e2a-5b1d-4a5e-9a53-9d1b2f6b8e01", "-E", "root_owner=0:0", "-d", dir, out, "32M"], {
    env: { ...process.env, E2FSPROGS_FAKE_TIME: "1700000000" },
  });
}

let building: Promise<Guest> | undefined;

/** Builds the guest once per checkout (cached by inputs) and returns its files and image. */
export function buildGuest(): Promise<Guest> {
  building ??= build();
  return building;
}

async function build(): Promise<Guest> {
  const pkg = process.env.TREADMILL_GUEST_KERNEL_DEB ?? (await kernelPackage());
  const busybox = await sha256File("/bin/busybox");
  const key = createHash("sha256").update(JSON.stringify({ pkg, busybox, INIT, RUN, MODULES, v: 1 })).digest("hex").slice(0, 16);
  const dir = resolve(".cache", "guest", key);
  const files = { kernel: join(dir, "vmlinux"), initrd: join(dir, "initrd.gz"), base: join(dir, "base.qcow2"), upper: join(dir, "upper.qcow2") };
  const done = await stat(join(dir, "done")).then(() => true, () => false);
  if (!done) {
    const work = join(dir, "work");
    await rm(dir, { recursive: true, force: true });
    await mkdir(work, { recursive: true });
    let deb = pkg;
    if (!pkg.endsWith(".deb")) {
      // apt-get download writes to the working directory.
      await execFileAsync("apt-get", ["download", "-q", pkg], { cwd: work, maxBuffer: 1 << 24 });
      deb = join(work, (await readdir(work)).find((f) => f.endsWith(".deb"))!);
    }
    const { vmlinux, modules } = await unpackKernel(deb, work);
    await rename(vmlinux, files.kernel);
    await buildInitrd(modules, files.initrd);
    const common = { "etc/hostname": "treadmill-guest\n", "etc/layer": "base\n", data: { dir: true as const, mode: 0o755 } };
    await ext4(join(work, "base"), common, join(work, "base.raw"));
    await ext4(
      join(work, "upper"),
      { ...common, "etc/layer": "upper\n", "treadmill/run": { content: RUN, mode: 0o755 } },
      join(work, "upper.raw"),
    );
    await execFileAsync("qemu-img", ["convert", "-q", "-O", "qcow2", "-f", "raw", join(work, "base.raw"), files.base]);
    // Only the clusters that differ from base; then name base by its digest.
    await execFileAsync("qemu-img", ["convert", "-q", "-O", "qcow2", "-f", "raw", "-B", files.base, "-F", "qcow2", join(work, "upper.raw"), files.upper]);
    await execFileAsync("qemu-img", ["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", await sha256File(files.base), files.upper]);
    await rm(work, { recursive: true, force: true });
    await writeFile(join(dir, "done"), `${pkg}\n`);
  }
  // Readable by the slot uids QEMU runs under.
  for (const d of [resolve(".cache"), resolve(".cache", "guest"), dir]) await chmod(d, 0o755);
  const base = await layerOf(files.base, QCOW2_MEDIA_TYPE, { "org.opencontainers.image.title": "base.qcow2" });
  const upper = await layerOf(files.upper, QCOW2_MEDIA_TYPE, { "org.opencontainers.image.title": "upper.qcow2", [LOWER_ANNOTATION]: base.digest });
  const kernel = await layerOf(files.kernel, KERNEL_MEDIA_TYPE, { "org.opencontainers.image.title": "vmlinux", [CMDLINE_ANNOTATION]: GUEST_CMDLINE });
  const initrd = await layerOf(files.initrd, INITRD_MEDIA_TYPE, { "org.opencontainers.image.title": "initrd.gz" });
  const image = imageOf([kernel, initrd, base, upper], { "org.opencontainers.image.title": "treadmill test guest", "treadmill.driver": "qemu" });
  return { image, dir, ...files };
}

/** Pushes a test image (the guest's or one made from its layers) as `name:tag`. */
export { pushTestImage } from "../../testbed/provision.js";
