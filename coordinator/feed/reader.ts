/**
 * The feed's in-process reader: what EventService's streams use, and what
 * a delivery worker (webhooks, email) consumes by cursor. A reader reads
 * the table by cursor (db/queries/feed.ts), so every replica serves the
 * same order, and a consumer that restarts after the last cursor it
 * processed misses nothing and repeats nothing.
 *
 * Wake-ups: a 'treadmill_feed' notification (a batch of the sequencer, on
 * any replica, numbered events) or a resync of the notifications
 * connection calls `wake()`: every follower reads again. An idle follower
 * also reads every `idlePollMs`, in case a notification was lost.
 *
 * Short cut: this replica's sequencer hands each batch it numbered to
 * `publish()`, and a follower whose cursor is right before a batch takes
 * its events from memory instead of reading the table (a batch's cursors
 * are contiguous, so nothing can be between). Under load this saves the
 * coordinator a round trip and a notification per batch and follower, which
 * is most of a follower's latency. Anything else (a batch of another
 * replica, a follower behind) is read from the table.
 */
import type { Sql } from "postgres";
import { Notifier } from "../../lib/async/notifier.js";
import { type FeedCursor, type FeedEvent, type FeedFilter, type FeedRead, type FeedViewer, feedHead, readFeed, seenBy } from "../db/queries/feed.js";

export interface FollowOptions {
  viewer: FeedViewer;
  filter?: FeedFilter;
  /** Ends the iteration (it returns). */
  signal: AbortSignal;
  /** Events considered per read; default 500. */
  batch?: number;
}

/** Events of the sequencer's latest batches kept in memory for followers that are caught up (whole batches; the newest always). */
const RECENT_EVENTS = 10_000;

export class FeedReader {
  private readonly changes = new Notifier();
  private generation = 0;
  /** The newest cursor this replica has heard of (its batches, other replicas' notifications). */
  private known: FeedCursor = 0n;
  /** This replica's latest batches, oldest first, each in cursor order. */
  private readonly recent: FeedEvent[][] = [];
  private recentEvents = 0;

  constructor(
    private readonly sql: Sql,
    private readonly idlePollMs = 5000,
  ) {}

  /** Says the feed may have grown (to `newest`, when known): every follower reads again. */
  wake(newest?: FeedCursor): void {
    if (newest !== undefined && newest > this.known) this.known = newest;
    this.generation++;
    this.changes.notify();
  }

  /** A batch this replica's sequencer numbered (contiguous cursors, in order): followers take it from memory. */
  publish(batch: FeedEvent[]): void {
    if (batch.length === 0) return;
    this.recent.push(batch);
    this.recentEvents += batch.length;
    while (this.recentEvents > RECENT_EVENTS && this.recent.length > 1) this.recentEvents -= this.recent.shift()!.length;
    this.wake(batch[batch.length - 1].cursor);
  }

  /** One read after `after` (0: from the oldest kept; see readFeed); CursorExpiredError when events after it were deleted. */
  read(after: FeedCursor, options: { viewer: FeedViewer; filter?: FeedFilter; limit: number }): Promise<FeedRead> {
    return readFeed(this.sql, after, options);
  }

  /** The newest cursor given: where a reader that wants only what comes next starts. */
  head(): Promise<FeedCursor> {
    return feedHead(this.sql);
  }

  /** Up to `limit` events right after `after` from the batches in memory, or undefined when they do not start there. */
  private fromMemory(after: FeedCursor, limit: number): { events: FeedEvent[]; full: boolean } | undefined {
    const batch = this.recent.find((b) => b[0].cursor <= after + 1n && after < b[b.length - 1].cursor);
    if (!batch) return undefined;
    const start = Number(after + 1n - batch[0].cursor);
    const events = batch.slice(start, start + limit);
    return { events, full: start + limit < batch.length || this.recent.some((b) => b[0].cursor === events[events.length - 1].cursor + 1n) };
  }

  /**
   * Reads after `after` and then follows the feed: yields the first read at
   * once (even empty), then every read that found events or moved the
   * cursor, until the signal aborts. A consumer that records the last
   * `cursor` it processed and restarts after it sees every event once.
   * Rejects with CursorExpiredError when it falls behind retention.
   */
  async *follow(after: FeedCursor, options: FollowOptions): AsyncIterable<FeedRead> {
    const { signal, viewer } = options;
    const filter = options.filter ?? {};
    const limit = options.batch ?? 500;
    let cursor = after;
    let first = true;
    while (!signal.aborted) {
      const seen = this.generation;
      const memory = first ? undefined : this.fromMemory(cursor, limit);
      const read = memory ? seenBy(memory.events, cursor, viewer, filter, memory.full) : await this.read(cursor, { viewer, filter, limit });
      const moved = read.cursor !== cursor;
      cursor = read.cursor;
      if (first || moved) yield read;
      first = false;
      if (read.full) continue;
      // Memory holds only this replica's batches: one of another replica may come next.
      if (memory && cursor < this.known) continue;
      if (this.generation === seen) await this.changes.wait({ timeoutMs: this.idlePollMs, signal });
    }
  }
}
