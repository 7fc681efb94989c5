/**
 * The subscriptions' settings (docs/events.md, "Subscriptions"), spread
 * into the coordinator's schema (coordinator/config.ts). Every duration is
 * configurable so that tests run the 24-hour windows in seconds. Keys become
 * `--<key>` flags and `TREADMILL_COORDINATOR_<KEY>` environment variables.
 */
import type { ConfigOf } from "../../lib/config.js";
import { DEFAULT_WEBHOOK_DENY } from "./address-deny.js";

const SECOND = 1000;
const HOUR = 3600 * SECOND;
const DAY = 24 * HOUR;

export const subscriptionConfigFields = {
  subscriptionRetryInitialMs: {
    type: "duration",
    default: 10 * SECOND,
    min: 1,
    description: "delay before a failed delivery's first retry; each next one doubles (with jitter) up to subscription-retry-max-ms",
  },
  subscriptionRetryMaxMs: {
    type: "duration",
    default: HOUR,
    min: 1,
    description: "longest delay between two attempts of one delivery",
  },
  subscriptionRetryWindowMs: {
    type: "duration",
    default: DAY,
    min: 1,
    description: "how long a delivery is retried after it was queued before it is given up (failed)",
  },
  subscriptionDisableAfterMs: {
    type: "duration",
    default: DAY,
    min: 1,
    description: "a subscription whose destination has failed without a success for this long is disabled and its owner told",
  },
  subscriptionWebhookTimeoutMs: {
    type: "duration",
    default: 10 * SECOND,
    min: 1,
    description: "how long a webhook endpoint has to answer one POST (a timeout is retried)",
  },
  subscriptionWebhookDeny: {
    type: "list",
    default: DEFAULT_WEBHOOK_DENY,
    description:
      "addresses and CIDR ranges webhooks may not reach, checked on what a name resolves to (default: link-local, where cloud metadata services answer, and unspecified); add your private ranges to keep users' webhooks out of them",
  },
  subscriptionDeliveryRetentionMs: {
    type: "duration",
    default: 7 * DAY,
    min: 1000,
    description: "how long the delivery log keeps a delivery",
  },
  subscriptionDigestWindowMs: {
    type: "duration",
    default: HOUR,
    min: 1,
    description: "default window of an email digest: the events of one window go out in one message",
  },
  subscriptionLeaderPollMs: {
    type: "duration",
    default: 2 * SECOND,
    min: 1,
    description: "how often a replica that does not run the delivery worker tries to take it over (advisory lock)",
  },
  subscriptionMaxPerUser: {
    type: "int",
    default: 100,
    min: 1,
    description: "subscriptions one user may own; CreateSubscription beyond it answers ResourceExhausted",
  },
  smtpUrl: {
    type: "string",
    default: "",
    secret: true,
    description: "SMTP server for email subscriptions (smtp://user:pass@host:587, smtps://host:465); empty: email destinations are refused",
  },
  smtpFrom: {
    type: "string",
    default: "treadmill@localhost",
    description: "sender address of subscription emails",
  },
} as const;

/** The subscriptions' settings as loaded. */
export type SubscriptionConfig = ConfigOf<typeof subscriptionConfigFields>;
