/**
 * A session-level advisory lock on a connection of its own, for a leader
 * whose lead spans transactions (the delivery worker).
 *
 * Not a reserved connection of the pool: a reserved connection whose server
 * went away cannot be told from a live one without sending on it, and a
 * statement sent on it, or its release, corrupted postgres.js's pool (during
 * a failover a pool statement then ran on the standby and others never
 * settled: test/interop/pg-failover.test.ts). A client of one connection
 * reports its close, and the lock dies with the session: from that moment
 * nothing more is sent under the lock (`run` refuses), so no statement meant
 * for the lock's session can run on a new one.
 */
import postgres, { type Sql } from "postgres";
import { isDatabaseUnavailable } from "./errors.js";

/** Why a statement under the lock was refused or failed: the lock is no longer held. */
export class LockLost extends Error {}

export interface SessionLockOptions {
  /** The coordinator's DATABASE_URL (target_session_attrs applies). */
  url: string;
  /** The bigint key of pg_try_advisory_lock. */
  key: bigint;
  /** application_name of the connection, for pg_stat_activity. */
  applicationName: string;
  /** A statement under the lock that takes longer loses the lock (its server may be gone unseen); default 5000. */
  statementMs?: number;
}

export class SessionLock {
  private client: Sql | undefined;
  private readonly statementMs: number;
  /** Bumped by every close of a connection: a session's identity. */
  private session = 0;
  private held: AbortController | undefined;

  constructor(private readonly options: SessionLockOptions) {
    this.statementMs = options.statementMs ?? 5000;
  }

  /**
   * Tries to take the lock. Resolves to a signal that aborts when the lock is
   * lost (its connection closed, a statement under it failed for the
   * connection or hung), or to undefined when another session holds it.
   * Throws when the database fails.
   */
  async tryLock(): Promise<AbortSignal | undefined> {
    if (this.held) return this.held.signal;
    const session = this.session;
    const sql = this.connection();
    const [{ ok }] = await this.bounded(sql<{ ok: boolean }[]>`select pg_try_advisory_lock(${this.options.key.toString()}::bigint) as ok`).catch((err: unknown) => {
      this.drop();
      throw err;
    });
    if (!ok) return undefined;
    // Taken on a session that closed since: gone with it.
    if (session !== this.session || this.client !== sql) return undefined;
    this.held = new AbortController();
    return this.held.signal;
  }

  /**
   * Runs `statement` on the lock's session while the lock is held. A
   * connection failure or a hang loses the lock; other errors are the
   * statement's own.
   */
  async run<T>(statement: (sql: Sql) => Promise<T>): Promise<T> {
    const held = this.held;
    const sql = this.client;
    if (!held || held.signal.aborted || !sql) throw new LockLost("the lock is not held");
    try {
      return await this.bounded(statement(sql));
    } catch (err) {
      if (err instanceof LockLost || isDatabaseUnavailable(err)) this.lose(held, err);
      throw err;
    }
  }

  /** Lets go of the lock, if held; idempotent. */
  async unlock(): Promise<void> {
    const held = this.held;
    const sql = this.client;
    if (!held || !sql) return;
    this.held = undefined;
    held.abort(new LockLost("unlocked"));
    await this.bounded(sql`select pg_advisory_unlock(${this.options.key.toString()}::bigint)`).catch(() => this.drop());
  }

  /** Unlocks and closes the connection. */
  async close(): Promise<void> {
    await this.unlock();
    const sql = this.client;
    this.client = undefined;
    await sql?.end({ timeout: 1 });
  }

  /** The client of the current session, opened when there is none. */
  private connection(): Sql {
    if (this.client) return this.client;
    const sql: Sql = postgres(this.options.url, {
      max: 1,
      // A close ends the session and the lock with it: none on purpose.
      idle_timeout: 0,
      max_lifetime: null,
      connect_timeout: 10,
      onnotice: () => undefined,
      connection: {
        application_name: this.options.applicationName,
        // A backend whose client left mid-statement (a hang the lock gave up
        // on) stops within 1 s instead of holding the lock until it ends.
        client_connection_check_interval: "1s",
      },
      onclose: () => {
        this.session++;
        if (this.client !== sql) return;
        this.held?.abort(new LockLost("the lock's connection closed"));
        this.held = undefined;
      },
    });
    this.client = sql;
    return sql;
  }

  /** `work`, or a LockLost once statementMs passed. */
  private bounded<T>(work: Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new LockLost(`a statement on the lock's connection took over ${this.statementMs} ms`)), this.statementMs);
      timer.unref?.();
    });
    work.catch(() => undefined); // settled late or never: nobody waits for it then
    return Promise.race([work, late]).finally(() => clearTimeout(timer));
  }

  private lose(held: AbortController, err: unknown): void {
    if (this.held === held) this.held = undefined;
    held.abort(err instanceof LockLost ? err : new LockLost(`a statement under the lock failed: ${String(err)}`));
    this.drop();
  }

  /**
   * Ends the current session at once (a session that hung may still hold
   * the lock: its end lets the server go of it); the next tryLock opens another.
   */
  private drop(): void {
    const sql = this.client;
    this.client = undefined;
    if (this.held) {
      this.held.abort(new LockLost("the lock's connection was dropped"));
      this.held = undefined;
    }
    void sql?.end({ timeout: 0 }).catch(() => undefined);
  }
}
