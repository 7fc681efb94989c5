/**
 * The feed's in-process reader: what EventService's streams use, and what
 * a delivery worker (webhooks, email) consumes by cursor. Stateless but for
 * the wake-up: a reader reads the table by position (db/queries/feed.ts),
 * so every replica serves the same order, and a follower that restarts
 * from its last position misses nothing and repeats nothing.
 *
 * Wake-ups: a 'treadmill_feed' notification (one per committing transaction
 * that wrote events, from any replica) or a resync of the notifications
 * connection bumps `generation` and wakes every follower, which reads again.
 * A read that finds rows held back by a running transaction (see readFeed)
 * polls again soon, since the transaction holding them back may write no
 * event and so notify nobody; an idle follower also reads every
 * `idlePollMs` in case a notification was lost with a connection.
 */
import type { Sql } from "postgres";
import { Notifier } from "../../lib/async/notifier.js";
import {
  type FeedFilter,
  type FeedPosition,
  type FeedRead,
  type FeedViewer,
  comparePositions,
  feedHead,
  feedHorizon,
  readFeed,
} from "../db/queries/feed.js";

export interface FollowOptions {
  viewer: FeedViewer;
  filter?: FeedFilter;
  /** Ends the iteration (it returns). */
  signal: AbortSignal;
  /** Rows considered per read; default 500. */
  batch?: number;
}

/** Polling delays while rows are held back: from the first to the last, doubling. */
const HELD_BACK_POLL = { firstMs: 2, maxMs: 50 };

export class FeedReader {
  private readonly changes = new Notifier();
  private generation = 0;

  constructor(
    private readonly sql: Sql,
    private readonly idlePollMs = 5000,
  ) {}

  /** Says the feed may have grown (a notification, a resync): every follower reads again. */
  wake(): void {
    this.generation++;
    this.changes.notify();
  }

  /** One read after `after` (see readFeed); CursorExpiredError when `after` was swept. */
  read(after: FeedPosition, options: { viewer: FeedViewer; filter?: FeedFilter; limit: number }): Promise<FeedRead> {
    return readFeed(this.sql, after, options);
  }

  /** Where a reader that wants only what comes next starts. */
  head(): Promise<FeedPosition> {
    return feedHead(this.sql);
  }

  /** Where a reader that wants every retained event starts. */
  horizon(): Promise<FeedPosition> {
    return feedHorizon(this.sql);
  }

  /**
   * Reads after `after` and then follows the feed: yields the first read at
   * once (even empty), then every read that found events or moved the
   * position, until the signal aborts. A consumer that records the last
   * `position` it processed and restarts from it sees every event once.
   * Rejects with CursorExpiredError when the position falls behind retention.
   */
  async *follow(after: FeedPosition, options: FollowOptions): AsyncIterable<FeedRead> {
    const { signal } = options;
    const limit = options.batch ?? 500;
    let position = after;
    let first = true;
    let heldPollMs = HELD_BACK_POLL.firstMs;
    while (!signal.aborted) {
      const seen = this.generation;
      const read = await this.read(position, { viewer: options.viewer, filter: options.filter, limit });
      const moved = comparePositions(read.position, position) !== 0;
      position = read.position;
      if (first || moved) yield read;
      first = false;
      if (read.full) continue;
      let waitMs = this.idlePollMs;
      if (read.heldBack) {
        waitMs = heldPollMs;
        heldPollMs = Math.min(heldPollMs * 2, HELD_BACK_POLL.maxMs);
      } else heldPollMs = HELD_BACK_POLL.firstMs;
      if (this.generation === seen) await this.changes.wait({ timeoutMs: waitMs, signal });
    }
  }
}
