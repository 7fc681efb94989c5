import type { Sql } from "postgres";
import type { Logger } from "../lib/logger.js";
import type { Notifications } from "./db/notifications.js";
import type { CoordinatorConfig } from "./config.js";
import type { SigningKeys } from "./signing.js";

/**
 * What every coordinator service and loop is given: its dependencies, passed
 * in (no module-level singletons). Built once in `start()`.
 */
export interface CoordinatorContext {
  sql: Sql;
  /** The URL `sql` connects to, for a connection of a loop's own (db/session-lock.ts); holds a password: never log it. */
  databaseUrl: string;
  /** LISTEN/NOTIFY across replicas; handlers of `onResync` catch up after a lost connection. */
  notifications: Notifications;
  logger: Logger;
  config: CoordinatorConfig;
  /** Milliseconds since the epoch; tests may replace it. */
  clock: () => number;
  /** Capability-token keys: mint tokens for stores, log servers, proxies. */
  keys: SigningKeys;
  /** This replica's id (a fresh UUID per process), for streams and audit. */
  replicaId: string;
}
