import { describe, expect, it } from "@jest/globals";
import {
  FIRMWARE_MEDIA_TYPE,
  INITRD_MEDIA_TYPE,
  KERNEL_MEDIA_TYPE,
  QCOW2_MEDIA_TYPE,
  RAW_MEDIA_TYPE,
  ROOTFS_MEDIA_TYPE,
  mediaTypesOfDriver,
} from "../../lib/image/media-types.js";

describe("mediaTypesOfDriver", () => {
  it("gives each driver the layers it runs, a qemu host's kernel and initrd only when asked", () => {
    expect(mediaTypesOfDriver("process")).toEqual([ROOTFS_MEDIA_TYPE]);
    expect(mediaTypesOfDriver("board")).toEqual([FIRMWARE_MEDIA_TYPE]);
    expect(mediaTypesOfDriver("qemu")).toEqual([QCOW2_MEDIA_TYPE, RAW_MEDIA_TYPE]);
    expect(mediaTypesOfDriver("qemu", { boot: true })).toEqual([QCOW2_MEDIA_TYPE, RAW_MEDIA_TYPE, KERNEL_MEDIA_TYPE, INITRD_MEDIA_TYPE]);
  });
});
