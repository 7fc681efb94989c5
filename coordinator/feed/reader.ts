/**
 * The feed's in-process reader: what EventService's streams use, and what
 * a delivery worker (webhooks, email) consumes by cursor. Stateless but for
 * the wake-up: a reader reads the table by cursor (db/queries/feed.ts), so
 * every replica serves the same order, and a consumer that restarts after
 * the last cursor it processed misses nothing and repeats nothing.
 *
 * Wake-ups: a 'treadmill_feed' notification (a batch of the sequencer, on
 * any replica, numbered events) or a resync of the notifications
 * connection calls `wake()`: every follower reads again. An idle follower
 * also reads every `idlePollMs`, in case a notification was lost.
 */
import type { Sql } from "postgres";
import { Notifier } from "../../lib/async/notifier.js";
import { type FeedCursor, type FeedFilter, type FeedRead, type FeedViewer, feedHead, readFeed } from "../db/queries/feed.js";

export interface FollowOptions {
  viewer: FeedViewer;
  filter?: FeedFilter;
  /** Ends the iteration (it returns). */
  signal: AbortSignal;
  /** Events considered per read; default 500. */
  batch?: number;
}

export class FeedReader {
  private readonly changes = new Notifier();
  private generation = 0;

  constructor(
    private readonly sql: Sql,
    private readonly idlePollMs = 5000,
  ) {}

  /** Says the feed may have grown: every follower reads again. */
  wake(): void {
    this.generation++;
    this.changes.notify();
  }

  /** One read after `after` (0: from the oldest kept; see readFeed); CursorExpiredError when events after it were deleted. */
  read(after: FeedCursor, options: { viewer: FeedViewer; filter?: FeedFilter; limit: number }): Promise<FeedRead> {
    return readFeed(this.sql, after, options);
  }

  /** The newest cursor given: where a reader that wants only what comes next starts. */
  head(): Promise<FeedCursor> {
    return feedHead(this.sql);
  }

  /**
   * Reads after `after` and then follows the feed: yields the first read at
   * once (even empty), then every read that found events or moved the
   * cursor, until the signal aborts. A consumer that records the last
   * `cursor` it processed and restarts after it sees every event once.
   * Rejects with CursorExpiredError when it falls behind retention.
   */
  async *follow(after: FeedCursor, options: FollowOptions): AsyncIterable<FeedRead> {
    const { signal } = options;
    const limit = options.batch ?? 500;
    let cursor = after;
    let first = true;
    while (!signal.aborted) {
      const seen = this.generation;
      const read = await this.read(cursor, { viewer: options.viewer, filter: options.filter, limit });
      const moved = read.cursor !== cursor;
      cursor = read.cursor;
      if (first || moved) yield read;
      first = false;
      if (read.full) continue;
      if (this.generation === seen) await this.changes.wait({ timeoutMs: this.idlePollMs, signal });
    }
  }
}
