/**
 * The fixes scripts/patch-dependencies.mjs applies to dependencies, each
 * shown against a real PostgreSQL (postinstall applied them to this
 * node_modules).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import postgres from "postgres";
import { type TestDatabase, createTestDatabase } from "../support/db.js";

describe("the patched postgres driver", () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase();
  });
  afterAll(async () => {
    await db.drop();
  });

  it("reserves sql.begin's connection even when BEGIN fills the connection's pipeline (porsager/postgres#1189)", async () => {
    // max_pipeline 0 (an option of the URL; the driver's types omit it):
    // every BEGIN fills its connection's pipeline, the case 10,000
    // supervisors attaching at once reach by chance.
    const url = new URL(db.url);
    url.searchParams.set("max_pipeline", "0");
    const sql = postgres(url.toString(), { max: 2, onnotice: () => undefined });
    try {
      const results = await Promise.all(
        Array.from({ length: 20 }, (_, i) => sql.begin(async (tx) => (await tx<{ n: number }[]>`select ${i}::int as n`)[0].n)),
      );
      expect(results).toEqual(Array.from({ length: 20 }, (_, i) => i));
      // No connection went back to the pool inside a transaction.
      const [{ n }] = await db.sql<{ n: number }[]>`
        select count(*)::int as n from pg_stat_activity where datname = ${db.name} and state like 'idle in transaction%'`;
      expect(n).toBe(0);
    } finally {
      await sql.end({ timeout: 5 });
    }
  });
});
