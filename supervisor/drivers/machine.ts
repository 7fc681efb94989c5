/**
 * What the supervisors of one machine share (issue #18: a lab runs several
 * supervisors per machine, one per board), under one machine-wide
 * directory that only root can enter (`/run/treadmill`, a tmpfs emptied at
 * every boot):
 *
 *   /run/treadmill/         0755 root
 *     slots/                0700 root
 *       <uid>.lock          0600 root  the claim on one job slot's uid
 *     sockets/              0700 root
 *       <pid>-<random>/     0700 root  one driver's Unix sockets (consoles, exposure relays)
 *
 * Slot claims: a slot's uid runs the jobs of one supervisor only. A driver
 * claims each uid with an exclusive flock(2) on its lock file, taken through
 * a descriptor the driver keeps open for its whole life: a second supervisor
 * cannot take it, and the kernel releases it when the holder dies, however
 * it dies. Holding the claim is what allows the holder to sweep the uid's
 * stray processes (nobody else may run as it). Node has no flock, so
 * `flock(1)` locks the driver's own descriptor, inherited, and exits: the
 * lock belongs to the open file, which the driver keeps. The holder writes
 * its pid and name into the file, for the message of a supervisor refused.
 *
 * Without root the driver switches no uid, so it claims nothing, and its
 * socket directory is a private temporary directory of its own user.
 *
 * Job directories: a slot's uid must be able to reach its job's directory,
 * so a work directory in a private place (root's home, a 0700 `mktemp -d`)
 * has its job directories moved to a root-owned directory of their own,
 * `/var/lib/treadmill/jobs/<driver>-<hash of the work directory>` (0711,
 * with an `origin` file naming the work directory), rather than the user's
 * directories being opened to others (issue #18 defect 8).
 */

import { spawn } from "node:child_process";
import { constants } from "node:fs";
import { randomBytes } from "node:crypto";
import { createHash } from "node:crypto";
import { chmod, mkdir, mkdtemp, open, readdir, readFile, rm, stat, writeFile, type FileHandle } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";

/** The machine-wide directory of every supervisor on this machine. */
export const MACHINE_DIR = "/run/treadmill";
/** Where slot claims live. */
export const SLOT_LOCK_DIR = join(MACHINE_DIR, "slots");
/**
 * Where `--slot-uid-base auto` looks for free uids: from here... Not from
 * 61000 or 62000, the fixed defaults of supervisors before slot claims, which
 * claim nothing and kill every process of their uids: an older supervisor
 * sharing the machine during an upgrade must not share uids with a new one.
 */
export const AUTO_FIRST_UID = 63000;
/** ...to here (inclusive); 65000 and up are reserved on Debian. */
export const AUTO_LAST_UID = 64999;
/** Where the job directories of work directories that slot uids cannot reach go (see the head comment). */
export const JOBS_DIR = "/var/lib/treadmill/jobs";
/** Longest Unix socket path (sun_path holds 108 bytes with the NUL). */
export const MAX_SOCKET_PATH = 107;

/** A claim that another supervisor holds. */
export class SlotTakenError extends Error {
  override readonly name = "SlotTakenError";
}

/** The uids a driver holds: `uidBase` to `uidBase + count - 1`. */
export interface SlotClaim {
  readonly uidBase: number;
  readonly count: number;
  /** Gives the uids up (closes the lock files). Idempotent. */
  release(): Promise<void>;
}

/** Tries to lock one open lock file; true when this descriptor now holds it. */
async function tryLock(fh: FileHandle): Promise<boolean> {
  return new Promise((resolve, reject) => {
    // fd 3 of flock(1) is our descriptor: the same open file, so the lock is ours.
    const child = spawn("flock", ["--nonblock", "--conflict-exit-code", "75", "3"], { stdio: ["ignore", "ignore", "pipe", fh.fd] });
    let stderr = "";
    child.stderr!.on("data", (bytes: Buffer) => (stderr += bytes.toString("utf8")));
    child.once("error", (err) => reject(new Error("the supervisor needs flock(1) (util-linux) to claim job slots", { cause: err })));
    child.once("close", (code) => {
      if (code === 0) resolve(true);
      else if (code === 75) resolve(false);
      else reject(new Error(`flock failed (exit ${code}): ${stderr.trim()}`));
    });
  });
}

/** Who holds `uid`, as its holder wrote it (`pid 1234 (sup-1)`), or undefined. */
async function holderOf(dir: string, uid: number): Promise<string | undefined> {
  const text = await readFile(join(dir, `${uid}.lock`), "utf8").catch(() => "");
  const m = /^(\d+) (.*)$/m.exec(text);
  return m === null ? undefined : `pid ${m[1]}${m[2] ? ` (${m[2]})` : ""}`;
}

/**
 * Claims `count` consecutive uids. `uidBase` a number: exactly those, or a
 * `SlotTakenError` naming the holder of the first one taken. `auto`: the
 * first free range from `prefer` (the range this work directory used last,
 * so that its leftovers are swept), else from AUTO_FIRST_UID on, skipping
 * uids that `busy` says something else uses (a passwd entry, a process).
 */
export async function claimSlots(options: {
  count: number;
  uidBase: number | "auto";
  /** This supervisor's name, written for others' messages. */
  holder: string;
  prefer?: number;
  /** For `auto` outside `prefer`: whether a free uid is used by something else all the same. */
  busy?: (uid: number) => Promise<boolean>;
  /** Default SLOT_LOCK_DIR. */
  lockDir?: string;
}): Promise<SlotClaim> {
  const dir = options.lockDir ?? SLOT_LOCK_DIR;
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  const tryRange = async (base: number, skipBusy: boolean): Promise<{ claim?: SlotClaim; takenAt?: number }> => {
    const held: FileHandle[] = [];
    const releaseAll = async () => {
      await Promise.all(held.map((fh) => fh.close().catch(() => undefined)));
      held.length = 0;
    };
    for (let uid = base; uid < base + options.count; uid++) {
      const fh = await open(join(dir, `${uid}.lock`), constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW, 0o600);
      let locked = false;
      try {
        locked = await tryLock(fh);
      } finally {
        if (!locked) await fh.close();
      }
      if (locked && skipBusy && (await options.busy?.(uid)) === true) {
        locked = false;
        await fh.close();
      }
      if (!locked) {
        await releaseAll();
        return { takenAt: uid };
      }
      held.push(fh);
      await fh.truncate(0);
      await fh.write(`${process.pid} ${options.holder.replace(/\s+/g, " ")}\n`, 0);
    }
    let released: Promise<void> | undefined;
    return { claim: { uidBase: base, count: options.count, release: () => (released ??= releaseAll()) } };
  };

  if (options.uidBase !== "auto") {
    const { claim, takenAt } = await tryRange(options.uidBase, false);
    if (claim !== undefined) return claim;
    const holder = (await holderOf(dir, takenAt!)) ?? "an unknown process";
    throw new SlotTakenError(
      `slot uid ${takenAt} is held by another supervisor, ${holder}: give this supervisor other slots (--slot-uid-base auto picks free ones)`,
    );
  }
  if (options.prefer !== undefined && options.prefer >= AUTO_FIRST_UID && options.prefer + options.count - 1 <= AUTO_LAST_UID) {
    const { claim } = await tryRange(options.prefer, false);
    if (claim !== undefined) return claim;
  }
  for (let base = AUTO_FIRST_UID; base + options.count - 1 <= AUTO_LAST_UID; ) {
    const { claim, takenAt } = await tryRange(base, true);
    if (claim !== undefined) return claim;
    base = takenAt! + 1;
  }
  throw new SlotTakenError(`no ${options.count} consecutive free slot uids between ${AUTO_FIRST_UID} and ${AUTO_LAST_UID}`);
}

/**
 * A new private directory (0700, this process's) for a driver's Unix
 * sockets: under /run/treadmill/sockets as root, else a temporary
 * directory. Directories of supervisors that died are removed on the way.
 */
export async function privateSocketDir(): Promise<string> {
  if (process.getuid?.() !== 0) return mkdtemp(join(tmpdir(), "treadmill-sockets-"));
  const parent = join(MACHINE_DIR, "sockets");
  await mkdir(parent, { recursive: true, mode: 0o700 });
  await chmod(MACHINE_DIR, 0o755);
  await chmod(parent, 0o700);
  for (const entry of await readdir(parent)) {
    const pid = Number(/^(\d+)-/.exec(entry)?.[1]);
    if (!Number.isInteger(pid) || pid === process.pid || alive(pid)) continue;
    await rm(join(parent, entry), { recursive: true, force: true });
  }
  const dir = join(parent, `${process.pid}-${randomBytes(4).toString("hex")}`);
  await mkdir(dir, { mode: 0o700 });
  return dir;
}

/** A driver's directory for its Unix sockets (see `socketDirectory`). */
export interface SocketDirectory {
  readonly path: string;
  /** Removes it when the driver made it (a private one). Idempotent. */
  remove(): Promise<void>;
}

/** The longest name a driver gives a socket: `<16 hex>-port-<exposure name, 32>.sock`. */
const LONGEST_SOCKET_NAME = `${"0".repeat(16)}-port-${"x".repeat(32)}.sock`;

/**
 * A driver's socket directory: `given` (made 0700 if need be), or a private
 * one (`privateSocketDir`). Throws when socket paths inside would not fit.
 */
export async function socketDirectory(given: string | undefined): Promise<SocketDirectory> {
  const path = given === undefined ? await privateSocketDir() : resolve(given);
  await mkdir(path, { recursive: true, mode: 0o700 });
  await chmod(path, 0o700);
  if (join(path, LONGEST_SOCKET_NAME).length > MAX_SOCKET_PATH) {
    throw new Error(`socket directory ${path} is too long for unix sockets inside it`);
  }
  return { path, remove: () => (given === undefined ? rm(path, { recursive: true, force: true }) : Promise.resolve()) };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Remembers the uid base a work directory used (for `auto` to prefer it next time). */
export async function rememberUidBase(file: string, uidBase: number): Promise<void> {
  await writeFile(file, `${uidBase}\n`);
}

/** The uid base a work directory used last, if any. */
export async function rememberedUidBase(file: string): Promise<number | undefined> {
  const n = Number((await readFile(file, "utf8").catch(() => "")).trim());
  return Number.isInteger(n) && n > 0 ? n : undefined;
}

/** Whether every directory from `dir` up is traversable by other users. */
async function traversable(dir: string): Promise<boolean> {
  for (let d = dir; d !== dirname(d); d = dirname(d)) {
    if (((await stat(d)).mode & 0o001) === 0) return false;
  }
  return true;
}

/**
 * The directory under which a driver keeps its job directories (`jobs/`
 * and the like, which slot uids enter): `workDir` itself when the slot uids
 * can reach it (or none is switched to), else a root-owned directory of its
 * own under `base` (see the head comment). Created 0711.
 */
export async function jobsBase(workDir: string, driver: string, switchUid: boolean, base = JOBS_DIR): Promise<string> {
  if (!switchUid || (await traversable(workDir))) return workDir;
  const dir = join(base, `${driver}-${createHash("sha256").update(workDir).digest("hex").slice(0, 16)}`);
  await mkdir(dir, { recursive: true, mode: 0o711 });
  for (let d = dir; d !== dirname(base); d = dirname(d)) await chmod(d, 0o711);
  await writeFile(join(dir, "origin"), `${workDir}\n`, { mode: 0o644 });
  if (!(await traversable(dir))) throw new Error(`${dir}: an ancestor is not traversable by other users; job slots could not reach their directories`);
  return dir;
}

/** Removes a driver's job directory base at its close when `jobsBase` moved it under `base` (its jobs are gone). */
export async function releaseJobsBase(dir: string, base = JOBS_DIR): Promise<void> {
  if (dirname(dir) === base) await rm(dir, { recursive: true, force: true });
}
