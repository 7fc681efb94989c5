import type { Notifications } from "../db/notifications.js";
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
  private listening: Promise<unknown> | undefined;

  constructor(
    private readonly notifications: Notifications,
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

  /** Ends every watcher (the database is closing). */
  async close(): Promise<void> {
    for (const w of [...this.watchers]) {
      w.closed = true;
      w.wake?.();
    }
    this.watchers.clear();
  }

  /** Listens once per replica, on the first watcher. */
  private listen(): Promise<unknown> {
    this.listening ??= (async () => {
      // After a lost connection, changes may have been missed: every watcher diffs everything.
      this.notifications.onResync(() => {
        this.logger.info("host change listener reconnected; watchers resync");
        for (const w of this.watchers) {
          w.all = true;
          w.wake?.();
        }
      });
      await this.notifications.subscribe("treadmill_hosts", (id) => {
        for (const w of this.watchers) {
          w.pending.add(id);
          w.wake?.();
        }
      });
    })().catch((err: unknown) => {
      this.listening = undefined;
      throw err;
    });
    return this.listening;
  }
}
