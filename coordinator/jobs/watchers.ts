/**
 * Fan-out of 'treadmill_jobs' notifications to this replica's WatchJob and
 * WatchJobs streams. Subscribers get job ids and read the job themselves
 * (each with its own permission and filter).
 */
export type JobListener = (jobId: string) => void;

export class JobWatchers {
  private readonly byJob = new Map<string, Set<JobListener>>();
  private readonly all = new Set<JobListener>();

  /** Calls `listener` with `jobId` on each change of that job (every job when null). Returns the unsubscribe. */
  subscribe(jobId: string | null, listener: JobListener): () => void {
    if (jobId === null) {
      this.all.add(listener);
      return () => this.all.delete(listener);
    }
    let set = this.byJob.get(jobId);
    if (!set) this.byJob.set(jobId, (set = new Set()));
    set.add(listener);
    return () => {
      set.delete(listener);
      if (set.size === 0) this.byJob.delete(jobId);
    };
  }

  notify(jobId: string): void {
    for (const l of this.byJob.get(jobId) ?? []) l(jobId);
    for (const l of this.all) l(jobId);
  }

  /** Every subscriber hears of every job it may have missed (the LISTEN connection came back). */
  notifyAll(): void {
    for (const [jobId, set] of this.byJob) for (const l of set) l(jobId);
  }
}
