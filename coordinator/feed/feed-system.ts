/**
 * The event feed (docs/events.md): EventService, the in-process reader
 * every stream of this replica shares (and a delivery worker would take),
 * and the retention sweep. Wired to the database's notifications
 * ('treadmill_feed': some transaction committed events; a resync: some may
 * have been missed): both wake the reader's followers, which read by
 * cursor, so a lost notification delays nothing beyond the next wake-up.
 * The sweep runs on every replica; its deletions are a prefix of the feed
 * and idempotent, so replicas sweeping at once agree.
 */
import type { ConnectRouter } from "@connectrpc/connect";
import { EventService } from "../../gen/treadmill/coordinator/v1/event_service_pb.js";
import { SweepLoop } from "../../lib/async/sweep-loop.js";
import type { CoordinatorContext } from "../context.js";
import { sweepFeed } from "../db/queries/feed.js";
import { EventServiceImpl } from "./event-service.js";
import { FeedReader } from "./reader.js";

export interface FeedSystem {
  /** The reader: read and follow the feed by position (FeedReader). */
  reader: FeedReader;
  register(router: ConnectRouter): void;
  start(): Promise<void>;
  stop(): Promise<void>;
  /** Runs one retention sweep now (tests). Resolves with the events it deleted. */
  sweep(): Promise<number>;
}

/** Events one sweep statement deletes at most. */
const SWEEP_BATCH = 5000;

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
  const unsubscribe: (() => void)[] = [];
  let stopping: Promise<void> | undefined;
  return {
    reader,
    sweep,
    register(router) {
      router.service(EventService, service);
    },
    async start() {
      unsubscribe.push(
        ctx.notifications.onResync(() => reader.wake()),
        await ctx.notifications.subscribe("treadmill_feed", () => reader.wake()),
      );
      loop.start();
    },
    stop() {
      stopping ??= (async () => {
        for (const off of unsubscribe.splice(0)) off();
        await loop.stop();
      })();
      return stopping;
    },
  };
}
