import { describe, expect, it } from "@jest/globals";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  INITRD_MEDIA_TYPE,
  KERNEL_MEDIA_TYPE,
  QCOW2_MEDIA_TYPE,
  RAW_MEDIA_TYPE,
  ROOTFS_MEDIA_TYPE,
} from "../../../lib/image/media-types.js";
import { type ImageLayer, type JobImage } from "../../../supervisor/drivers/driver.js";
import { blockdevArgs, exitCodeOfQemu, optionValue, parameterScript, qemuArgs, type QemuLaunch } from "../../../supervisor/drivers/qemu-args.js";
import { CMDLINE_ANNOTATION, LOWER_ANNOTATION, parseQcow2Header, planChain, planVmImage } from "../../../supervisor/drivers/qemu-image.js";

const layer = (digest: string, mediaType: string, annotations: Record<string, string> = {}, path = `/cache/${digest}`): ImageLayer => ({
  digest,
  mediaType,
  size: 1,
  annotations,
  path,
});
const image = (...layers: ImageLayer[]): JobImage => ({ manifestDigest: "sha256:m", layers, annotations: {} });

describe("qemu image chain planning", () => {
  it("orders disk layers by their lower annotations, whatever their order in the manifest", () => {
    const plan = planChain(
      image(
        layer("sha256:c", QCOW2_MEDIA_TYPE, { [LOWER_ANNOTATION]: "sha256:b" }),
        layer("sha256:k", KERNEL_MEDIA_TYPE, { [CMDLINE_ANNOTATION]: "console=ttyS0 quiet" }),
        layer("sha256:a", RAW_MEDIA_TYPE),
        layer("sha256:b", QCOW2_MEDIA_TYPE, { [LOWER_ANNOTATION]: "sha256:a" }),
        layer("sha256:i", INITRD_MEDIA_TYPE),
      ),
    );
    expect(plan.disks.map((d) => d.digest)).toEqual(["sha256:a", "sha256:b", "sha256:c"]);
    expect(plan.kernel?.digest).toBe("sha256:k");
    expect(plan.initrd?.digest).toBe("sha256:i");
    expect(plan.cmdline).toBe("console=ttyS0 quiet");
  });

  it.each([
    ["no disk", image(layer("sha256:k", KERNEL_MEDIA_TYPE)), /no disk layer/],
    ["a missing lower layer", image(layer("sha256:b", QCOW2_MEDIA_TYPE, { [LOWER_ANNOTATION]: "sha256:gone" })), /sha256:gone, which is not in the image/],
    [
      "a fork",
      image(
        layer("sha256:a", QCOW2_MEDIA_TYPE),
        layer("sha256:b", QCOW2_MEDIA_TYPE, { [LOWER_ANNOTATION]: "sha256:a" }),
        layer("sha256:c", QCOW2_MEDIA_TYPE, { [LOWER_ANNOTATION]: "sha256:a" }),
      ),
      /lower layer of two layers/,
    ],
    ["two bottoms", image(layer("sha256:a", QCOW2_MEDIA_TYPE), layer("sha256:b", RAW_MEDIA_TYPE)), /do not form one chain/],
    [
      "a loop",
      image(
        layer("sha256:r", RAW_MEDIA_TYPE),
        layer("sha256:a", QCOW2_MEDIA_TYPE, { [LOWER_ANNOTATION]: "sha256:b" }),
        layer("sha256:b", QCOW2_MEDIA_TYPE, { [LOWER_ANNOTATION]: "sha256:a" }),
      ),
      /a loop/,
    ],
    ["raw above the bottom", image(layer("sha256:a", QCOW2_MEDIA_TYPE), layer("sha256:b", RAW_MEDIA_TYPE, { [LOWER_ANNOTATION]: "sha256:a" })), /raw disk layer/],
    ["a rootfs layer", image(layer("sha256:a", QCOW2_MEDIA_TYPE), layer("sha256:t", ROOTFS_MEDIA_TYPE)), /cannot use/],
    ["an initrd without kernel", image(layer("sha256:a", QCOW2_MEDIA_TYPE), layer("sha256:i", INITRD_MEDIA_TYPE)), /no kernel/],
  ])("refuses an image with %s as an image error", (_what, bad, message) => {
    expect(() => planChain(bad)).toThrow(expect.objectContaining({ reason: "image", message: expect.stringMatching(message) }));
  });

  it("reads qcow2 headers: version, backing file and virtual size; anything else is not qcow2", () => {
    const dir = mkdtempSync(join(tmpdir(), "qcow2-"));
    try {
      const base = join(dir, "base.qcow2");
      const upper = join(dir, "upper.qcow2");
      execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", base, "8M"]);
      execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "sha256:abc", upper, "8M"]);
      const read = (p: string) => parseQcow2Header(execFileSync("head", ["-c", "32", p]));
      expect(read(base)).toEqual({ version: 3, hasBacking: false, virtualSize: 8 << 20 });
      expect(read(upper)).toMatchObject({ hasBacking: true });
      expect(parseQcow2Header(Buffer.alloc(32))).toBeUndefined();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("refuses a bottom qcow2 layer that has a backing file of its own", async () => {
    const dir = mkdtempSync(join(tmpdir(), "qcow2-"));
    try {
      const path = join(dir, "upper.qcow2");
      execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "sha256:abc", path, "8M"]);
      await expect(planVmImage(image(layer("sha256:u", QCOW2_MEDIA_TYPE, {}, path)))).rejects.toThrow(/has a backing file but names no lower layer/);
      writeFileSync(path, "not a disk at all, not even close to 32 bytes long");
      await expect(planVmImage(image(layer("sha256:u", QCOW2_MEDIA_TYPE, {}, path)))).rejects.toThrow(/not a qcow2 image/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("qemu command line", () => {
  const plan = {
    chain: [
      { layer: layer("sha256:a", RAW_MEDIA_TYPE), format: "raw" as const, virtualSize: 1, nodeName: "layer0" },
      { layer: layer("sha256:b", QCOW2_MEDIA_TYPE), format: "qcow2" as const, virtualSize: 1, nodeName: "layer1" },
    ],
    kernel: layer("sha256:k", KERNEL_MEDIA_TYPE),
    cmdline: "console=ttyS0 quiet",
  };
  const launch: QemuLaunch = {
    binary: "qemu-system-x86_64",
    name: "treadmill-job",
    machine: "q35",
    accel: "tcg",
    cpus: 2,
    memoryMb: 256,
    plan,
    overlay: "/jobs/x/overlay.qcow2",
    consoleSocket: "/jobs/x,y/console.sock",
    consoleLog: "/jobs/x/console.log",
    qmpSocket: "/jobs/x/qmp.sock",
    forwards: [
      { hostPort: 40022, guestPort: 22 },
      { hostPort: 40080, guestPort: 8080 },
    ],
    restrictNetwork: true,
    parameterFile: "/jobs/x/parameters.sh",
    debugExit: true,
    sandbox: true,
    extraArgs: ["-cpu", "max"],
  };

  it("states the whole chain read-only and unlocked below a writable overlay, never following names stored in blobs", () => {
    const nodes = blockdevArgs(plan, launch.overlay)
      .filter((a) => a !== "-blockdev")
      .map((a) => JSON.parse(a) as Record<string, unknown>);
    expect(nodes).toEqual([
      { driver: "raw", "node-name": "layer0", "read-only": true, file: { driver: "file", filename: "/cache/sha256:a", "read-only": true, locking: "off" } },
      {
        driver: "qcow2",
        "node-name": "layer1",
        "read-only": true,
        backing: "layer0",
        file: { driver: "file", filename: "/cache/sha256:b", "read-only": true, locking: "off" },
      },
      { driver: "qcow2", "node-name": "disk", file: { driver: "file", filename: "/jobs/x/overlay.qcow2" }, backing: "layer1" },
    ]);
  });

  it("builds console, qmp, restricted network forwards, direct boot, parameters, debug exit, sandbox and extra args", () => {
    const args = qemuArgs(launch);
    const after = (flag: string) => args.filter((_, i) => args[i - 1] === flag);
    expect(after("-machine")).toEqual(["q35"]);
    expect(after("-accel")).toEqual(["tcg"]);
    expect(after("-smp")).toEqual(["2"]);
    expect(after("-m")).toEqual(["256"]);
    expect(after("-chardev")).toEqual(["socket,id=console,path=/jobs/x,,y/console.sock,server=on,wait=off,logfile=/jobs/x/console.log"]);
    expect(after("-serial")).toEqual(["chardev:console"]);
    expect(after("-qmp")).toEqual(["unix:/jobs/x/qmp.sock,server=on,wait=off"]);
    // Restricted: the guest reaches nothing of the host (10.0.2.2) or beyond; forwards still reach it.
    expect(after("-netdev")).toEqual(["user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22,hostfwd=tcp:127.0.0.1:40080-:8080"]);
    expect(after("-kernel")).toEqual(["/cache/sha256:k"]);
    expect(after("-initrd")).toEqual([]);
    expect(after("-append")).toEqual(["console=ttyS0 quiet"]);
    expect(after("-fw_cfg")).toEqual(["name=opt/treadmill/parameters,file=/jobs/x/parameters.sh"]);
    expect(after("-device")).toContain("isa-debug-exit,iobase=0xf4,iosize=0x04");
    expect(after("-sandbox")).toHaveLength(1);
    expect(args.slice(-2)).toEqual(["-cpu", "max"]);
    const plain = qemuArgs({ ...launch, debugExit: false, sandbox: false, parameterFile: undefined, plan: { chain: plan.chain }, restrictNetwork: false });
    expect(plain.filter((_, i) => plain[i - 1] === "-netdev")[0]).not.toContain("restrict");
    expect(plain).not.toContain("-kernel");
    expect(plain).not.toContain("-fw_cfg");
    expect(plain).not.toContain("-sandbox");
    expect(plain.join(" ")).not.toContain("isa-debug-exit");
  });

  it("decodes isa-debug-exit codes and quotes parameters for the guest's shell", () => {
    expect(exitCodeOfQemu(11, true)).toBe(5);
    expect(exitCodeOfQemu(0, true)).toBe(0);
    expect(exitCodeOfQemu(1, false)).toBe(1);
    expect(optionValue("a,b")).toBe("a,,b");
    expect(parameterScript([{ name: "x", value: "it's $HOME" }], (n) => `P_${n}`)).toBe("export P_x='it'\\''s $HOME'\n");
  });
});
