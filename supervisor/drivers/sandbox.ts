/**
 * Process isolation for the process driver (FACTS.md "Process isolation").
 *
 * Each slot has a dedicated unprivileged uid (`slotUidBase + slot`, with the
 * same gid; no passwd entry is needed). The driver switches to it first and
 * only then runs bubblewrap, so the job holds no capability and its files
 * belong to that uid. Because a slot's uid runs nothing but that slot's job,
 * "every process of the job" is "every process with that uid": stopping and
 * verifying scan /proc by uid, which also catches processes that left the
 * process group (`setsid`).
 *
 * Modes, best first (`auto` picks the best that works here):
 * - `bwrap`: uid switch, then `bwrap --unshare-all --die-with-parent
 *   --new-session` with the job's root as `/`, its own /proc, /dev and a tmpfs
 *   /tmp. The network is shared only when the job exposes ports.
 * - `chroot`: bubblewrap missing: `setpriv --no-new-privs chroot --userspec`
 *   (root only). Jobs share the host's network, process and IPC namespaces.
 * - `none`: not root and no bubblewrap: the workload runs as the supervisor's
 *   own uid, in its work directory. Only for development.
 */

import { execFile } from "node:child_process";
import { readdir, readFile } from "node:fs/promises";
import { promisify } from "node:util";
import type { Logger } from "../../lib/logger.js";

const execFileAsync = promisify(execFile);

export type SandboxMode = "bwrap" | "chroot" | "none";

/** What this host allows, decided once when the driver starts. */
export interface Isolation {
  mode: SandboxMode;
  /** Whether jobs run under their slot's uid (the supervisor is root). */
  switchUid: boolean;
}

/** Whether `bwrap` runs here, as `uid`, with every namespace. */
async function bwrapWorks(uid: number | undefined): Promise<boolean> {
  try {
    await execFileAsync(
      "bwrap",
      ["--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--proc", "/proc", "true"],
      { timeout: 10000, ...(uid === undefined ? {} : { uid, gid: uid }) },
    );
    return true;
  } catch {
    return false;
  }
}

/**
 * Picks the isolation mode. `requested` other than `auto` is checked and
 * refused with an error when the host cannot provide it.
 */
export async function detectIsolation(
  requested: "auto" | SandboxMode,
  probeUid: number,
  logger: Logger,
): Promise<Isolation> {
  const root = process.getuid?.() === 0;
  const uid = root ? probeUid : undefined;
  if (requested === "auto" || requested === "bwrap") {
    if (await bwrapWorks(uid)) return { mode: "bwrap", switchUid: root };
    if (requested === "bwrap") throw new Error("sandbox bwrap requested but bubblewrap does not run on this host");
  }
  if (requested === "auto" || requested === "chroot") {
    if (root) {
      logger.warn(
        "bubblewrap is not available: process jobs run under chroot with their slot's uid, sharing the host's network, process and ipc namespaces (install the bubblewrap package)",
      );
      return { mode: "chroot", switchUid: true };
    }
    if (requested === "chroot") throw new Error("sandbox chroot requested but the supervisor is not root");
  }
  logger.warn(
    "process jobs run WITHOUT isolation: no bubblewrap and not root, so jobs run as the supervisor's own user and can read its files (development only)",
  );
  return { mode: "none", switchUid: false };
}

/** Quotes one word for /bin/sh. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/**
 * The command line (for `sh -c`, under `script`) that runs `argv` in the
 * sandbox with `rootfs` as its root. The workload's stderr goes to fd 3
 * (the driver's stderr pipe); stdin and stdout stay on the pseudo-terminal.
 */
export function sandboxCommand(
  isolation: Isolation,
  options: { rootfs: string; argv: string[]; uid: number; gid: number; shareNet: boolean },
): string {
  const { rootfs, argv, uid, gid } = options;
  let words: string[];
  switch (isolation.mode) {
    case "bwrap":
      words = [
        "bwrap",
        "--unshare-all",
        ...(options.shareNet ? ["--share-net"] : []),
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "treadmill-job",
        "--bind",
        rootfs,
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--chdir",
        "/",
        "--unsetenv",
        "SHELL",
        "--",
        ...argv,
      ];
      break;
    case "chroot":
      words = ["setpriv", "--no-new-privs", "chroot", `--userspec=${uid}:${gid}`, `--groups=${gid}`, rootfs, ...argv];
      break;
    case "none":
      words = [argv[0]!.startsWith("/") ? `${rootfs}${argv[0]}` : argv[0]!, ...argv.slice(1)];
      break;
  }
  return `exec ${words.map(shellQuote).join(" ")} 2>&3 3>&-`;
}

/** A process as /proc shows it. */
export interface ProcInfo {
  pid: number;
  ppid: number;
  uid: number;
  /** Pids in each nested pid namespace, outermost first (the last is the pid inside the job's namespace). */
  nspid: number[];
}

/** Every process whose real uid is `uid`. */
export async function processesOfUid(uid: number): Promise<ProcInfo[]> {
  const out: ProcInfo[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let status: string;
    try {
      status = await readFile(`/proc/${entry}/status`, "utf8");
    } catch {
      continue; // Gone while we looked.
    }
    const field = (name: string) => new RegExp(`^${name}:\\s*(.*)$`, "m").exec(status)?.[1] ?? "";
    const realUid = Number(field("Uid").split(/\s+/)[0]);
    if (realUid !== uid) continue;
    if (/^State:\s+Z/m.test(status)) continue; // A zombie is already dead; its parent reaps it.
    out.push({
      pid: Number(entry),
      ppid: Number(field("PPid")),
      uid: realUid,
      nspid: field("NSpid").split(/\s+/).filter(Boolean).map(Number),
    });
  }
  return out;
}

/** Sends `signal` to each pid, ignoring ones already gone. */
export function signalAll(pids: number[], signal: NodeJS.Signals): void {
  for (const pid of pids) {
    try {
      process.kill(pid, signal);
    } catch {
      // Already gone.
    }
  }
}

/**
 * SIGKILLs every process of `uid` until none is left or `deadlineMs` passes.
 * Returns the pids still alive at the deadline (empty on success).
 */
export async function killAllOfUid(uid: number, deadlineMs = 10000): Promise<number[]> {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const left = await processesOfUid(uid);
    if (left.length === 0) return [];
    if (Date.now() > deadline) return left.map((p) => p.pid);
    signalAll(
      left.map((p) => p.pid),
      "SIGKILL",
    );
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
