/**
 * A transaction on a connection of its own (`sql.reserve()`), so that BEGIN
 * is pipelined with the first statements instead of costing a round trip
 * (the scheduler's pass, the group commit).
 *
 * A reserved connection whose server went away must never be used or given
 * back again: postgres.js 3.4 then writes to its closed socket from a timer
 * and the process dies (porsager/postgres#1208), and a released dead
 * connection would be handed to the next query. So after a connection
 * failure nothing more is sent on it and it is not released: the pool keeps
 * it among its closed connections and reconnects it when needed.
 */
import type { ReservedSql, Sql } from "postgres";
import { isDatabaseUnavailable } from "./errors.js";

/** Runs `fn` on a reserved connection; rolls back and rethrows when it fails. `fn` sends BEGIN and COMMIT itself. */
export async function withReserved<T>(sql: Sql, fn: (tx: ReservedSql) => Promise<T>): Promise<T> {
  const tx = await sql.reserve();
  let result: T;
  try {
    result = await fn(tx);
  } catch (err) {
    let alive = !isDatabaseUnavailable(err);
    if (alive) await tx`rollback`.catch((rollbackErr: unknown) => (alive = !isDatabaseUnavailable(rollbackErr)));
    if (alive) tx.release();
    throw err;
  }
  tx.release();
  return result;
}

/**
 * Sends a statement whose result nobody awaits (BEGIN, a SET LOCAL ahead of
 * the statements that depend on it): its failure shows in theirs, and must
 * not be an unhandled rejection.
 */
export function pipeline(statement: { execute(): Promise<unknown> }): void {
  statement.execute().catch(() => undefined);
}
