import { describe, it, expect, beforeAll, afterAll } from "@jest/globals";
import postgres, { type Sql } from "postgres";
import { MIGRATION_LOCK_KEY, loadMigrations, migrate, migration, type Migration } from "../../coordinator/db/migrate.js";
import { openDatabase } from "../../coordinator/db/database.js";
import { silentLogger } from "../../lib/logger.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";
import { waitUntil } from "../support/wait.js";

const logger = silentLogger();

const m1 = migration("0001_first.sql", "create table a (id int primary key);\ninsert into a values (1);");
const m2 = migration("0002_second.sql", "create table b (id int primary key);\nalter table a add column note text;");

async function appliedVersions(sql: Sql): Promise<number[]> {
  const rows = await sql<{ version: number }[]>`select version from schema_migrations order by version`;
  return rows.map((r) => r.version);
}

describe("migrations", () => {
  const databases: TestDatabase[] = [];
  const fresh = async () => {
    const db = await createTestDatabase({ empty: true });
    databases.push(db);
    return db;
  };

  afterAll(async () => {
    await Promise.all(databases.map((db) => db.drop()));
  });

  it("loads the coordinator's files in order with checksums", async () => {
    const migrations = await loadMigrations();
    expect(migrations[0]).toMatchObject({ version: 1, name: "init" });
    expect(migrations[0].checksum).toMatch(/^[0-9a-f]{64}$/);
    expect(migrations.map((m) => m.version)).toEqual([...migrations.map((m) => m.version)].sort((a, b) => a - b));
  });

  it("rejects badly named or duplicate migrations", async () => {
    expect(() => migration("1_x.sql", "")).toThrow("NNNN_name.sql");
    const db = await fresh();
    await expect(migrate(db.sql, { logger, migrations: [m1, migration("0001_again.sql", "select 1")] })).rejects.toThrow(
      "two migrations have version 1",
    );
  });

  it("applies each migration once; applying again changes nothing", async () => {
    const db = await fresh();
    await expect(migrate(db.sql, { logger, migrations: [m1] })).resolves.toEqual({ applied: [1], version: 1 });
    await expect(migrate(db.sql, { logger, migrations: [m1, m2] })).resolves.toEqual({ applied: [2], version: 2 });
    const before = await db.sql`select version, name, checksum, applied_at from schema_migrations order by version`;
    await expect(migrate(db.sql, { logger, migrations: [m1, m2] })).resolves.toEqual({ applied: [], version: 2 });
    const after = await db.sql`select version, name, checksum, applied_at from schema_migrations order by version`;
    expect(after).toEqual(before);
    expect(await db.sql`select id, note from a`).toEqual([{ id: 1, note: null }]);
  });

  it("refuses a migration whose file changed after it was applied", async () => {
    const db = await fresh();
    await migrate(db.sql, { logger, migrations: [m1] });
    const edited = migration("0001_first.sql", "create table a (id bigint primary key);");
    await expect(migrate(db.sql, { logger, migrations: [edited, m2] })).rejects.toThrow(
      "migration 0001_first changed after it was applied (checksum mismatch)",
    );
    expect(await appliedVersions(db.sql)).toEqual([1]);
  });

  it("refuses a pending migration older than an applied one", async () => {
    const db = await fresh();
    const onlySecond = migration("0002_second.sql", "select 1");
    await migrate(db.sql, { logger, migrations: [onlySecond] });
    await expect(migrate(db.sql, { logger, migrations: [m1, onlySecond] })).rejects.toThrow(
      "migration 0001_first is older than the applied 0002; renumber it",
    );
  });

  it("rolls back every migration of a run when one fails", async () => {
    const db = await fresh();
    const broken = migration("0003_broken.sql", "create table c (id int);\nselect * from no_such_table;");
    await expect(migrate(db.sql, { logger, migrations: [m1, m2, broken] })).rejects.toThrow("no_such_table");
    const tables = await db.sql`select tablename from pg_tables where schemaname = 'public' and tablename in ('a', 'b', 'c')`;
    expect(tables).toEqual([]);
    await expect(migrate(db.sql, { logger, migrations: [m1, m2] })).resolves.toEqual({ applied: [1, 2], version: 2 });
  });

  it("lets two replicas migrate a fresh database at once: both succeed, each migration applied once", async () => {
    const db = await fresh();
    const replicaA = postgres(db.url, { max: 2, onnotice: () => undefined });
    const replicaB = postgres(db.url, { max: 2, onnotice: () => undefined });
    const holder = postgres(db.url, { max: 1, onnotice: () => undefined });
    const migrations: Migration[] = await loadMigrations();
    try {
      // Hold the lock so both replicas are certainly waiting on it together.
      let release!: () => void;
      const released = new Promise<void>((resolve) => (release = resolve));
      const holding = holder.begin(async (tx) => {
        await tx`select pg_advisory_xact_lock(${MIGRATION_LOCK_KEY.toString()}::bigint)`;
        await released;
      });
      await waitUntil(async () => {
        const [row] = await db.sql<{ n: number }[]>`
          select count(*)::int as n from pg_locks where locktype = 'advisory' and granted`;
        return row.n === 1;
      }, "the lock held", 10_000);
      const a = migrate(replicaA, { logger, migrations });
      const b = migrate(replicaB, { logger, migrations });
      await waitUntil(async () => {
        const [row] = await db.sql<{ n: number }[]>`
          select count(*)::int as n from pg_locks where locktype = 'advisory' and not granted`;
        return row.n === 2;
      }, "both replicas waiting on the lock", 10_000);
      release();
      await holding;
      const results = await Promise.all([a, b]);
      const all = migrations.map((m) => m.version);
      expect(results.map((r) => r.applied).sort((x, y) => y.length - x.length)).toEqual([all, []]);
      expect(await appliedVersions(db.sql)).toEqual(all);

      // And without the helper lock, racing from the start.
      const db2 = await fresh();
      const c = postgres(db2.url, { max: 1, onnotice: () => undefined });
      const d = postgres(db2.url, { max: 1, onnotice: () => undefined });
      try {
        const raced = await Promise.all([migrate(c, { logger, migrations }), migrate(d, { logger, migrations })]);
        expect(raced.flatMap((r) => r.applied)).toEqual(all);
        expect(await appliedVersions(db2.sql)).toEqual(all);
      } finally {
        await Promise.all([c.end(), d.end()]);
      }
    } finally {
      await Promise.all([replicaA.end(), replicaB.end(), holder.end()]);
    }
  });
});

describe("the initial schema", () => {
  let db: TestDatabase;

  beforeAll(async () => {
    db = await createTestDatabase();
  });

  afterAll(async () => {
    await db.drop();
  });

  it("is in the template every test database is cloned from", async () => {
    const tables = await db.sql<{ tablename: string }[]>`
      select tablename from pg_tables where schemaname = 'public' order by tablename`;
    // The foundation's tables are there (later migrations add more).
    expect(tables.map((t) => t.tablename)).toEqual(
      expect.arrayContaining([
        "api_tokens",
        "group_members",
        "groups",
        "hosts",
        "images",
        "job_events",
        "job_hosts",
        "jobs",
        "schema_migrations",
        "services",
        "signing_keys",
        "users",
      ]),
    );
    await expect(migrate(db.sql, { logger })).resolves.toMatchObject({ applied: [] });
  });

  it("enforces its constraints", async () => {
    const sql = db.sql;
    const userId = "01900000-0000-7000-8000-000000000001";
    await sql`insert into users (id, name) values (${userId}, 'alice')`;
    await expect(sql`insert into users (id, name) values (${"01900000-0000-7000-8000-000000000002"}, 'alice')`).rejects.toThrow(
      /unique/,
    );
    await expect(sql`insert into users (id, name, role) values (${"01900000-0000-7000-8000-000000000003"}, 'bob', 'root')`).rejects.toThrow(
      /check/,
    );
    const jobId = "01900000-0000-7000-8000-0000000000a1";
    await sql`insert into jobs (id, owner_id, spec) values (${jobId}, ${userId}, ${sql.json({ image: "x" })})`;
    const [job] = await sql`select state, attempt, priority from jobs where id = ${jobId}`;
    expect(job).toEqual({ state: "queued", attempt: 1, priority: 0 });
    await expect(sql`update jobs set state = 'finalized' where id = ${jobId}`).rejects.toThrow(/check/);
    await sql`update jobs set state = 'finalized', reason = 'canceled', finalized_at = now() where id = ${jobId}`;
    await expect(
      sql`insert into images (name, tag, digest) values ('busybox', 'latest', 'sha256:nothex')`,
    ).rejects.toThrow(/check/);
    await sql`insert into hosts (id, name, driver_kind, tags) values (${"01900000-0000-7000-8000-0000000000b1"}, 'h1', 'process', ${sql.json({ board: "nrf52840dk", arch: "x86_64" })})`;
    const matched = await sql`select name from hosts where tags @> ${sql.json({ board: "nrf52840dk" })}`;
    expect(matched).toEqual([{ name: "h1" }]);
  });
});

describe("openDatabase", () => {
  it("connects to a given url with JIT off, migrates, and closes idempotently", async () => {
    const db = await createTestDatabase({ empty: true });
    try {
      const database = await openDatabase({ url: db.url, dataDir: "/nonexistent", logger });
      expect(await appliedVersions(database.sql)).toEqual((await loadMigrations()).map((m) => m.version));
      // Its sessions never JIT-compile (database.ts: a scheduling read costs 10-30 ms more on an LLVM build).
      const [{ jit }] = await database.sql`select current_setting('jit') as jit`;
      expect(jit).toBe("off");
      await Promise.all([database.close(), database.close()]);
    } finally {
      await db.drop();
    }
  });

  it("fails fast with a bad migration and closes what it opened", async () => {
    const db = await createTestDatabase({ empty: true });
    try {
      await expect(
        openDatabase({ url: db.url, dataDir: "/nonexistent", logger, migrations: [migration("0001_bad.sql", "nonsense;")] }),
      ).rejects.toThrow(/syntax error/);
    } finally {
      await db.drop();
    }
  });
});
