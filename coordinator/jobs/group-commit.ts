/**
 * Group commit of the supervisors' news (DESIGN.md §4): the reports and
 * acknowledgements of every stream of this replica go into a queue, and one
 * transaction applies all that waits, so a busy replica commits once for many
 * streams instead of once per message. A change resolves once its
 * transaction has committed (a stream acknowledges a report only then).
 *
 * Nothing waits for a timer: an idle queue starts a transaction at once, and
 * what arrives meanwhile goes into the next one. Within a transaction the
 * jobs of the batch are locked first, in id order (the job system's lock
 * order: job rows before their job_hosts rows), then the changes of
 * different jobs run side by side, their statements pipelined on the
 * transaction's connection, and the changes of one job one after the other
 * in arrival order. If the transaction fails, each of its changes is tried
 * again in a transaction of its own, so one bad change fails alone.
 */
import type { Sql, TransactionSql } from "postgres";
import { customPlans } from "./store.js";

/** At most this many changes in one transaction. */
const MAX_BATCH = 500;

interface Change {
  jobId: string;
  apply: (tx: TransactionSql) => Promise<unknown>;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class GroupCommit {
  private queue: Change[] = [];
  private flushing: Promise<void> | undefined;

  constructor(private readonly sql: Sql) {}

  /** Runs `apply` (a change to job `jobId` and its rows) in a shared transaction; resolves after the commit. */
  run(jobId: string, apply: (tx: TransactionSql) => Promise<unknown>): Promise<void> {
    return new Promise((resolve, reject) => {
      this.queue.push({ jobId, apply, resolve, reject });
      this.flushing ??= this.flush().finally(() => (this.flushing = undefined));
    });
  }

  /** Resolves once everything queued so far is settled. */
  async idle(): Promise<void> {
    while (this.flushing) await this.flushing;
  }

  private async flush(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.queue.splice(0, MAX_BATCH);
      try {
        await this.sql.begin((tx) => applyAll(tx, batch));
        for (const c of batch) c.resolve();
      } catch (err) {
        if (batch.length === 1) {
          batch[0].reject(err);
          continue;
        }
        for (const c of batch) await this.sql.begin((tx) => applyAll(tx, [c])).then(c.resolve, c.reject);
      }
    }
  }
}

async function applyAll(tx: TransactionSql, batch: Change[]): Promise<void> {
  const byJob = new Map<string, Change[]>();
  for (const c of batch) {
    const list = byJob.get(c.jobId);
    if (list) list.push(c);
    else byJob.set(c.jobId, [c]);
  }
  customPlans(tx);
  // Executed before any statement of the changes (they follow it on the connection).
  const lock = tx`select 1 from jobs where id = any(${[...byJob.keys()].sort()}::uuid[]) order by id for update`.execute();
  // Every change runs to its end before the transaction ends: one that went on
  // after a failure of another must not issue statements once it rolled back.
  const results = await Promise.allSettled([
    lock,
    ...[...byJob.values()].map(async (changes) => {
      for (const c of changes) await c.apply(tx);
    }),
  ]);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw failed.reason;
}
