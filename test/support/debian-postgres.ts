/**
 * A throwaway cluster of Debian's PostgreSQL 15 (/usr/lib/postgresql/15),
 * for tests that need the client tools the embedded binaries lack (pg_dump,
 * pg_restore, pg_basebackup): initdb in a temp directory as the `postgres`
 * user, trust authentication on 127.0.0.1 and a free port, a database and
 * role `treadmill` it owns. `stop()` stops it and removes its directory.
 */
import { spawnSync } from "node:child_process";
import { chmod, chown, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freePort } from "./net.js";

export const PG15_BIN = "/usr/lib/postgresql/15/bin";

export interface DebianPostgres {
  /** postgres://treadmill@127.0.0.1:PORT/treadmill */
  url: string;
  port: number;
  /** Runs SQL as the superuser in `database` (default postgres), returning psql's output. */
  psql(sql: string, database?: string): string;
  stop(): Promise<void>;
}

function asPostgres(command: string, args: string[]): string {
  const result = spawnSync("runuser", ["-u", "postgres", "--", join(PG15_BIN, command), ...args], { encoding: "utf8" });
  if (result.status !== 0) throw new Error(`${command} ${args.join(" ")} failed: ${result.stderr || result.stdout}`);
  return result.stdout;
}

export async function startDebianPostgres(): Promise<DebianPostgres> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-pg15-"));
  await chmod(dir, 0o755);
  const { uid, gid } = postgresIds();
  await chown(dir, uid, gid);
  const data = join(dir, "data");
  const port = await freePort();
  asPostgres("initdb", ["-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]);
  asPostgres("pg_ctl", ["-D", data, "-l", join(dir, "server.log"), "-w", "-o", `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off`, "start"]);
  const psql = (sql: string, database = "postgres") =>
    asPostgres("psql", ["-h", "127.0.0.1", "-p", String(port), "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", sql]);
  psql("create role treadmill login");
  psql("create database treadmill owner treadmill");
  return {
    url: `postgres://treadmill@127.0.0.1:${port}/treadmill`,
    port,
    psql,
    async stop() {
      spawnSync("runuser", ["-u", "postgres", "--", join(PG15_BIN, "pg_ctl"), "-D", data, "-m", "immediate", "stop"]);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

function postgresIds(): { uid: number; gid: number } {
  const uid = Number(spawnSync("id", ["-u", "postgres"], { encoding: "utf8" }).stdout.trim());
  const gid = Number(spawnSync("id", ["-g", "postgres"], { encoding: "utf8" }).stdout.trim());
  if (!Number.isInteger(uid) || !Number.isInteger(gid)) throw new Error("no postgres user on this machine (Debian's postgresql package makes it)");
  return { uid, gid };
}
