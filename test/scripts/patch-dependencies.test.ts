/**
 * The fixes scripts/patch-dependencies.mjs applies to dependencies, each
 * shown against a real PostgreSQL (postinstall applied them to this
 * node_modules).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createServer, connect, type Server, type Socket } from "node:net";
import postgres from "postgres";
import { type TestDatabase, createTestDatabase } from "../support/db.js";

/** `work`'s value, or `failure` when it takes over 10 s. */
async function within<T>(work: Promise<T>, failure: string): Promise<T | string> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<string>((resolve) => (timer = setTimeout(() => resolve(failure), 10000)));
  try {
    return await Promise.race([work, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** A TCP proxy to the test's PostgreSQL that can go away (its connections cut, new ones refused) and come back on the same port. */
async function outageProxy(target: URL): Promise<{ port: number; down(): Promise<void>; up(): Promise<void> }> {
  let server: Server | undefined;
  const sockets = new Set<Socket>();
  let port = 0;
  const up = () =>
    new Promise<void>((resolve) => {
      server = createServer((client) => {
        const upstream = connect(Number(target.port), target.hostname);
        for (const s of [client, upstream]) {
          sockets.add(s);
          s.on("close", () => sockets.delete(s));
          s.on("error", () => (s === client ? upstream : client).destroy());
        }
        client.pipe(upstream).pipe(client);
      });
      server.listen(port, "127.0.0.1", () => {
        port = (server!.address() as { port: number }).port;
        resolve();
      });
    });
  const down = () =>
    new Promise<void>((resolve) => {
      server!.close(() => resolve());
      for (const s of sockets) s.destroy();
    });
  await up();
  return { port, up, down };
}

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

  it("settles every sql.reserve made while the server is away, once it is back, and loses no connection of the pool", async () => {
    // A reserve handed to a connection being opened for another request was
    // dropped when that connection came up (it never settled: a scheduling
    // pass hung after PostgreSQL restarted), and a reserve that had failed
    // stayed queued and took a connection with it.
    const proxy = await outageProxy(new URL(db.url));
    const url = new URL(db.url);
    url.port = String(proxy.port);
    const sql = postgres(url.toString(), { max: 4, onnotice: () => undefined, backoff: () => 0.05 });
    try {
      await sql`select 1`;
      await proxy.down();
      const attempts: Promise<string>[] = [];
      for (let i = 0; i < 40; i++) {
        attempts.push(sql.reserve().then((r) => (r.release(), "reserved"), () => "failed"));
        await new Promise((r) => setTimeout(r, 10));
      }
      await proxy.up();
      expect(await within(Promise.all(attempts).then((all) => all.length), "some reserve never settled")).toBe(40);
      // Every connection of the pool serves again: four held at once.
      const held = Promise.all(Array.from({ length: 4 }, () => sql.reserve()));
      expect(await within(held.then((all) => (all.forEach((r) => r.release()), all.length)), "a connection of the pool was lost")).toBe(4);
    } finally {
      await sql.end({ timeout: 1 });
      await proxy.down();
    }
  }, 60000);

  it("fails the statements of a reserved handle whose connection closed, even when the pool has reopened that connection, and ignores its release", async () => {
    // The handle outlived its connection: a statement on it went out on the
    // session the pool had opened since (outside its transaction), and its
    // release handed that connection to the pool a second time.
    const proxy = await outageProxy(new URL(db.url));
    const url = new URL(db.url);
    url.port = String(proxy.port);
    const sql = postgres(url.toString(), { max: 1, onnotice: () => undefined, backoff: () => 0.05 });
    try {
      const stale = await sql.reserve();
      const [{ pid: first }] = await stale<{ pid: number }[]>`select pg_backend_pid() as pid`;
      await proxy.down();
      await expect(stale`select 1`).rejects.toMatchObject({ code: expect.stringMatching(/^CONNECTION_/) });
      await proxy.up();
      // The pool's one connection opens again, for the pool.
      const [{ pid: reopened }] = await sql<{ pid: number }[]>`select pg_backend_pid() as pid`;
      expect(reopened).not.toBe(first);
      const late = await within(stale`select 1`.then(() => "ran", (err: { code?: string }) => err.code ?? "failed"), "the statement never settled");
      expect(late).toBe("CONNECTION_CLOSED");
      stale.release();
      // The connection is the pool's once: a reserve holds it, and the pool's queries wait for it.
      const holder = await sql.reserve();
      let poolRan = false;
      const pooled = sql`select 1`.then(() => (poolRan = true));
      await holder`select pg_sleep(0.2)`;
      expect(poolRan).toBe(false);
      holder.release();
      await within(pooled, "the pool's query never ran");
      expect(poolRan).toBe(true);
    } finally {
      await sql.end({ timeout: 1 });
      await proxy.down();
    }
  }, 60000);
});
