import { join } from "node:path";
import postgres, { type Sql } from "postgres";
import type { Logger } from "../../lib/logger.js";
import { startEmbeddedPostgres, type EmbeddedPostgres } from "./embedded.js";
import { migrate, type Migration } from "./migrate.js";
import { Notifications } from "./notifications.js";

export interface DatabaseOptions {
  /** A PostgreSQL 14+ URL (DATABASE_URL); without one, an embedded server runs in `dataDir/postgres`. */
  url?: string;
  /** The coordinator's state directory. */
  dataDir: string;
  logger: Logger;
  /** Pool size; default 10. */
  max?: number;
  /** Instead of the files in coordinator/migrations (tests). */
  migrations?: Migration[];
}

export interface Database {
  sql: Sql;
  /** LISTEN/NOTIFY on a connection of its own that survives restarts of the server (notifications.ts). */
  notifications: Notifications;
  /** The URL connected to (with the embedded server's password: do not log it). */
  url: string;
  /** Ends the pool, then stops the embedded server if any. Idempotent. */
  close(): Promise<void>;
}

/**
 * A pool of connections to `url` with the coordinator's session settings.
 * The coordinator's main pool is one; a loop whose latency matters under
 * load (the feed's sequencer) has one of its own, so that it never waits
 * behind the job system's transactions for a connection.
 */
export function connectPool(url: string, log: Logger, options: { max: number; applicationName?: string }): Sql {
  return postgres(url, {
    max: options.max,
    onnotice: (notice) => log.debug({ notice: notice.message }, "postgres notice"),
    // JIT off: the job system's statements read a set of rows from JSON
    // (jsonb_to_recordset, estimated at 100 rows), which puts their plans
    // over jit_above_cost, and a server built with LLVM (Debian's, most
    // distributions') then compiled them at every execution: 10-30 ms of
    // each scheduling read that takes 1 ms without (docs/scale.md).
    connection: { application_name: options.applicationName ?? "treadmill-coordinator", jit: "off" },
    // Seconds before a failed connection is tried again. The driver's own
    // grows to 20 s over a few failures, so after an outage of the server
    // queries waited up to 20 s for it to come back: at most 2 s here.
    backoff: (retries: number) => Math.min(2, 0.05 * 2 ** retries) * (0.5 + Math.random() / 2),
  });
}

/**
 * Connects to PostgreSQL (starting the embedded server when no URL is given)
 * and applies the pending migrations. Fails fast, undoing what it started.
 */
export async function openDatabase(options: DatabaseOptions): Promise<Database> {
  const log = options.logger;
  let embedded: EmbeddedPostgres | undefined;
  let url = options.url;
  if (url === undefined || url === "") {
    embedded = await startEmbeddedPostgres({ dataDir: join(options.dataDir, "postgres"), port: 0, logger: log });
    url = embedded.url;
  }
  const sql = connectPool(url, log, { max: options.max ?? 10 });
  const notifications = new Notifications({ url, logger: log });
  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= (async () => {
      const reachable = notifications.connected;
      await notifications.stop();
      // Queries in flight get 5 s to finish, unless the server is away: then nothing will.
      await sql.end({ timeout: reachable ? 5 : 0 });
      await embedded?.stop();
    })();
    return closing;
  };
  try {
    await migrate(sql, { logger: log, migrations: options.migrations });
    await notifications.start();
  } catch (err) {
    await close();
    throw err;
  }
  log.info({ embedded: embedded !== undefined }, "database ready");
  return { sql, notifications, url, close };
}
