/**
 * The event feed's settings (docs/events.md), spread into the coordinator's
 * schema (coordinator/config.ts). Keys become `--<key>` flags and
 * `TREADMILL_COORDINATOR_<KEY>` environment variables.
 */
import type { ConfigOf } from "../../lib/config.js";

const DAY = 24 * 3600_000;

export const feedConfigFields = {
  feedRetentionMs: {
    type: "duration",
    default: 7 * DAY,
    min: 1000,
    description: "how long the event feed keeps an event; a cursor older than that is expired (OUT_OF_RANGE)",
  },
  feedSweepIntervalMs: {
    type: "duration",
    default: 60_000,
    min: 10,
    description: "period of the sweep that deletes events past feed-retention-ms",
  },
} as const;

/** The feed's settings as loaded. */
export type FeedConfig = ConfigOf<typeof feedConfigFields>;
