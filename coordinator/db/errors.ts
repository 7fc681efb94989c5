/**
 * The database being unreachable is a dependency down (DESIGN.md §11:
 * `Unavailable`, retryable), never a bug: callers get `Unavailable` at once
 * while the coordinator knows its database is away (its notifications
 * connection is lost), and any RPC that meets a connection failure on its
 * way gets the same answer instead of `Internal`.
 */
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { NETWORK_ERRNO } from "../../lib/retry.js";
import type { Notifications } from "./notifications.js";

/** postgres.js's codes for a connection that failed or went away, beside the network's own. */
const CONNECTION_CODES = new Set(["CONNECTION_CLOSED", "CONNECTION_ENDED", "CONNECTION_DESTROYED", "CONNECT_TIMEOUT", ...NETWORK_ERRNO]);

/**
 * SQLSTATEs of a server that cannot serve now: class 08 (connection
 * exception), admin/crash shutdown and "cannot connect now" (57P01-57P03),
 * too many connections (53300), and a standby that refuses writes after a
 * failover (25006 read_only_sql_transaction).
 */
const UNAVAILABLE_STATES = /^(08...|57P0[1-3]|53300|25006)$/;

/** Whether `err` says the database cannot be reached or cannot serve now. */
export function isDatabaseUnavailable(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && (CONNECTION_CODES.has(code) || UNAVAILABLE_STATES.test(code));
}

/** The error every caller gets while the database is away. */
export function databaseUnavailable(): ConnectError {
  return new ConnectError("the coordinator's database is unavailable; retry shortly", Code.Unavailable);
}

/** `err` as the client should see it: Unavailable for a database outage, else unchanged. */
export function mapDatabaseError(err: unknown): unknown {
  return !(err instanceof ConnectError) && isDatabaseUnavailable(err) ? databaseUnavailable() : err;
}

/**
 * Fails calls of `treadmill.*` services fast with Unavailable while the
 * notifications connection is lost (the database is away), except those in
 * `exempt` (they need no database); maps connection failures met during a
 * call to Unavailable, streams included. Health and reflection pass.
 */
export function databaseInterceptor(notifications: Notifications, exempt: ReadonlySet<string>): Interceptor {
  return (next) => async (req) => {
    const procedure = `/${req.service.typeName}/${req.method.name}`;
    if (!req.service.typeName.startsWith("treadmill.") || exempt.has(procedure)) return next(req);
    if (!notifications.connected) throw databaseUnavailable();
    let res;
    try {
      res = await next(req);
    } catch (err) {
      throw mapDatabaseError(err);
    }
    if (!res.stream) return res;
    return { ...res, message: mapStream(res.message) };
  };
}

async function* mapStream<T>(messages: AsyncIterable<T>): AsyncGenerator<T> {
  try {
    yield* messages;
  } catch (err) {
    throw mapDatabaseError(err);
  }
}
