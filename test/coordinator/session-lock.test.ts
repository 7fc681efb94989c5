/**
 * coordinator/db/session-lock.ts on a real PostgreSQL: one holder at a time,
 * the lock lost (and nothing more sent under it) when its session dies or a
 * statement hangs, and taken again on a new session.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { LockLost, SessionLock } from "../../coordinator/db/session-lock.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";
import { waitUntil } from "../support/wait.js";

const KEY = 0x7465737431n;

describe("SessionLock", () => {
  let db: TestDatabase;
  const locks: SessionLock[] = [];
  const lock = (statementMs?: number) => {
    const l = new SessionLock({ url: db.url, key: KEY, applicationName: "session-lock-test", statementMs });
    locks.push(l);
    return l;
  };
  const holderPids = async () =>
    (
      await db.sql<{ pid: number }[]>`select pid from pg_locks where locktype = 'advisory' and granted
        and ((classid::bigint << 32) | objid::bigint) = ${KEY.toString()}::bigint`
    ).map((r) => r.pid);

  beforeAll(async () => {
    db = await createTestDatabase();
  });

  afterAll(async () => {
    await Promise.all(locks.map((l) => l.close()));
    await db.drop();
  });

  it("is held by one session at a time and passes on when unlocked", async () => {
    const a = lock();
    const b = lock();
    const held = await a.tryLock();
    expect(held?.aborted).toBe(false);
    expect(await b.tryLock()).toBeUndefined();
    expect(await a.tryLock()).toBe(held); // already held: the same lead
    await a.unlock();
    expect(held?.aborted).toBe(true);
    await expect(a.run((sql) => sql`select 1`)).rejects.toBeInstanceOf(LockLost);
    expect(await b.tryLock()).toBeDefined();
    await b.close();
    expect(await holderPids()).toEqual([]);
  });

  it("loses the lock when its session is killed, refuses statements from then on, and takes it again on a new session", async () => {
    const a = lock();
    const held = await a.tryLock();
    const [{ pid }] = await a.run((sql) => sql<{ pid: number }[]>`select pg_backend_pid() as pid`);
    await db.sql`select pg_terminate_backend(${pid})`;
    await waitUntil(async () => held?.aborted || undefined, "the lead's signal aborted", 10_000);
    expect(held?.reason).toBeInstanceOf(LockLost);
    await expect(a.run((sql) => sql`select 1`)).rejects.toBeInstanceOf(LockLost);
    const again = await a.tryLock();
    expect(again?.aborted).toBe(false);
    const [{ pid: newPid }] = await a.run((sql) => sql<{ pid: number }[]>`select pg_backend_pid() as pid`);
    expect(newPid).not.toBe(pid);
    expect(await holderPids()).toEqual([newPid]);
    await a.unlock();
  });

  it("loses the lock when a statement under it hangs, and its backend ends (not the statement) so that another can take it", async () => {
    const a = lock(300);
    const b = lock();
    const held = await a.tryLock();
    await expect(a.run((sql) => sql`select pg_sleep(30)`)).rejects.toBeInstanceOf(LockLost);
    expect(held?.aborted).toBe(true);
    await waitUntil(async () => (await b.tryLock()) ?? undefined, "the other lock taken", 10_000);
    await b.unlock();
  });

  it("keeps the lock when a statement fails on its own (not the connection)", async () => {
    const a = lock();
    const held = await a.tryLock();
    await expect(a.run((sql) => sql`select 1/0`)).rejects.toThrow(/division by zero/);
    expect(held?.aborted).toBe(false);
    expect(await a.run((sql) => sql<{ one: number }[]>`select 1 as one`)).toEqual([{ one: 1 }]);
    await a.unlock();
  });
});
