/**
 * The coordinator's LISTEN connection (DESIGN.md §5: NOTIFY wakes schedulers
 * and streams across replicas). One connection of its own, held by a loop
 * that outlives the database: when the connection is lost (the server
 * restarted, failed over, or the socket died silently and a ping found it),
 * the loop reconnects with backoff, LISTENs on every subscribed channel
 * again, and only then calls every `onResync` handler, because whatever was
 * notified while it was away is lost: a handler must catch up by reading the
 * tables. Subscribers never see the connection, only their channel's
 * payloads and the resyncs.
 *
 * postgres.js's own `sql.listen` is not used: after a lost connection it
 * re-listens each channel once and drops any failure silently, so a restart
 * of PostgreSQL that outlasts that one attempt left channels unheard for good
 * (issue #18 defect 1).
 */
import postgres, { type Sql } from "postgres";
import type { Logger } from "../../lib/logger.js";
import { keepStreaming, sleep } from "../../lib/retry.js";

export interface NotificationsOptions {
  url: string;
  logger: Logger;
  /** How often the connection is pinged (a silent socket death is found within this plus the timeout); default 5000. */
  pingMs?: number;
  /** Reconnection backoff (full jitter); default 100 ms to 2 s. */
  backoff?: { initialMs: number; maxMs: number };
}

type Handler = (payload: string) => void;

const CHANNEL = /^[a-z_][a-z0-9_]{0,62}$/;

export class Notifications {
  private readonly handlers = new Map<string, Set<Handler>>();
  private readonly resyncs = new Set<(downMs: number) => void>();
  private readonly stateWatchers = new Set<(connected: boolean) => void>();
  private readonly log: Logger;
  private readonly stopper = new AbortController();
  private conn: Sql | undefined;
  private isConnected = false;
  private loop: Promise<void> | undefined;
  /** Set when the current connection is found lost; the loop waits on it. */
  private lost: (() => void) | undefined;

  constructor(private readonly options: NotificationsOptions) {
    this.log = options.logger.child({ subsystem: "notifications" });
  }

  /** Whether the channels are being listened to now. */
  get connected(): boolean {
    return this.isConnected;
  }

  /**
   * Calls `handler` with each payload notified on `channel`. Resolves once the
   * channel is listened to (at once when disconnected: the next connection
   * listens to it, and resyncs). Returns the unsubscribe function.
   */
  async subscribe(channel: string, handler: Handler): Promise<() => void> {
    if (!CHANNEL.test(channel)) throw new Error(`bad channel name ${channel}`);
    let set = this.handlers.get(channel);
    const fresh = set === undefined;
    if (!set) this.handlers.set(channel, (set = new Set()));
    set.add(handler);
    if (fresh && this.isConnected && this.conn) {
      await this.conn.unsafe(`listen "${channel}"`).catch((err: unknown) => this.connectionLost(err));
    }
    return () => {
      set.delete(handler);
      // The channel stays listened to: an UNLISTEN costs a round trip and saves nothing.
    };
  }

  /**
   * Calls `handler` after every reconnection (not the first connection),
   * once every channel is listened to again, with how long the connection
   * was lost.
   */
  onResync(handler: (downMs: number) => void): () => void {
    this.resyncs.add(handler);
    return () => this.resyncs.delete(handler);
  }

  /** Calls `watcher` at every change of `connected` (health, metrics). */
  onStateChange(watcher: (connected: boolean) => void): () => void {
    this.stateWatchers.add(watcher);
    return () => this.stateWatchers.delete(watcher);
  }

  /** Connects; rejects (fail fast at start-up) when the first connection fails. Then keeps it. */
  async start(): Promise<void> {
    if (this.loop) return;
    await this.connect();
    this.loop = this.run();
  }

  /** Closes the connection and stops reconnecting. Idempotent; never waits on the database. */
  async stop(): Promise<void> {
    this.stopper.abort();
    this.lost?.();
    await this.loop;
    await this.closeConnection();
  }

  /**
   * Holds the connection: waits until it is lost, then reconnects with
   * backoff (at most 2 s: the coordinator serves nothing until it is back)
   * and resyncs. The first connection is start()'s.
   */
  private async run(): Promise<void> {
    let lostAt = Date.now();
    let failures = 0;
    await keepStreaming({
      open: async (attempt) => {
        if (attempt.number > 1) {
          try {
            await this.connect();
          } catch (err) {
            await this.closeConnection();
            throw err;
          }
          this.log.info({ attempts: failures + 1 }, "notifications connection restored; resyncing");
          failures = 0;
          attempt.healthy();
          for (const resync of this.resyncs) {
            try {
              resync(Date.now() - lostAt);
            } catch (err) {
              this.log.error({ err }, "resync handler failed");
            }
          }
        }
        await this.untilLost();
        if (this.stopper.signal.aborted) return;
        lostAt = Date.now();
        this.setConnected(false);
        await this.closeConnection();
      },
      backoff: { ...(this.options.backoff ?? { initialMs: 100, maxMs: 2000 }), jitter: "full" },
      signal: this.stopper.signal,
      onError: (err) => {
        failures++;
        // The first failure of an outage and every 20th: an operator needs the start and a pulse, not a line per try.
        if (failures === 1 || failures % 20 === 0) this.log.warn({ err, attempts: failures }, "cannot reach the database for notifications; retrying");
        return "retry";
      },
    });
  }

  /** Opens a connection and LISTENs on every channel; throws when either fails. */
  private async connect(): Promise<void> {
    let lostHere = false;
    const conn = postgres(this.options.url, {
      max: 1,
      idle_timeout: 0,
      max_lifetime: null,
      connect_timeout: 10,
      fetch_types: false,
      onnotice: () => undefined,
      connection: { application_name: "treadmill-coordinator-listen" },
      onnotify: (channel: string, payload: string) => this.dispatch(channel, payload),
      onclose: () => {
        lostHere = true;
        if (this.conn === conn) this.connectionLost(new Error("notifications connection closed"));
      },
    } as postgres.Options<Record<string, never>>);
    this.conn = conn;
    const channels = [...this.handlers.keys()];
    // One round trip; `select 1` when there is no channel yet proves the connection.
    await conn.unsafe(channels.length === 0 ? "select 1" : channels.map((c) => `listen "${c}"`).join("; "));
    if (lostHere) throw new Error("notifications connection closed while listening");
    this.setConnected(true);
    this.log.debug({ channels }, "listening for notifications");
  }

  private async untilLost(): Promise<void> {
    const pingMs = this.options.pingMs ?? 5000;
    const gone = new Promise<void>((resolve) => (this.lost = resolve));
    while (!this.stopper.signal.aborted) {
      const outcome = await Promise.race([gone.then(() => "lost" as const), sleep(pingMs, this.stopper.signal).then(() => "ping" as const, () => "lost" as const)]);
      if (outcome === "lost") break;
      const conn = this.conn;
      if (!conn) break;
      let timer: NodeJS.Timeout | undefined;
      const alive = await Promise.race([
        conn`select 1`.then(() => true, () => false),
        new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), pingMs))),
      ]);
      clearTimeout(timer);
      if (!alive) {
        this.log.warn("notifications connection does not answer");
        break;
      }
    }
    this.lost = undefined;
  }

  private connectionLost(err: unknown): void {
    if (this.isConnected) this.log.warn({ err: err instanceof Error ? err.message : String(err) }, "notifications connection lost");
    this.setConnected(false);
    this.lost?.();
  }

  private setConnected(connected: boolean): void {
    if (this.isConnected === connected) return;
    this.isConnected = connected;
    for (const watcher of this.stateWatchers) watcher(connected);
  }

  private async closeConnection(): Promise<void> {
    const conn = this.conn;
    this.conn = undefined;
    // timeout 0: the socket is cut at once, nothing waits on a dead server.
    await conn?.end({ timeout: 0 }).catch(() => undefined);
  }

  private dispatch(channel: string, payload: string): void {
    const set = this.handlers.get(channel);
    if (!set) return;
    for (const handler of set) {
      try {
        handler(payload);
      } catch (err) {
        this.log.error({ err, channel }, "notification handler failed");
      }
    }
  }
}
