/**
 * What the process and qemu drivers share (DESIGN.md §9): a fixed number of
 * slots, each with its own uid and gid (`uidBase + slot`) when the supervisor
 * can switch uid, and the table of the jobs prepared on them. A job holds its
 * slot from `prepare` to `cleanup`; cleanup stops the job, kills whatever of
 * the slot's uid is left, removes the job's directory and frees the slot.
 */

import type { ChildProcess } from "node:child_process";
import { chown, mkdir, rm } from "node:fs/promises";
import type { Logger } from "../../lib/logger.js";
import {
  DriverAbortError,
  DriverError,
  type JobPhase,
  type JobSpecForDriver,
  type Prepared,
  type RunningJob,
  type StopOptions,
} from "./driver.js";
import { killAllOfUid } from "./sandbox.js";

/** A job attempt's hold on a slot: the slot and its uid and gid. */
export interface SlotHold {
  readonly jobId: string;
  readonly attempt: number;
  readonly slot: number;
  readonly uid: number;
  readonly gid: number;
}

/** A prepared job that holds a slot. */
export interface SlotPrepared extends Prepared, SlotHold {
  /** The job's own directory (0700, the slot's), removed by cleanup. */
  readonly jobDir: string;
  running?: RunningJob;
  cleaned?: Promise<void>;
}

/** A started job of a slot: one child process, its phase, and its stop once begun. */
export interface SlotJob<P extends SlotPrepared> extends RunningJob {
  readonly prepared: P;
  readonly child: ChildProcess;
  /** Mutable phase behind `status()`, and whether `stop` was called. */
  state: { phase: JobPhase; stopRequested: boolean };
  stopping?: Promise<void>;
}

export interface SlotPoolOptions<P extends SlotPrepared> {
  /** Words in messages: `${driver} driver is shutting down`, `no free ${slot} slot`, `${job} cleaned up`. */
  names: { driver: string; slot: string; job: string };
  /** How many slots. */
  slots: number;
  /** Uid (and gid) of slot 0 when `switchUid`. */
  uidBase: number;
  /** Whether jobs run as their slot's uid (else as the supervisor's, and no uid is swept). */
  switchUid: boolean;
  logger: Logger;
  /** The driver's `stop`. */
  stop: (job: RunningJob, options?: StopOptions) => Promise<void>;
  /** Called by cleanup just before the job's slot is freed. */
  onFree?: (prepared: P) => void;
}

/** Creates a job's directory afresh: mode 0700, owned by the slot's uid. */
export async function makeJobDir(jobDir: string, uid: number, gid: number): Promise<void> {
  await rm(jobDir, { recursive: true, force: true });
  await mkdir(jobDir, { mode: 0o700 });
  await chown(jobDir, uid, gid);
}

export class SlotPool<P extends SlotPrepared> {
  readonly capacity: number;
  /** Per slot: the key of the job holding it. */
  private readonly holders: (string | undefined)[];
  private readonly jobs = new Map<string, P>();
  private closing = false;

  constructor(private readonly options: SlotPoolOptions<P>) {
    this.capacity = options.slots;
    this.holders = new Array<string | undefined>(options.slots).fill(undefined);
  }

  /** Whether `close` was called. */
  get closed(): boolean {
    return this.closing;
  }

  /** The job's handle when it is prepared and not cleaned up; else throws when the driver is closing. */
  existing(spec: JobSpecForDriver): P | undefined {
    const existing = this.jobs.get(`${spec.jobId}.${spec.attempt}`);
    if (existing !== undefined && existing.cleaned === undefined) return existing;
    if (this.closing) throw new DriverError("start", `${this.options.names.driver} driver is shutting down`);
    return undefined;
  }

  /** Takes a free slot for the job (until `cleanup`, or `abandon` when its prepare fails); `key` names the attempt. */
  allocate(spec: JobSpecForDriver): { key: string; hold: SlotHold } {
    const key = `${spec.jobId}.${spec.attempt}`;
    const slot = this.holders.indexOf(undefined);
    if (slot === -1) throw new DriverError("start", `no free ${this.options.names.slot} slot (${this.capacity} in use)`);
    this.holders[slot] = key;
    const uid = this.options.switchUid ? this.options.uidBase + slot : process.getuid!();
    const gid = this.options.switchUid ? this.options.uidBase + slot : process.getgid!();
    return { key, hold: { jobId: spec.jobId, attempt: spec.attempt, slot, uid, gid } };
  }

  /** Kills whatever runs as the slot's uid (nothing to do without switched uids). */
  async sweep(uid: number): Promise<void> {
    if (!this.options.switchUid) return;
    const leftovers = await killAllOfUid(uid);
    if (leftovers.length > 0) throw new DriverError("start", `processes of slot uid ${uid} cannot be killed`);
  }

  /** Records a prepared job. */
  add(prepared: P): void {
    this.jobs.set(`${prepared.jobId}.${prepared.attempt}`, prepared);
  }

  /** After a failed prepare: removes the job's directory, frees its slot and throws (a DriverError for anything else). */
  async abandon(slot: number, jobDir: string, err: unknown, log: Logger): Promise<never> {
    await rm(jobDir, { recursive: true, force: true }).catch(() => undefined);
    this.holders[slot] = undefined;
    if (err instanceof DriverError || err instanceof DriverAbortError) throw err;
    log.error({ err }, `${this.options.names.job} preparation failed`);
    throw new DriverError("internal", `${this.options.names.job} preparation failed`, { cause: err });
  }

  /**
   * The driver's `stop`, in effect once per job: unless the job has exited
   * already, sets its phase to stopping, runs `end` (the driver's way of
   * ending it with `graceMs` of grace) and waits for the exit.
   */
  stop(job: SlotJob<P>, graceMs: number, end: (log: Logger) => Promise<void>): Promise<void> {
    if (job.stopping !== undefined) return job.stopping;
    job.state.stopRequested = true;
    job.stopping = (async () => {
      if (job.status() === "exited") return;
      job.state.phase = "stopping";
      const log = this.options.logger.child({ jobId: job.jobId, attempt: job.attempt });
      log.info({ graceMs }, `stopping ${this.options.names.job}`);
      await end(log);
      await job.exited;
    })();
    return job.stopping;
  }

  /** The driver's `cleanup`: stops the job, kills what is left of its uid, removes its directory, frees its slot. */
  cleanup(handle: Prepared | RunningJob): Promise<void> {
    const prepared = ("prepared" in handle ? handle.prepared : handle) as P;
    if (prepared.cleaned !== undefined) return prepared.cleaned;
    prepared.cleaned = (async () => {
      if (prepared.running !== undefined) await this.options.stop(prepared.running, { graceMs: 0 });
      if (this.options.switchUid) {
        const left = await killAllOfUid(prepared.uid);
        if (left.length > 0) throw new DriverError("internal", `processes of slot uid ${prepared.uid} survived sigkill`);
      }
      await rm(prepared.jobDir, { recursive: true, force: true });
      const key = `${prepared.jobId}.${prepared.attempt}`;
      if (this.holders[prepared.slot] === key) {
        this.options.onFree?.(prepared);
        this.holders[prepared.slot] = undefined;
      }
      this.jobs.delete(key);
      this.options.logger.info({ jobId: prepared.jobId, attempt: prepared.attempt, slot: prepared.slot }, `${this.options.names.job} cleaned up`);
    })();
    return prepared.cleaned;
  }

  /** The driver's `close`: refuses new jobs, stops (with the grace period) and cleans up every job. */
  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(
      [...this.jobs.values()].map(async (prepared) => {
        if (prepared.running !== undefined) await this.options.stop(prepared.running);
        await this.cleanup(prepared);
      }),
    );
  }
}
