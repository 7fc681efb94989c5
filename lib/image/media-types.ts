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
