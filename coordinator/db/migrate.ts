/**
 * Schema migrations: ordered SQL files `NNNN_name.sql` in coordinator/migrations,
 * applied at start-up.
 *
 * Every pending migration is applied in ONE transaction that first takes a
 * transaction-scoped advisory lock, so replicas starting together queue up:
 * the first applies everything, the others then find nothing to do. A failure
 * rolls back every migration of the run. Each applied file's sha256 is
 * recorded; a file changed after it was applied is an error (add a new
 * migration instead). Statements that cannot run inside a transaction
 * (CREATE INDEX CONCURRENTLY, ALTER TYPE ... ADD VALUE before PostgreSQL 12)
 * do not belong in migrations.
 */
import { createHash } from "node:crypto";
import { readFile, readdir } from "node:fs/promises";
import { join } from "node:path";
import type { Sql } from "postgres";
import type { Logger } from "../../lib/logger.js";
import { packagePath } from "../../lib/package.js";

export interface Migration {
  version: number;
  name: string;
  sql: string;
  /** sha256 hex of the file, line endings normalised to \n. */
  checksum: string;
}

/** The coordinator's migrations directory. */
export const MIGRATIONS_DIR = packagePath("coordinator", "migrations");

/**
 * The advisory lock key migrations hold (pg_advisory_xact_lock(bigint)):
 * 0x7472_6561_646d_696c, "treadmil" in ASCII.
 */
export const MIGRATION_LOCK_KEY = 0x7472_6561_646d_696cn;

const FILE_NAME = /^(\d{4})_([a-z0-9][a-z0-9_]*)\.sql$/;

/** Builds a migration from its file name and text (also for tests). */
export function migration(fileName: string, text: string): Migration {
  const match = FILE_NAME.exec(fileName);
  if (!match) throw new Error(`migration file name ${fileName} is not NNNN_name.sql`);
  const sql = text.replace(/\r\n/g, "\n");
  return {
    version: Number(match[1]),
    name: match[2],
    sql,
    checksum: createHash("sha256").update(sql).digest("hex"),
  };
}

/** Reads `dir`'s `.sql` files, ordered by version; other files are ignored. */
export async function loadMigrations(dir: string = MIGRATIONS_DIR): Promise<Migration[]> {
  const names = (await readdir(dir)).filter((name) => name.endsWith(".sql")).sort();
  const migrations = await Promise.all(names.map(async (name) => migration(name, await readFile(join(dir, name), "utf8"))));
  return checkOrder(migrations);
}

function checkOrder(migrations: Migration[]): Migration[] {
  const sorted = [...migrations].sort((a, b) => a.version - b.version);
  for (let i = 1; i < sorted.length; i++) {
    if (sorted[i].version === sorted[i - 1].version) {
      throw new Error(`two migrations have version ${sorted[i].version}: ${sorted[i - 1].name} and ${sorted[i].name}`);
    }
  }
  return sorted;
}

export interface MigrateResult {
  /** Versions applied by this call, in order (empty when the schema was current). */
  applied: number[];
  /** The highest version now in the database. */
  version: number;
}

/**
 * Applies the pending migrations. Throws, changing nothing, when an applied
 * migration's file changed or disappeared from the middle of the sequence, or
 * when a migration older than an applied one is pending (merged late: renumber it).
 */
export async function migrate(
  sql: Sql,
  options: { logger: Logger; migrations?: Migration[]; dir?: string },
): Promise<MigrateResult> {
  const log = options.logger;
  const migrations = options.migrations ? checkOrder(options.migrations) : await loadMigrations(options.dir);
  const began = Date.now();
  const result = await sql.begin(async (tx) => {
    await tx`select pg_advisory_xact_lock(${MIGRATION_LOCK_KEY.toString()}::bigint)`;
    // Under the lock: concurrent CREATE TABLE IF NOT EXISTS can otherwise collide.
    await tx`
      create table if not exists schema_migrations (
        version int primary key,
        name text not null,
        checksum text not null,
        applied_at timestamptz not null default now()
      )`;
    const rows = await tx<{ version: number; name: string; checksum: string }[]>`
      select version, name, checksum from schema_migrations order by version`;
    const applied = new Map(rows.map((row) => [row.version, row]));
    const known = new Map(migrations.map((m) => [m.version, m]));
    const highestApplied = rows.length > 0 ? rows[rows.length - 1].version : 0;

    const problems: string[] = [];
    for (const row of rows) {
      const file = known.get(row.version);
      if (!file) {
        if (row.version < (migrations.at(-1)?.version ?? 0)) {
          problems.push(`applied migration ${pad(row.version)}_${row.name} has no file`);
        }
      } else if (file.checksum !== row.checksum) {
        problems.push(`migration ${pad(file.version)}_${file.name} changed after it was applied (checksum mismatch)`);
      }
    }
    const pending = migrations.filter((m) => !applied.has(m.version));
    for (const m of pending) {
      if (m.version < highestApplied) {
        problems.push(`migration ${pad(m.version)}_${m.name} is older than the applied ${pad(highestApplied)}; renumber it`);
      }
    }
    if (problems.length > 0) throw new Error(`migrations: ${problems.join("; ")}`);
    const newer = rows.filter((row) => row.version > (migrations.at(-1)?.version ?? 0));
    if (newer.length > 0) {
      log.warn({ versions: newer.map((r) => r.version) }, "database has migrations newer than this build");
    }

    for (const m of pending) {
      await tx.unsafe(m.sql).simple();
      await tx`insert into schema_migrations (version, name, checksum) values (${m.version}, ${m.name}, ${m.checksum})`;
      log.info({ version: m.version, name: m.name }, "migration applied");
    }
    return { applied: pending.map((m) => m.version), version: Math.max(highestApplied, ...pending.map((m) => m.version)) };
  });
  log.debug({ ...result, durationMs: Date.now() - began }, "migrations checked");
  return result;
}

function pad(version: number): string {
  return String(version).padStart(4, "0");
}
