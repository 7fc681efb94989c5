/**
 * Process isolation for the process driver (FACTS.md "Process isolation",
 * issue #17), and the /proc readings the drivers share.
 *
 * Each slot has a dedicated unprivileged uid (`slotUidBase + slot`, with the
 * same gid; no passwd entry is needed), claimed machine-wide (machine.ts).
 * The driver switches to it first and only then runs bubblewrap, so the job
 * holds no capability and its files belong to that uid.
 *
 * A job is what its sandbox started: every process of it lives in a pid
 * namespace of its own, whose init the sandbox reports on fd 4 as JSON lines
 * (`{"child-pid": N, ...}` at its start, `{"exit-code": N}` at its end,
 * bubblewrap's `--json-status-fd` format). Its processes are the members of
 * that namespace (setsid cannot leave it), and killing the namespace's init
 * kills all of them. The uid is never the way to find them: only a sweep of
 * leftovers under the slot's claim may look by uid. Everything started for a
 * job carries SIGKILL as its parent-death signal (`dieWithSupervisor`): a
 * supervisor that dies takes its jobs with it, as it gives up its claims.
 *
 * Network (`JobNetwork`): `isolated` (the default) gives every job a network
 * namespace of its own with only its loopback up, so it reaches no port of
 * the host or of another job; its exposed ports are reached through a relay
 * (`startRelay`) that the supervisor starts inside that namespace. `host`
 * shares the host's network (unsafe: a job then reaches every port on the
 * host's loopback), for hosts whose jobs must.
 *
 * Modes, best first (`auto` picks the best that works here):
 * - `bwrap`: uid switch, then `bwrap --unshare-all --die-with-parent
 *   --new-session` with the job's root as `/`, its own /proc, /dev and a
 *   tmpfs /tmp, its own network namespace (bwrap brings loopback up).
 * - `chroot`: bubblewrap missing (root only): `unshare --pid --fork
 *   --kill-child` (and `--net`, with `ip link set lo up`), a shell as the
 *   namespace's init, then `setpriv --no-new-privs chroot --userspec`. The
 *   job shares the host's mount and IPC namespaces.
 * - `none`: not root and no bubblewrap: the workload runs as the supervisor's
 *   own uid, in its work directory, on the host's network; its processes
 *   are the process tree under the sandbox. Only for development.
 */

import { execFile, spawn } from "node:child_process";
import { constants } from "node:fs";
import { access, lstat, readdir, readFile, readlink, unlink } from "node:fs/promises";
import { delimiter, join } from "node:path";
import { promisify } from "node:util";
import type { Logger } from "../../lib/logger.js";

const execFileAsync = promisify(execFile);

export type SandboxMode = "bwrap" | "chroot" | "none";
/** Whether jobs get a network namespace of their own (`isolated`) or share the host's (`host`, unsafe). */
export type JobNetwork = "isolated" | "host";

/** What this host allows, decided once when the driver starts. */
export interface Isolation {
  mode: SandboxMode;
  /** Whether jobs run under their slot's uid (the supervisor is root). */
  switchUid: boolean;
  /** The job network in effect (`none` mode: always `host`). */
  network: JobNetwork;
}

/** Programs the sandbox and the relays run, by absolute path. */
export interface SandboxTools {
  script: string;
  /** Starts every process of a job with a parent-death signal (see `dieWithSupervisor`). */
  setpriv: string;
  /** bwrap, or setpriv in chroot mode. */
  wrapper?: string;
  unshare?: string;
  ip?: string;
  nsenter?: string;
  socat?: string;
}

const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** Finds `name` on the supervisor's PATH (the job's PATH is the image's, not ours). */
export async function which(name: string): Promise<string | undefined> {
  for (const dir of (process.env.PATH ?? DEFAULT_PATH).split(delimiter)) {
    const candidate = join(dir, name);
    try {
      await access(candidate, constants.X_OK);
      return candidate;
    } catch {
      // Not here.
    }
  }
  return undefined;
}

/** Finds each program, or throws one error naming every one missing and its package. */
export async function requireTools<K extends string>(wanted: Record<K, { name: string; package: string }>, purpose: string): Promise<Record<K, string>> {
  const found = {} as Record<K, string>;
  const missing: string[] = [];
  for (const key of Object.keys(wanted) as K[]) {
    const path = await which(wanted[key].name);
    if (path === undefined) missing.push(`${wanted[key].name} (${wanted[key].package})`);
    else found[key] = path;
  }
  if (missing.length > 0) throw new Error(`${purpose} needs ${missing.join(", ")} on PATH`);
  return found;
}

/** Whether `bwrap` runs here, as `uid`, with every namespace (the network's included). */
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
  network: JobNetwork,
  logger: Logger,
): Promise<Isolation> {
  const root = process.getuid?.() === 0;
  const uid = root ? probeUid : undefined;
  if (network === "host") {
    logger.warn(
      "job network host: process jobs share the host's network and reach every port on its loopback, other jobs' included (unsafe; the default is isolated)",
    );
  }
  if (requested === "auto" || requested === "bwrap") {
    if (await bwrapWorks(uid)) return { mode: "bwrap", switchUid: root, network };
    if (requested === "bwrap") throw new Error("sandbox bwrap requested but bubblewrap does not run on this host");
  }
  if (requested === "auto" || requested === "chroot") {
    if (root) {
      logger.warn(
        "bubblewrap is not available: process jobs run under chroot with their slot's uid, in pid and network namespaces of their own but sharing the host's mount and ipc namespaces (install the bubblewrap package)",
      );
      return { mode: "chroot", switchUid: true, network };
    }
    if (requested === "chroot") throw new Error("sandbox chroot requested but the supervisor is not root");
  }
  logger.warn(
    "process jobs run WITHOUT isolation: no bubblewrap and not root, so jobs run as the supervisor's own user, on the host's network, and can read its files (development only)",
  );
  return { mode: "none", switchUid: false, network: "host" };
}

/** Quotes one word for /bin/sh. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/**
 * chroot mode's namespace init (run by the host's /bin/sh as pid 1 of the
 * job's pid namespace, with the workload's command as "$@"): brings loopback
 * up, reports its host pid (the host's /proc is still mounted there, so
 * /proc/self is its host pid), runs the workload as its child with the
 * console as stdin (an asynchronous command would get /dev/null), and
 * reports its exit as bubblewrap does. Signals to pid 1 from inside the namespace are ignored
 * by the kernel, so the job cannot end its init.
 */
function chrootInit(ip: string | undefined): string {
  return [
    ...(ip === undefined ? [] : [`${shellQuote(ip)} link set lo up || exit 125`]),
    'read -r pid rest < /proc/self/stat; printf \'{"child-pid": %s}\\n\' "$pid" >&4',
    "exec 5<&0",
    '"$@" <&5 5<&- 4>&- &',
    "wait $!",
    "status=$?",
    'printf \'{"exit-code": %s}\\n\' "$status" >&4',
    "exit $status",
  ].join("\n");
}

/**
 * The command line (for `sh -c`, under `script`) that runs `argv` in the
 * sandbox with `rootfs` as its root. The workload's stderr goes to fd 3
 * (the driver's stderr pipe); stdin and stdout stay on the pseudo-terminal;
 * the sandbox reports on fd 4 (see the file comment; `none` mode reports the
 * session leader's pid and no exit).
 */
export function sandboxCommand(
  isolation: Isolation,
  tools: SandboxTools,
  options: { rootfs: string; argv: string[]; uid: number; gid: number },
): string {
  const { rootfs, argv, uid, gid } = options;
  let words: string[];
  switch (isolation.mode) {
    case "bwrap":
      words = [
        tools.wrapper ?? "bwrap",
        "--unshare-all",
        ...(isolation.network === "host" ? ["--share-net"] : []),
        "--die-with-parent",
        "--new-session",
        "--json-status-fd",
        "4",
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
      words = [
        tools.unshare ?? "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        ...(isolation.network === "isolated" ? ["--net"] : []),
        "--",
        "/bin/sh",
        "-c",
        chrootInit(isolation.network === "isolated" ? (tools.ip ?? "ip") : undefined),
        "treadmill-init",
        tools.wrapper ?? "setpriv",
        "--no-new-privs",
        "chroot",
        `--userspec=${uid}:${gid}`,
        `--groups=${gid}`,
        rootfs,
        ...argv,
      ];
      break;
    case "none":
      // The session leader (script's child) reports its pid: the job is its session.
      words = [
        "/bin/sh",
        "-c",
        'printf \'{"child-pid": %s}\\n\' "$$" >&4; exec 4>&-; exec "$@"',
        "treadmill-job",
        argv[0]!.startsWith("/") ? `${rootfs}${argv[0]}` : argv[0]!,
        ...argv.slice(1),
      ];
      break;
  }
  return `exec ${words.map(shellQuote).join(" ")} 2>&3 3>&-`;
}

/** What a sandbox said on its status descriptor. */
export interface SandboxStatus {
  /** Host pid of the job's pid-namespace init. */
  childPid?: number;
  /** The workload's exit code, 128+N when signal N ended it; absent when the sandbox itself was killed. */
  exitCode?: number;
}

/** Reads the JSON lines of a status descriptor into `status` (unparsable lines are ignored). */
export function readStatusLines(text: string, status: SandboxStatus): void {
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    try {
      const value = JSON.parse(line) as Record<string, unknown>;
      if (typeof value["child-pid"] === "number") status.childPid = value["child-pid"];
      if (typeof value["exit-code"] === "number") status.exitCode = value["exit-code"];
    } catch {
      // Not a status line.
    }
  }
}

/** A process as /proc shows it. */
export interface ProcInfo {
  pid: number;
  ppid: number;
  uid: number;
}

async function procStatus(pid: string): Promise<ProcInfo | undefined> {
  let status: string;
  try {
    status = await readFile(`/proc/${pid}/status`, "utf8");
  } catch {
    return undefined; // Gone while we looked.
  }
  if (/^State:\s+Z/m.test(status)) return undefined; // A zombie is already dead; its parent reaps it.
  const field = (name: string) => new RegExp(`^${name}:\\s*(.*)$`, "m").exec(status)?.[1] ?? "";
  return { pid: Number(pid), ppid: Number(field("PPid")), uid: Number(field("Uid").split(/\s+/)[0]) };
}

async function pids(): Promise<string[]> {
  return (await readdir("/proc")).filter((entry) => /^\d+$/.test(entry));
}

/** Every live process whose real uid is `uid` (for sweeps under a slot claim only). */
export async function processesOfUid(uid: number): Promise<ProcInfo[]> {
  const out: ProcInfo[] = [];
  for (const pid of await pids()) {
    const info = await procStatus(pid);
    if (info !== undefined && info.uid === uid) out.push(info);
  }
  return out;
}

/** The namespace `pid` is in (`pid:[4026531836]`), or undefined when it is gone. */
export async function namespaceOf(pid: number, kind: "pid" | "net"): Promise<string | undefined> {
  return readlink(`/proc/${pid}/ns/${kind}`).catch(() => undefined);
}

/** Live processes of the pid namespace `ns` (as `namespaceOf` names it). */
export async function processesInNamespace(ns: string): Promise<number[]> {
  const out: number[] = [];
  for (const pid of await pids()) {
    if ((await namespaceOf(Number(pid), "pid")) !== ns) continue;
    if ((await procStatus(pid)) !== undefined) out.push(Number(pid));
  }
  return out;
}

/** Live processes of the session `sid` (`none` mode's job: what setsid did not take away). */
export async function processesOfSession(sid: number): Promise<number[]> {
  const out: number[] = [];
  for (const pid of await pids()) {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
    // pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (f[0] !== "Z" && Number(f[3]) === sid) out.push(Number(pid));
  }
  return out;
}

/** Socket inodes the processes `of` hold open. */
export async function socketInodesOf(of: number[]): Promise<Set<number>> {
  const out = new Set<number>();
  for (const pid of of) {
    for (const fd of await readdir(`/proc/${pid}/fd`).catch(() => [] as string[])) {
      const m = /^socket:\[(\d+)\]$/.exec(await readlink(`/proc/${pid}/fd/${fd}`).catch(() => ""));
      if (m !== null) out.add(Number(m[1]));
    }
  }
  return out;
}

/**
 * A running job's processes, found through what its sandbox reported: the
 * members of its pid namespace (bwrap, chroot), or of its session (`none`).
 */
export class JobProcesses {
  private constructor(
    /** The namespace init's host pid (bwrap, chroot) or the session leader's (`none`). */
    readonly leader: number,
    /** The job's pid namespace, undefined in `none` mode. */
    readonly pidNamespace: string | undefined,
  ) {}

  /** From the pid the sandbox reported; undefined when that process is already gone. */
  static async of(mode: SandboxMode, leader: number): Promise<JobProcesses | undefined> {
    if (mode === "none") return new JobProcesses(leader, undefined);
    const ns = await namespaceOf(leader, "pid");
    return ns === undefined ? undefined : new JobProcesses(leader, ns);
  }

  /** The job's processes now, its namespace's init excepted (the kernel keeps signals from it). */
  async members(): Promise<number[]> {
    if (this.pidNamespace === undefined) return processesOfSession(this.leader);
    return (await processesInNamespace(this.pidNamespace)).filter((pid) => pid !== this.leader);
  }

  /** Sends `signal` to every member. */
  async signal(signal: NodeJS.Signals): Promise<void> {
    signalAll(await this.members(), signal);
  }

  /** SIGKILLs the whole job: its namespace's init (the kernel takes every member with it), or each member. */
  async kill(): Promise<void> {
    if (this.pidNamespace === undefined) {
      signalAll([this.leader, ...(await this.members())], "SIGKILL");
      return;
    }
    // The pid is the init's as long as it is in the job's namespace (no reuse).
    if ((await namespaceOf(this.leader, "pid")) === this.pidNamespace) signalAll([this.leader], "SIGKILL");
  }

  /** Kills whatever is left and waits until nothing is (true), or `deadlineMs` passes (false). */
  async end(deadlineMs = 10000): Promise<boolean> {
    const deadline = Date.now() + deadlineMs;
    for (;;) {
      const left = this.pidNamespace === undefined ? await this.members() : await processesInNamespace(this.pidNamespace);
      if (left.length === 0) return true;
      if (Date.now() > deadline) return false;
      await this.kill();
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}

/** Sends `signal` to each pid, ignoring ones already gone. */
export function signalAll(targets: number[], signal: NodeJS.Signals): void {
  for (const pid of targets) {
    try {
      process.kill(pid, signal);
    } catch {
      // Already gone.
    }
  }
}

/**
 * SIGKILLs every process of `uid` until none is left or `deadlineMs` passes;
 * returns the pids still alive at the deadline (empty on success). Only for
 * a uid this supervisor holds the claim of (machine.ts): the claim is what
 * proves that nothing else runs as it.
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

/** A listening TCP socket. */
export interface Listener {
  port: number;
  /** The socket owner's uid. */
  uid: number;
  /** The socket's inode (`socket:[inode]` in /proc/PID/fd). */
  inode: number;
  /** Whether a connection to 127.0.0.1:port reaches it (bound to 127.0.0.1, 0.0.0.0 or ::). */
  onLoopback: boolean;
}

/**
 * The listening TCP sockets of the network namespace of `pid` (`self`: the
 * supervisor's own, i.e. the host's), from /proc/PID/net/tcp and tcp6.
 */
export async function listenersOf(pid: number | "self"): Promise<Listener[]> {
  const out: Listener[] = [];
  for (const file of ["tcp", "tcp6"]) {
    const text = await readFile(`/proc/${pid}/net/${file}`, "utf8").catch(() => "");
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10 || f[3] !== "0A") continue;
      const [address, port] = f[1]!.split(":");
      const loopbackAddresses = ["00000000", "0100007F", "00000000000000000000000000000000", "0000000000000000FFFF00000100007F"];
      out.push({ port: parseInt(port!, 16), uid: Number(f[7]), inode: Number(f[9]), onLoopback: loopbackAddresses.includes(address!) });
    }
  }
  return out;
}

/**
 * `command args` run with SIGKILL as their parent-death signal: when the
 * supervisor dies, however it dies, what it started for its jobs dies too
 * (bubblewrap's --die-with-parent takes the namespace with it) rather than
 * run on unsupervised as a uid whose claim was released.
 */
export function dieWithSupervisor(setpriv: string, command: string, args: string[]): [string, string[]] {
  return [setpriv, ["--pdeathsig", "KILL", "--", command, ...args]];
}

/** A relay from a Unix socket into a network namespace (see `startRelay`). */
export interface Relay {
  readonly path: string;
  /** Resolves once the socket accepts connections; rejects when the relay ended first. */
  readonly ready: Promise<void>;
  /** Kills the relay and its connections, removes the socket. Idempotent. */
  stop(): void;
}

/**
 * Starts `socat` inside the network namespace `netnsFd` (an open
 * /proc/PID/ns/net, which keeps the namespace alive) listening on the Unix
 * socket `path` (0600, in the caller's private directory) and connecting
 * each client to 127.0.0.1:`port` in that namespace. It runs as the
 * supervisor (it must create the socket where the job cannot reach) and
 * only in the job's network namespace, where nothing but the job listens.
 */
export function startRelay(options: {
  netnsFd: number;
  path: string;
  port: number;
  tools: Required<Pick<SandboxTools, "setpriv" | "nsenter" | "socat">>;
  logger: Logger;
}): Relay {
  const { path, port, tools } = options;
  if (!/^[A-Za-z0-9_./-]+$/.test(path)) throw new Error(`relay socket path ${path} has characters socat cannot take`);
  const [command, args] = dieWithSupervisor(tools.setpriv, tools.nsenter, [
    "--net=/proc/self/fd/3",
    "--",
    tools.socat,
    `UNIX-LISTEN:${path},fork,mode=600,unlink-early,backlog=64`,
    `TCP4:127.0.0.1:${port},nodelay`,
  ]);
  const child = spawn(command, args, { stdio: ["ignore", "ignore", "pipe", options.netnsFd], detached: true });
  let stderr = "";
  child.stderr!.on("data", (bytes: Buffer) => (stderr = (stderr + bytes.toString("utf8")).slice(-2000)));
  let ended = false;
  const exited = new Promise<void>((resolve) => child.once("close", () => resolve()));
  child.once("error", (err) => options.logger.error({ err }, "relay could not be run"));
  void exited.then(() => {
    ended = true;
    if (!stopped) options.logger.warn({ path, port, stderr: stderr.trim().slice(-300) }, "relay ended");
  });
  let stopped = false;
  const ready = (async () => {
    const deadline = Date.now() + 10000;
    for (;;) {
      const st = await lstat(path).catch(() => undefined);
      if (st?.isSocket() === true) return;
      if (ended || stopped) throw new Error(`the relay to port ${port} ended: ${stderr.trim().split("\n").pop() ?? ""}`);
      if (Date.now() > deadline) throw new Error(`the relay to port ${port} did not start`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  })();
  ready.catch(() => undefined);
  return {
    path,
    ready,
    stop() {
      if (stopped) return;
      stopped = true;
      try {
        process.kill(-child.pid!, "SIGKILL");
      } catch {
        // Gone already.
      }
      void unlink(path).catch(() => undefined);
    },
  };
}
