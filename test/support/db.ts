/**
 * A fresh database per test file, cloned from the migrated template that
 * global-setup.ts made: `const db = await createTestDatabase()` in beforeAll,
 * `await db.drop()` in afterAll.
 */
import { randomBytes } from "node:crypto";
import postgres, { type Sql } from "postgres";

export interface TestDatabase {
  /** The new database's URL. */
  url: string;
  name: string;
  /** A pool on it. */
  sql: Sql;
  /** Ends the pool and drops the database. Idempotent. */
  drop(): Promise<void>;
}

let counter = 0;

/** The test server's URL (a maintenance database), as global-setup.ts left it. */
export function testServerUrl(): string {
  const url = process.env.TREADMILL_TEST_PG_URL;
  if (!url) throw new Error("TREADMILL_TEST_PG_URL is not set: run the tests through jest (test/support/global-setup.ts)");
  return url;
}

/**
 * Creates a database with a unique name. Default: a copy of the migrated
 * template; `{ empty: true }`: an empty one (template0), e.g. to test migrations.
 */
export async function createTestDatabase(options: { empty?: boolean; max?: number } = {}): Promise<TestDatabase> {
  const serverUrl = testServerUrl();
  const template = options.empty ? "template0" : (process.env.TREADMILL_TEST_PG_TEMPLATE ?? "treadmill_template");
  const name = `treadmill_test_${process.pid}_${++counter}_${randomBytes(3).toString("hex")}`;
  await withAdmin(serverUrl, (admin) => admin`create database ${admin(name)} template ${admin(template)}`);
  const target = new URL(serverUrl);
  target.pathname = `/${name}`;
  const url = target.toString();
  const sql = postgres(url, { max: options.max ?? 5, onnotice: () => undefined });
  let dropping: Promise<void> | undefined;
  return {
    url,
    name,
    sql,
    drop() {
      dropping ??= (async () => {
        await sql.end({ timeout: 5 });
        await withAdmin(serverUrl, (admin) => admin`drop database if exists ${admin(name)} with (force)`);
      })();
      return dropping;
    },
  };
}

async function withAdmin(url: string, fn: (admin: Sql) => Promise<unknown>): Promise<void> {
  const admin = postgres(url, { max: 1, onnotice: () => undefined });
  try {
    await fn(admin);
  } finally {
    await admin.end({ timeout: 5 });
  }
}
