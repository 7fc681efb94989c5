import type { Sql } from "postgres";
import type { Logger } from "../../lib/logger.js";

/** What a watcher receives: ids of changed hosts, or "all" after the listen connection was re-established. */
export type HostChanges = Set<string> | "all";

export interface HostSubscription extends AsyncIterable<HostChanges> {
  close(): void;
}

interface Watcher {
  pending: Set<string>;
  all: boolean;
  wake: (() => void) | undefined;
  closed: boolean;
}

/**
 * One LISTEN on `treadmill_hosts` per replica, shared by every WatchHosts
 * stream. Each watcher gets the ids changed since it last looked, coalesced
 * (a host changed ten times while the watcher was busy is reloaded once).
 */
export class HostWatchHub {
  private readonly watchers = new Set<Watcher>();
  private listening: Promise<{ unlisten(): Promise<void> }> | undefined;
  private listens = 0;

  constructor(
    private readonly sql: Sql,
    private readonly logger: Logger,
  ) {}

  /** Subscribes (LISTENing first, so nothing after this returns is missed). */
  async subscribe(signal: AbortSignal): Promise<HostSubscription> {
    const watcher: Watcher = { pending: new Set(), all: false, wake: undefined, closed: false };
    const close = () => {
      watcher.closed = true;
      this.watchers.delete(watcher);
      watcher.wake?.();
    };
    this.watchers.add(watcher);
    try {
      await this.listen();
    } catch (err) {
      close();
      throw err;
    }
    signal.addEventListener("abort", close, { once: true });
    return {
      close() {
        signal.removeEventListener("abort", close);
        close();
      },
      async *[Symbol.asyncIterator]() {
        while (!watcher.closed) {
          if (watcher.all) {
            watcher.all = false;
            watcher.pending.clear();
            yield "all";
          } else if (watcher.pending.size > 0) {
            const batch = watcher.pending;
            watcher.pending = new Set();
            yield batch;
          } else {
            await new Promise<void>((resolve) => (watcher.wake = resolve));
            watcher.wake = undefined;
          }
        }
      },
    };
  }

  /** Stops listening (the database is closing). */
  async close(): Promise<void> {
    const listening = this.listening;
    this.listening = undefined;
    for (const w of [...this.watchers]) {
      w.closed = true;
      w.wake?.();
    }
    this.watchers.clear();
    if (listening) await (await listening.catch(() => undefined))?.unlisten().catch(() => undefined);
  }

  private listen() {
    this.listening ??= this.sql
      .listen(
        "treadmill_hosts",
        (id) => {
          for (const w of this.watchers) {
            w.pending.add(id);
            w.wake?.();
          }
        },
        () => {
          // Called on every (re)connection: after the first, changes may have been missed.
          if (this.listens++ > 0) {
            this.logger.info("host change listener reconnected; watchers resync");
            for (const w of this.watchers) {
              w.all = true;
              w.wake?.();
            }
          }
        },
      )
      .catch((err: unknown) => {
        this.listening = undefined;
        throw err;
      });
    return this.listening;
  }
}
