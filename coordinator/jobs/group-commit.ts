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
 * order: job rows before their job_hosts rows). Then the changes go in
 * rounds: round k takes the k-th change of every job (a job's changes keep
 * their arrival order), and the changes of a round, all on distinct jobs,
 * run side by side: the common kinds (a report of progress, an end, an
 * acknowledged StartJob) as a few set-based statements for all of them, so
 * a batch costs a few statements per round rather than several per change;
 * any other change on its own, its statements pipelined with the rest. If
 * the transaction fails, each of its changes is tried again in a transaction
 * of its own, so one bad change fails alone.
 */
import type { Sql } from "postgres";
import { isDatabaseUnavailable } from "../db/errors.js";
import { pipeline, withReserved } from "../db/reserved.js";
import type { JobMetrics } from "./metrics.js";
import { markStarted } from "../db/queries/job-hosts.js";
import { type Db, customPlans, lockJobs } from "../db/queries/jobs.js";
import { type HostAt, type HostEnd, type HostReport, hostsEnded, hostsProgress } from "./transitions.js";
import type { HoldPolicy } from "./config.js";

/** What a change does: one of the common kinds (applied set-based with the others of its round), or anything. */
export type Op =
  | { kind: "progress"; report: HostReport }
  | { kind: "ended"; end: HostEnd }
  | { kind: "started"; at: HostAt }
  | { kind: "apply"; apply: (tx: Db) => Promise<unknown> };

/** At most this many changes in one transaction. */
const MAX_BATCH = 500;

interface Change {
  jobId: string;
  op: Op;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class GroupCommit {
  private queue: Change[] = [];
  private flushing: Promise<void> | undefined;

  constructor(
    private readonly sql: Sql,
    /** The lease policy a job going HELD is held under (holds.ts). */
    private readonly policy: HoldPolicy,
    private readonly metrics?: JobMetrics,
  ) {}

  /** Runs `op` (a change to job `jobId` and its rows) in a shared transaction; resolves after the commit. */
  run(jobId: string, op: Op): Promise<void> {
    return new Promise((resolve, reject) => {
      this.queue.push({ jobId, op, resolve, reject });
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
      const started = performance.now();
      try {
        const tx = this.transaction(batch);
        await (this.metrics ? this.metrics.watch("group-commit", tx) : tx);
        this.metrics?.commitSeconds.observe((performance.now() - started) / 1000);
        this.metrics?.changes.inc(batch.length);
        for (const c of batch) c.resolve();
      } catch (err) {
        // One transaction per change isolates a bad change; a database that
        // is away fails them all alike, so they fail together.
        if (batch.length === 1 || isDatabaseUnavailable(err)) {
          for (const c of batch) c.reject(err);
          continue;
        }
        for (const c of batch) await this.transaction([c]).then(c.resolve, c.reject);
      }
    }
  }

  /**
   * Applies `batch` in one transaction, on a connection of its own so that
   * BEGIN goes out with the first statements rather than a round trip ahead.
   */
  private async transaction(batch: Change[]): Promise<void> {
    await withReserved(this.sql, async (tx) => {
      // Its failure fails every statement behind it.
      pipeline(tx`begin`);
      await applyAll(tx, batch, this.policy);
      await tx`commit`;
    });
  }
}

async function applyAll(tx: Db, batch: Change[], policy: HoldPolicy): Promise<void> {
  const byJob = new Map<string, Change[]>();
  for (const c of batch) {
    const list = byJob.get(c.jobId);
    if (list) list.push(c);
    else byJob.set(c.jobId, [c]);
  }
  customPlans(tx);
  // Executed before any statement of the changes (they follow it on the connection).
  const lock = lockJobs(tx, [...byJob.keys()]);
  // A job's acknowledged StartJobs that come first in its queue (the usual
  // acknowledgement, then the report of RUNNING) go before the rounds, in
  // one statement: the rounds start at the job's next change.
  const started: HostAt[] = [];
  const queues = [...byJob.values()].map((q) => {
    let first = 0;
    while (first < q.length && q[first].op.kind === "started") started.push((q[first++].op as { at: HostAt }).at);
    return q.slice(first);
  });
  const early = started.length > 0 ? markStarted(tx, started) : undefined;
  for (let round = 0; round === 0 || queues.some((q) => q.length > round); round++) {
    const ops = queues.filter((q) => q.length > round).map((q) => q[round].op);
    const progress: HostReport[] = [];
    const ended: HostEnd[] = [];
    const acked: HostAt[] = [];
    const others: ((tx: Db) => Promise<unknown>)[] = [];
    for (const op of ops) {
      if (op.kind === "progress") progress.push(op.report);
      else if (op.kind === "ended") ended.push(op.end);
      else if (op.kind === "started") acked.push(op.at);
      else others.push(op.apply);
    }
    // Every statement of the round runs to its end before the transaction
    // ends: one that went on after a failure of another must not issue
    // statements once it rolled back.
    const results = await Promise.allSettled([
      round === 0 ? lock : undefined,
      round === 0 ? early : undefined,
      hostsProgress(tx, progress, policy),
      hostsEnded(tx, ended),
      acked.length > 0 ? markStarted(tx, acked) : undefined,
      ...others.map((apply) => apply(tx)),
    ]);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
  }
}
