/**
 * Retention: deletes finalized jobs' logs older than an age cap, then the
 * oldest finalized jobs while the total exceeds a size cap. A job is
 * finalized on this server when every channel of every attempt is closed (or
 * stopped at the size cap) and no writer is connected; a job still being
 * written is never deleted, even when that leaves the total above the cap.
 */
import type { Logger } from "../../lib/logger.js";
import { sleep } from "../../lib/retry.js";
import type { LogStore } from "./log-store.js";

export interface RetentionPolicy {
  /** Finalized jobs unchanged for longer than this are deleted; 0: no age cap. */
  maxAgeMs: number;
  /** Oldest finalized jobs are deleted while all logs take more than this; 0: no size cap. */
  maxTotalBytes: number;
}

export interface SweepResult {
  deleted: string[];
  bytesFreed: number;
}

/** One pass of the policy. */
export async function sweepRetention(store: LogStore, policy: RetentionPolicy, now = Date.now()): Promise<SweepResult> {
  const result: SweepResult = { deleted: [], bytesFreed: 0 };
  if (policy.maxAgeMs <= 0 && policy.maxTotalBytes <= 0) return result;
  const jobs = (await store.jobsOnDisk()).sort((a, b) => a.lastChangeMs - b.lastChangeMs);
  let total = jobs.reduce((n, j) => n + j.diskBytes, 0);
  for (const job of jobs) {
    if (!job.finalized) continue;
    const tooOld = policy.maxAgeMs > 0 && now - job.lastChangeMs > policy.maxAgeMs;
    const tooBig = policy.maxTotalBytes > 0 && total > policy.maxTotalBytes;
    if (!tooOld && !tooBig) continue;
    const freed = await store.deleteJob(job.jobId, tooOld ? "retention: age cap" : "retention: size cap");
    total -= job.diskBytes;
    result.deleted.push(job.jobId);
    result.bytesFreed += freed;
  }
  return result;
}

/** Sweeps every `intervalMs` until `signal` aborts; resolves then. */
export async function runRetention(
  store: LogStore,
  policy: RetentionPolicy & { intervalMs: number },
  logger: Logger,
  signal: AbortSignal,
): Promise<void> {
  if (policy.maxAgeMs <= 0 && policy.maxTotalBytes <= 0) return;
  while (!signal.aborted) {
    try {
      const { deleted, bytesFreed } = await sweepRetention(store, policy);
      if (deleted.length > 0) logger.info({ jobs: deleted.length, bytesFreed }, "retention deleted job logs");
    } catch (err) {
      logger.error({ err }, "retention sweep failed");
    }
    await sleep(policy.intervalMs, signal).catch(() => undefined);
  }
}
