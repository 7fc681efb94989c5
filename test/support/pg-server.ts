/**
 * The one PostgreSQL server of a test run (started by global-setup.ts in
 * jest's parent process): an embedded server in a temp directory, or the
 * server named by TEST_DATABASE_URL. It holds `treadmill_template`, a database
 * with every migration applied, from which each test file clones its own
 * database (test/support/db.ts).
 *
 * TEST_DATABASE_URL must name a database on a PostgreSQL 14+ server as a role
 * that may create databases. TEST_PG_BIN_DIR runs the embedded server from
 * other binaries (e.g. /usr/lib/postgresql/15/bin).
 */
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import postgres from "postgres";
import { startEmbeddedPostgres } from "../../coordinator/db/embedded.js";
import { migrate } from "../../coordinator/db/migrate.js";
import { silentLogger } from "../../lib/logger.js";

export const TEMPLATE_DATABASE = "treadmill_template";

export interface TestServer {
  /** A URL of the server's maintenance database (as a role that may create databases). */
  url: string;
  template: string;
  stop(): Promise<void>;
}

export async function startTestServer(env: NodeJS.ProcessEnv): Promise<TestServer> {
  const logger = silentLogger();
  let url = env.TEST_DATABASE_URL;
  let stopServer = async () => {};
  if (url === undefined || url === "") {
    const root = await mkdtemp(join(tmpdir(), "treadmill-test-pg-"));
    await chmod(root, 0o755); // the cluster stays here when the server's OS user can reach it
    try {
      const server = await startEmbeddedPostgres({
        dataDir: join(root, "pg"),
        logger,
        database: "postgres",
        ephemeral: true,
        binDir: env.TEST_PG_BIN_DIR || undefined,
        settings: { max_connections: 300 },
      });
      url = server.url;
      stopServer = async () => {
        await server.stop();
        // Relocated (TMPDIR under a private directory): its record goes too.
        if (!server.pgdata.startsWith(`${root}/`)) await rm(dirname(dirname(server.pgdata)), { recursive: true, force: true });
        await rm(root, { recursive: true, force: true });
      };
    } catch (err) {
      await rm(root, { recursive: true, force: true });
      throw err;
    }
  }
  try {
    await createTemplate(url, TEMPLATE_DATABASE);
  } catch (err) {
    await stopServer();
    throw err;
  }
  const external = stopServer;
  return {
    url,
    template: TEMPLATE_DATABASE,
    async stop() {
      if (env.TEST_DATABASE_URL) await dropTemplate(url, TEMPLATE_DATABASE).catch(() => undefined);
      await external();
    },
  };
}

async function createTemplate(url: string, name: string): Promise<void> {
  await dropTemplate(url, name);
  const admin = postgres(url, { max: 1, onnotice: () => undefined });
  try {
    await admin`create database ${admin(name)}`;
    const target = new URL(url);
    target.pathname = `/${name}`;
    const sql = postgres(target.toString(), { max: 1, onnotice: () => undefined });
    try {
      await migrate(sql, { logger: silentLogger() });
    } finally {
      await sql.end({ timeout: 5 });
    }
    // No connections: CREATE DATABASE ... TEMPLATE fails while anyone is connected.
    await admin`alter database ${admin(name)} with is_template true allow_connections false`;
  } finally {
    await admin.end({ timeout: 5 });
  }
}

/** Drops a template left by an earlier run (on a shared TEST_DATABASE_URL server). */
async function dropTemplate(url: string, name: string): Promise<void> {
  const admin = postgres(url, { max: 1, onnotice: () => undefined });
  try {
    const rows = await admin`select 1 from pg_database where datname = ${name}`;
    if (rows.length === 0) return;
    await admin`alter database ${admin(name)} with is_template false`;
    await admin`drop database ${admin(name)} with (force)`;
  } finally {
    await admin.end({ timeout: 5 });
  }
}
