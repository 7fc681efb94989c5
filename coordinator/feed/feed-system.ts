/**
 * The event feed (docs/events.md): EventService, the in-process reader
 * every stream of this replica shares (and a delivery worker would take),
 * the sequencer and the retention sweep. Wired to the database's
 * notifications: 'treadmill_feed_pending' (some transaction committed
 * events) wakes the sequencer, 'treadmill_feed' (a batch numbered events)
 * the reader's followers, a resync both; each also runs on a period, so a
 * lost notification delays, never loses. The sequencer and the sweep run on
 * every replica: the sequencer's batches follow one another under one lock,
 * and the sweep's deletions are a prefix of the feed, so replicas agree.
 */
import type { ConnectRouter } from "@connectrpc/connect";
import { Gauge, type Registry } from "prom-client";
import { EventService } from "../../gen/treadmill/coordinator/v1/event_service_pb.js";
import { SweepLoop } from "../../lib/async/sweep-loop.js";
import type { CoordinatorContext } from "../context.js";
import { connectPool } from "../db/database.js";
import { stampFeed, sweepFeed } from "../db/queries/feed.js";
import { EventServiceImpl } from "./event-service.js";
import { FeedReader } from "./reader.js";

export interface FeedSystem {
  /** The reader: read and follow the feed by position (FeedReader). */
  reader: FeedReader;
  register(router: ConnectRouter): void;
  start(): Promise<void>;
  stop(): Promise<void>;
  /** Serves the feed's gauges on the server's /metrics. */
  registerMetrics(registry: Registry): void;
  /** Runs one retention sweep now (tests). Resolves with the events it deleted. */
  sweep(): Promise<number>;
}

/**
 * WatchEvents, served uncompressed: a stream of small, frequent messages,
 * where gzip on the coordinator's one thread costs a follower more in
 * latency than the bytes are worth.
 */
export const WATCH_EVENTS_PROCEDURE = `/${EventService.typeName}/${EventService.method.watchEvents.name}`;

/** Events one sweep statement deletes at most. */
const SWEEP_BATCH = 5000;
/** Events one batch of the sequencer numbers at most. */
const STAMP_BATCH = 5000;
/** The sequencer's period without notifications (a lost one, a dead replica's writes). */
const STAMP_PERIOD_MS = 1000;

export function createFeedSystem(ctx: CoordinatorContext): FeedSystem {
  const log = ctx.logger.child({ subsystem: "feed" });
  const reader = new FeedReader(ctx.sql);
  const service = new EventServiceImpl(reader);
  const sweep = () => sweepFeed(ctx.sql, new Date(ctx.clock() - ctx.config.feedRetentionMs), SWEEP_BATCH);
  const loop = new SweepLoop(
    async () => {
      if (!ctx.notifications.connected) return false;
      const deleted = await sweep();
      if (deleted > 0) log.debug({ deleted }, "events past retention deleted");
      return deleted >= SWEEP_BATCH;
    },
    ctx.config.feedSweepIntervalMs,
    (err) => log.warn({ err }, "cannot sweep the event feed"),
  );
  // The sequencer's own connection: under load the main pool's are all in
  // the job system's transactions, and every event's latency waited for one.
  const stampSql = connectPool(ctx.databaseUrl, log, { max: 1, applicationName: "treadmill-coordinator-feed" });
  const sequencer = new SweepLoop(
    async () => {
      if (!ctx.notifications.connected) return false;
      const numbered = await stampFeed(stampSql, STAMP_BATCH);
      // This replica's followers take it from memory, without waiting for the batch's notification.
      reader.publish(numbered);
      return numbered.length >= STAMP_BATCH;
    },
    STAMP_PERIOD_MS,
    (err) => log.warn({ err }, "cannot number the event feed's new events"),
  );
  const unsubscribe: (() => void)[] = [];
  let stopping: Promise<void> | undefined;
  return {
    reader,
    sweep,
    register(router) {
      router.service(EventService, service);
    },
    registerMetrics(registry) {
      new Gauge({
        name: "treadmill_coordinator_feed_events",
        help: "The event feed: events written but not yet numbered (state=pending: stays near 0 while a sequencer runs), the newest cursor given (state=last_cursor) and the newest deleted by retention (state=swept_cursor).",
        labelNames: ["state"] as const,
        registers: [registry],
        async collect() {
          if (!ctx.notifications.connected) return;
          try {
            const [row] = await ctx.sql<{ pending: number; last: string; swept: string }[]>`
              select (select count(*)::int from feed_pending) as pending, last_cursor::text as last, swept_cursor::text as swept from feed_state`;
            this.set({ state: "pending" }, row.pending);
            this.set({ state: "last_cursor" }, Number(row.last));
            this.set({ state: "swept_cursor" }, Number(row.swept));
          } catch (err) {
            log.warn({ err }, "cannot read the event feed's metrics");
          }
        },
      });
    },
    async start() {
      unsubscribe.push(
        ctx.notifications.onResync(() => {
          sequencer.wake();
          reader.wake();
        }),
        await ctx.notifications.subscribe("treadmill_feed_pending", () => sequencer.wake()),
        await ctx.notifications.subscribe("treadmill_feed", (newest) => reader.wake(/^\d{1,19}$/.test(newest) ? BigInt(newest) : undefined)),
      );
      sequencer.start();
      loop.start();
    },
    stop() {
      stopping ??= (async () => {
        for (const off of unsubscribe.splice(0)) off();
        await Promise.all([sequencer.stop(), loop.stop()]);
        await stampSql.end({ timeout: 5 });
      })();
      return stopping;
    },
  };
}
