/**
 * The QEMU command line of one job (pure, for unit tests): machine, the disk
 * chain as explicit `-blockdev` nodes (read-only blob files at the bottom, the
 * job's writable overlay on top), the serial console on a unix-socket chardev
 * with a log file, QMP, user-mode networking with host forwards (restricted:
 * the guest reaches nothing outside), direct kernel boot, job parameters as a
 * fw_cfg file, and the host's extra args.
 */

import type { VmPlan } from "./qemu-image.js";

export interface QemuLaunch {
  /** e.g. `qemu-system-x86_64`. */
  binary: string;
  /** A short name for `ps` and QEMU's own messages. */
  name: string;
  machine: string;
  accel: "kvm" | "tcg";
  /** `-cpu` model; unset: QEMU's default (`host` makes sense with KVM only). */
  cpu?: string;
  cpus: number;
  memoryMb: number;
  plan: VmPlan;
  /** The job's qcow2 overlay (absolute). */
  overlay: string;
  /** Unix socket of the serial console, and the file QEMU copies every console byte to. */
  consoleSocket: string;
  consoleLog: string;
  qmpSocket: string;
  /** Guest TCP ports forwarded from 127.0.0.1:hostPort (of QEMU's own network namespace when it has one). */
  forwards: { hostPort: number; guestPort: number }[];
  /**
   * `restrict=on`: the guest cannot reach the host (10.0.2.2) or beyond;
   * forwards into the guest still work. Off only with `--job-network host`.
   */
  restrictNetwork: boolean;
  /** A file the guest reads as fw_cfg `opt/treadmill/parameters`. */
  parameterFile?: string;
  /** Adds `isa-debug-exit` (a guest write of V to port 0xf4 makes QEMU exit with 2V+1). */
  debugExit: boolean;
  /** Adds QEMU's seccomp sandbox (`-sandbox on,...`). */
  sandbox: boolean;
  extraArgs: readonly string[];
}

/** The fw_cfg name job parameters appear under in the guest (`/sys/firmware/qemu_fw_cfg/by_name/.../raw`). */
export const PARAMETERS_FW_CFG = "opt/treadmill/parameters";

/** Escapes a value for QEMU's `key=value,...` option syntax (a comma is doubled). */
export function optionValue(value: string): string {
  return value.replace(/,/g, ",,");
}

/** `-blockdev` arguments for the chain plus the overlay (node `disk`). */
export function blockdevArgs(plan: VmPlan, overlay: string): string[] {
  const args: string[] = [];
  let below: string | null = null;
  for (const link of plan.chain) {
    // Blobs are immutable and may sit on a read-only NFS mount: no locks.
    const file = { driver: "file", filename: link.layer.path, "read-only": true, locking: "off" };
    const node =
      link.format === "raw"
        ? { driver: "raw", "node-name": link.nodeName, "read-only": true, file }
        : { driver: "qcow2", "node-name": link.nodeName, "read-only": true, file, backing: below };
    args.push("-blockdev", JSON.stringify(node));
    below = link.nodeName;
  }
  args.push(
    "-blockdev",
    JSON.stringify({ driver: "qcow2", "node-name": "disk", file: { driver: "file", filename: overlay }, backing: below }),
  );
  return args;
}

/** The whole argv (without the binary). */
export function qemuArgs(l: QemuLaunch): string[] {
  const args = [
    "-name",
    optionValue(l.name),
    "-machine",
    l.machine,
    "-accel",
    l.accel,
    ...(l.cpu === undefined || l.cpu === "" ? [] : ["-cpu", l.cpu]),
    "-smp",
    String(l.cpus),
    "-m",
    String(l.memoryMb),
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-chardev",
    `socket,id=console,path=${optionValue(l.consoleSocket)},server=on,wait=off,logfile=${optionValue(l.consoleLog)}`,
    "-serial",
    "chardev:console",
    "-qmp",
    `unix:${optionValue(l.qmpSocket)},server=on,wait=off`,
    ...blockdevArgs(l.plan, l.overlay),
    "-device",
    "virtio-blk-pci,drive=disk",
    "-netdev",
    [
      "user",
      "id=net0",
      ...(l.restrictNetwork ? ["restrict=on"] : []),
      ...l.forwards.map((f) => `hostfwd=tcp:127.0.0.1:${f.hostPort}-:${f.guestPort}`),
    ].join(","),
    "-device",
    "virtio-net-pci,netdev=net0",
  ];
  if (l.plan.kernel !== undefined) {
    args.push("-kernel", l.plan.kernel.path);
    if (l.plan.initrd !== undefined) args.push("-initrd", l.plan.initrd.path);
    args.push("-append", l.plan.cmdline ?? "console=ttyS0");
  }
  if (l.parameterFile !== undefined) args.push("-fw_cfg", `name=${PARAMETERS_FW_CFG},file=${optionValue(l.parameterFile)}`);
  if (l.debugExit) args.push("-device", "isa-debug-exit,iobase=0xf4,iosize=0x04");
  if (l.sandbox) args.push("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
  args.push(...l.extraArgs);
  return args;
}

/**
 * The workload's exit code from QEMU's own: with `isa-debug-exit`, an odd
 * status 2V+1 means the guest wrote V; otherwise QEMU's status as is (0 when
 * the guest powered off).
 */
export function exitCodeOfQemu(status: number, debugExit: boolean): number {
  return debugExit && status % 2 === 1 ? status >> 1 : status;
}

/** The parameter file the guest sources: `export TREADMILL_PARAM_NAME='value'` lines. */
export function parameterScript(parameters: { name: string; value: string }[], envName: (name: string) => string): string {
  return parameters.map((p) => `export ${envName(p.name)}='${p.value.replace(/'/g, `'\\''`)}'\n`).join("");
}
