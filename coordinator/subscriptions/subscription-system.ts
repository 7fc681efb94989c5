/**
 * Subscriptions (docs/events.md, "Subscriptions"): SubscriptionService on
 * every replica, the delivery worker (which leads on one replica at a time
 * and follows the feed through the feed's reader), and the sweep of the
 * delivery log past its retention, run on every replica (idempotent). A
 * 'treadmill_subscriptions' notification (deliveries queued by Test or
 * Redeliver on any replica) wakes the worker's sender.
 */
import type { ConnectRouter } from "@connectrpc/connect";
import { SubscriptionService } from "../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { SweepLoop } from "../../lib/async/sweep-loop.js";
import type { CoordinatorContext } from "../context.js";
import { sweepDeliveries } from "../db/queries/subscriptions.js";
import type { FeedReader } from "../feed/reader.js";
import { Mailer } from "./email.js";
import { SubscriptionServiceImpl } from "./subscription-service.js";
import { DeliveryWorker } from "./worker.js";

export interface SubscriptionSystem {
  register(router: ConnectRouter): void;
  start(): Promise<void>;
  stop(): Promise<void>;
  /** The delivery worker, for tests (is it leading?). */
  worker: DeliveryWorker;
}

/** Deliveries one sweep statement deletes at most. */
const SWEEP_BATCH = 5000;

export function createSubscriptionSystem(ctx: CoordinatorContext, reader: FeedReader): SubscriptionSystem {
  const log = ctx.logger.child({ subsystem: "subscriptions" });
  const mailer = ctx.config.smtpUrl === "" ? undefined : new Mailer(ctx.config.smtpUrl, ctx.config.smtpFrom);
  const worker = new DeliveryWorker(ctx, reader, mailer);
  const service = new SubscriptionServiceImpl(ctx);
  const sweep = new SweepLoop(
    async () => {
      if (!ctx.notifications.connected) return false;
      const cutoff = new Date(ctx.clock() - ctx.config.subscriptionDeliveryRetentionMs);
      return (await sweepDeliveries(ctx.sql, cutoff, SWEEP_BATCH)) >= SWEEP_BATCH;
    },
    ctx.config.feedSweepIntervalMs,
    (err) => log.warn({ err }, "cannot sweep the delivery log"),
  );
  const unsubscribe: (() => void)[] = [];
  let stopping: Promise<void> | undefined;
  return {
    worker,
    register(router) {
      router.service(SubscriptionService, service);
    },
    async start() {
      unsubscribe.push(
        ctx.notifications.onResync(() => worker.wake()),
        await ctx.notifications.subscribe("treadmill_subscriptions", () => worker.wake()),
      );
      worker.start();
      sweep.start();
    },
    stop() {
      stopping ??= (async () => {
        for (const off of unsubscribe.splice(0)) off();
        await Promise.all([worker.stop(), sweep.stop()]);
        mailer?.close();
      })();
      return stopping;
    },
  };
}
