/**
 * Which USB device a serial device belongs to, read from sysfs as udev reads
 * it for `ID_SERIAL_SHORT`: the tty's `/sys/class/tty/<name>/device` link
 * leads into the device tree, and the first directory above it that is a
 * USB device (it has `idVendor`) holds the adapter's or the board's `serial`.
 * The board driver compares it with the serial number a board's
 * configuration names, so a job never runs on a board that is not the one
 * configured (a /dev/ttyACM0 that became another board's after a replug).
 */

import { readFile, realpath, stat } from "node:fs/promises";
import { basename, dirname, join, relative, isAbsolute } from "node:path";

/**
 * The USB serial number of the device behind `device` (a path in /dev or a
 * link to one, such as /dev/serial/by-id/...), under the sysfs tree at
 * `sysRoot`; undefined when the device is not a USB device or has no serial
 * number. Rejects when `device` does not exist.
 */
export async function usbSerialOf(device: string, sysRoot = "/sys"): Promise<string | undefined> {
  const name = basename(await realpath(device));
  let dir: string;
  try {
    dir = await realpath(join(sysRoot, "class", "tty", name, "device"));
  } catch {
    return undefined;
  }
  const root = await realpath(sysRoot);
  for (; inside(root, dir); dir = dirname(dir)) {
    if (!(await isFile(join(dir, "idVendor")))) continue;
    const serial = (await readFile(join(dir, "serial"), "utf8").catch(() => "")).trim();
    return serial === "" ? undefined : serial;
  }
  return undefined;
}

function inside(root: string, dir: string): boolean {
  const rel = relative(root, dir);
  return rel !== "" && !rel.startsWith("..") && !isAbsolute(rel);
}

async function isFile(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined))?.isFile() ?? false;
}
