import { randomUUID } from "node:crypto";
import { createServingComponent, type ServingComponent } from "../lib/component.js";
import type { Logger } from "../lib/logger.js";
import type { Authorize, Server, ServerOptions } from "../lib/server.js";
import { createRawGrpcHandler } from "../lib/grpc/server.js";
import { authorizeCaller } from "./auth.js";
import { bootstrapAdmin } from "./bootstrap.js";
import { DEFAULT_CONSOLE_DIR, consoleAssets } from "./console-assets.js";
import type { CoordinatorConfig } from "./config.js";
import type { CoordinatorContext } from "./context.js";
import { openDatabase, type Database } from "./db/database.js";
import { databaseInterceptor, databaseUnavailable, mapDatabaseError } from "./db/errors.js";
import { ATTACH_PROCEDURE, attachRoute } from "./jobs/attach-grpc.js";
import { createJobSystem, type JobSystem } from "./jobs/job-system.js";
import { createLeaseSystem, type LeaseSystem } from "./leases/lease-system.js";
import { WATCH_EVENTS_PROCEDURE, createFeedSystem, type FeedSystem } from "./feed/feed-system.js";
import { createSubscriptionSystem, type SubscriptionSystem } from "./subscriptions/subscription-system.js";
import { coordinatorRoutes } from "./routes.js";
import { registerHostMetrics } from "./services/host-stats.js";
import { SigningKeys } from "./signing.js";
import { textInterceptor } from "./text.js";
import { Gauge } from "prom-client";
import { ServingStatus } from "../lib/server.js";
import type { Notifications } from "./db/notifications.js";
import { AuthService } from "../gen/treadmill/coordinator/v1/auth_service_pb.js";

/** Whether `work` settles within `ms` (it goes on either way). */
async function settlesWithin(work: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const settled = await Promise.race([
    work.then(
      () => true,
      () => true,
    ),
    new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms))),
  ]);
  clearTimeout(timer);
  return settled;
}

/** Procedures that need no database: the signing keys are held in memory. */
const DATABASE_FREE: ReadonlySet<string> = new Set([`/${AuthService.typeName}/${AuthService.method.getSigningKeys.name}`]);

/**
 * The authorization hook behind the database gate (databaseInterceptor's,
 * which runs after the hook): resolving a caller reads the database, so
 * while it is away a call gets Unavailable, not Internal, on every protocol
 * and on the hand-framed Attach.
 */
function gatedByDatabase(authorize: Authorize, notifications: Notifications): Authorize {
  return async (procedure, headers, values) => {
    if (!DATABASE_FREE.has(procedure) && !notifications.connected) throw databaseUnavailable();
    try {
      await authorize(procedure, headers, values);
    } catch (err) {
      throw mapDatabaseError(err);
    }
  };
}

/**
 * The server is NOT_SERVING while its database is away (the notifications
 * connection is lost), SERVING again once it is back, with a gauge on
 * /metrics: a coordinator that cannot schedule says so.
 */
function watchDatabase(notifications: Notifications, server: Server, logger: Logger): void {
  const gauge = new Gauge({
    name: "treadmill_coordinator_database_connected",
    help: "1 while the coordinator reaches its database (its notifications connection is up), else 0.",
    registers: [server.metrics],
  });
  const apply = (connected: boolean) => {
    gauge.set(connected ? 1 : 0);
    server.health.setStatus("", connected ? ServingStatus.SERVING : ServingStatus.NOT_SERVING);
    if (!connected) logger.error("database unreachable: not serving until it is back");
    else logger.info("database reachable again: serving");
  };
  gauge.set(notifications.connected ? 1 : 0);
  notifications.onStateChange(apply);
}

export interface CoordinatorDeps {
  config: CoordinatorConfig;
  logger: Logger;
  clock?: () => number;
  /**
   * Shows the first admin's generated password to the operator, once (main.ts
   * passes standard error). Without it the password is not shown: start with
   * --admin-password instead.
   */
  announce?: (text: string) => void;
}

/**
 * The coordinator: PostgreSQL (embedded unless DATABASE_URL names one, with
 * migrations applied at start), the signing keys, the job system (scheduler
 * and supervisor streams) and one server for `treadmill.coordinator.v1`.
 * start() fails fast and undoes what it opened; stop() is idempotent:
 * the server drains first (streams close), then the loops, then the database.
 */
export function createCoordinator({ config, logger, clock = Date.now, announce }: CoordinatorDeps): ServingComponent {
  let db: Database | undefined;
  let jobs: JobSystem | undefined;
  let leases: LeaseSystem | undefined;
  let feed: FeedSystem | undefined;
  let subscriptions: SubscriptionSystem | undefined;

  // The loops stop after the server drained (its streams closed), then the database.
  const close = async () => {
    const stopping = Promise.all([jobs?.stop(), leases?.stop(), feed?.stop(), subscriptions?.stop()]);
    if (stopping !== undefined && !(await settlesWithin(stopping, config.graceMs))) {
      // A loop waits on a database that is away: closing the pool fails what waits.
      logger.warn({ graceMs: config.graceMs }, "background loops did not stop within the grace period; closing the database under them");
      await db?.close();
    }
    await stopping;
    await db?.close();
  };

  /** What open() wired for the server: its options, and what must see the server before it listens. */
  let wired: { options: Partial<ServerOptions>; prepare(server: Server): void } | undefined;
  return createServingComponent({
    name: "coordinator",
    config,
    logger,
    async open() {
      try {
        const database = await openDatabase({
          url: config.databaseUrl === "" ? undefined : config.databaseUrl,
          dataDir: config.dataDir,
          logger: logger.child({ subsystem: "database" }),
        });
        db = database;
        const keys = await SigningKeys.load(database.sql, {
          issuer: "treadmill-coordinator",
          logger: logger.child({ subsystem: "keys" }),
          clock,
        });
        const ctx: CoordinatorContext = { sql: database.sql, databaseUrl: database.url, notifications: database.notifications, logger, config, clock, keys, replicaId: randomUUID() };
        await bootstrapAdmin(ctx, { announce });
        const parts = createJobSystem(ctx);
        jobs = parts;
        leases = createLeaseSystem(ctx);
        feed = createFeedSystem(ctx);
        subscriptions = createSubscriptionSystem(ctx, feed.reader);
        // Plain-gRPC Attach (every supervisor) goes to its own procedure;
        // Connect and gRPC-Web callers reach it through the adapter.
        const rawAttach = createRawGrpcHandler({
          routes: [attachRoute(parts.streams)],
          maxMessageBytes: config.readMaxBytes,
          // databaseInterceptor's mapping, for the calls it does not see.
          mapError: mapDatabaseError,
        });
        const assets = config.console
          ? consoleAssets({ dir: config.consoleDir || DEFAULT_CONSOLE_DIR, logger: logger.child({ subsystem: "console" }) })
          : undefined;
        wired = {
          options: {
            routes: coordinatorRoutes(ctx, parts, leases, feed, subscriptions),
            authorize: gatedByDatabase(authorizeCaller({ sql: database.sql, clock }), database.notifications),
            interceptors: [databaseInterceptor(database.notifications, DATABASE_FREE), textInterceptor()],
            // Control messages, mostly small; a StartJob with its tokens is
            // just over gzip's 1 KiB threshold, where compressing costs the
            // coordinator more CPU than the bytes are worth.
            bulkProcedures: [ATTACH_PROCEDURE, WATCH_EVENTS_PROCEDURE],
            http: (req, res, extra) => rawAttach(req, res, extra) || (assets?.(req, res) ?? false),
          },
          prepare(server) {
            parts.metrics.register(server.metrics);
            leases?.registerMetrics(server.metrics);
            feed?.registerMetrics(server.metrics);
            registerHostMetrics(server.metrics, {
              sql: database.sql,
              logger: logger.child({ subsystem: "host-metrics" }),
              connected: () => database.notifications.connected,
            });
            watchDatabase(database.notifications, server, logger);
          },
        };
      } catch (err) {
        await close();
        throw err;
      }
    },
    server: () => wired?.options ?? {},
    prepare: (server) => wired?.prepare(server),
    started: async () => {
      await jobs?.start();
      await leases?.start();
      await feed?.start();
      await subscriptions?.start();
    },
    close,
  });
}
