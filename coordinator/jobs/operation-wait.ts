/**
 * Waiting for an operation a supervisor answers (a snapshot, a host
 * control) to end: on its job's timeline events, which every step of such
 * an operation writes and which reach every replica ('treadmill_jobs'), and
 * at every heartbeat (a host that went away sends nothing, and `current`
 * is what notices), bounded by the call's deadline.
 */
import { Code, ConnectError, type HandlerContext } from "@connectrpc/connect";
import { Notifier } from "../../lib/async/notifier.js";
import type { JobWatchers } from "./watchers.js";

/**
 * `current()` until `ended` says so; at the call's deadline DeadlineExceeded
 * with `stillPending` (the operation goes on), without reading it again.
 */
export async function waitOperation<T extends { job_id: string }>(options: {
  watchers: JobWatchers;
  current: () => Promise<T>;
  ended: (row: T) => boolean;
  heartbeatMs: number;
  hctx: HandlerContext;
  stillPending: string;
}): Promise<T> {
  const { watchers, current, ended, heartbeatMs, hctx } = options;
  let row = await current();
  if (ended(row)) return row;
  const changed = new Notifier();
  const unsubscribe = watchers.subscribe(row.job_id, () => changed.notify());
  try {
    for (;;) {
      // Waiting from before the read, so a change during it is not missed.
      const woken = changed.wait({ timeoutMs: heartbeatMs, signal: hctx.signal });
      row = await current();
      if (ended(row)) return row;
      await woken;
      // A call given up reads no more: `current` may end the operation, which is its waiting caller's to see.
      if (hctx.signal.aborted) throw new ConnectError(options.stillPending, Code.DeadlineExceeded);
    }
  } finally {
    changed.notify();
    unsubscribe();
  }
}
