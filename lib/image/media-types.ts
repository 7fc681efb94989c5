/**
 * The media types of Treadmill images (DESIGN.md §6): the OCI manifest and
 * index, and the layer types each driver runs. The one definition: the
 * store, the CLI, the drivers, snapshots and the testbed name them from here.
 */

/** An image manifest (OCI image-spec form). */
export const MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json";
/** The OCI image-layout index a store keeps of its manifests. */
export const INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json";
/** Media type of process-driver layers and of process snapshots. */
export const ROOTFS_MEDIA_TYPE = "application/vnd.treadmill.rootfs.tar+gzip";
/** Media type of board-driver firmware layers. */
export const FIRMWARE_MEDIA_TYPE = "application/vnd.treadmill.firmware";
/** Media type of qemu-driver disk layers in qcow2 format (a backing chain; see supervisor/drivers/qemu-image.ts). */
export const QCOW2_MEDIA_TYPE = "application/vnd.treadmill.disk.qcow2";
/** Media type of a qemu-driver raw disk layer (the bottom of a chain only). */
export const RAW_MEDIA_TYPE = "application/vnd.treadmill.disk.raw";
/** Media type of a kernel layer for a VM's direct boot (`-kernel`). */
export const KERNEL_MEDIA_TYPE = "application/vnd.treadmill.kernel";
/** Media type of an initrd layer for a VM's direct boot (`-initrd`). */
export const INITRD_MEDIA_TYPE = "application/vnd.treadmill.initrd";

/**
 * The media type of each kind of layer, by the word `tml image push --type`
 * and the testbed use. kernel and initrd are a VM's direct-boot parts: they go
 * below a qcow2 or raw disk, never alone.
 */
export const MEDIA_TYPE_OF_KIND = {
  rootfs: ROOTFS_MEDIA_TYPE,
  qcow2: QCOW2_MEDIA_TYPE,
  raw: RAW_MEDIA_TYPE,
  firmware: FIRMWARE_MEDIA_TYPE,
  kernel: KERNEL_MEDIA_TYPE,
  initrd: INITRD_MEDIA_TYPE,
} as const;
export type LayerKind = keyof typeof MEDIA_TYPE_OF_KIND;

/** The driver that runs each kind of layer (an image's `treadmill.driver` annotation). */
export const DRIVER_OF_KIND = {
  rootfs: "process",
  qcow2: "qemu",
  raw: "qemu",
  firmware: "board",
  kernel: "qemu",
  initrd: "qemu",
} as const satisfies Record<LayerKind, string>;
export type DriverName = (typeof DRIVER_OF_KIND)[LayerKind];

const BOOT_KINDS: readonly LayerKind[] = ["kernel", "initrd"];

/**
 * The media types a host of `driver` runs, in MEDIA_TYPE_OF_KIND's order.
 * A qemu host's direct-boot layers count only with `boot`: `tml host create`
 * leaves them out by default, the testbed's VM host declares them.
 */
export function mediaTypesOfDriver(driver: DriverName, options: { boot?: boolean } = {}): string[] {
  return (Object.keys(MEDIA_TYPE_OF_KIND) as LayerKind[])
    .filter((kind) => DRIVER_OF_KIND[kind] === driver && (options.boot === true || !BOOT_KINDS.includes(kind)))
    .map((kind) => MEDIA_TYPE_OF_KIND[kind]);
}
