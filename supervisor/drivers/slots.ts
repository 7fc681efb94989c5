/**
 * What the process and qemu drivers share (DESIGN.md §9): a fixed number of
 * slots, each with its own uid and gid (`uidBase + slot`) when the supervisor
 * can switch uid, and the table of the jobs prepared on them. A job holds its
 * slot from `prepare` to `cleanup`; cleanup stops the job, removes the job's
 * directory and frees the slot.
 *
 * The slots' uids are claimed machine-wide for the pool's whole life
 * (machine.ts): no other supervisor runs jobs as them, which is what makes
 * the sweeps here safe. A job's own processes are found and ended by its
 * driver through what the driver started (a pid namespace, a child); the
 * pool only sweeps a uid it holds, when it takes the slots (leftovers of a
 * supervisor that died on this work directory's slots) and after a job, as a
 * check that nothing of the uid survived its sandbox.
 */

import type { ChildProcess } from "node:child_process";
import { chown, mkdir, readFile, rm } from "node:fs/promises";
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
import { claimSlots, rememberedUidBase, rememberUidBase, type SlotClaim } from "./machine.js";
import { killAllOfUid, processesOfUid } from "./sandbox.js";

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
  /** The slots' uids, claimed (see `claimSlotUids`); undefined when jobs run as the supervisor's own uid. */
  claim: SlotClaim | undefined;
  logger: Logger;
  /** The driver's `stop`. */
  stop: (job: RunningJob, options?: StopOptions) => Promise<void>;
  /** Called by cleanup just before the job's slot is freed. */
  onFree?: (prepared: P) => void;
}

/**
 * Claims the uids of `slots` slots (or none without root), remembering the
 * range in `rememberFile` so that an `auto` start on this work directory
 * prefers it next time, then sweeps what a previous holder left behind.
 * Throws `SlotTakenError` (machine.ts) when another supervisor holds them.
 */
export async function claimSlotUids(options: {
  slots: number;
  uidBase: number | "auto";
  switchUid: boolean;
  holder: string;
  rememberFile: string;
  logger: Logger;
}): Promise<SlotClaim | undefined> {
  if (!options.switchUid) return undefined;
  const prefer = options.uidBase === "auto" ? await rememberedUidBase(options.rememberFile) : undefined;
  // `auto` leaves alone uids that something else uses: an account, a process (a service's dynamic user).
  const accounts = new Set(
    (await readFile("/etc/passwd", "utf8").catch(() => ""))
      .split("\n")
      .map((line) => Number(line.split(":")[2]))
      .filter(Number.isInteger),
  );
  const busy = async (uid: number) => accounts.has(uid) || (await processesOfUid(uid)).length > 0;
  const claim = await claimSlots({
    count: options.slots,
    uidBase: options.uidBase,
    holder: options.holder,
    busy,
    ...(prefer === undefined ? {} : { prefer }),
  });
  try {
    await rememberUidBase(options.rememberFile, claim.uidBase);
    for (let uid = claim.uidBase; uid < claim.uidBase + claim.count; uid++) {
      const left = await killAllOfUid(uid);
      if (left.length > 0) throw new Error(`processes of slot uid ${uid} cannot be killed`);
    }
  } catch (err) {
    await claim.release();
    throw err;
  }
  options.logger.info({ uidBase: claim.uidBase, slots: claim.count }, "slot uids claimed");
  return claim;
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
  private closed_: Promise<void> | undefined;

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
    const claim = this.options.claim;
    const uid = claim !== undefined ? claim.uidBase + slot : process.getuid!();
    const gid = claim !== undefined ? claim.uidBase + slot : process.getgid!();
    return { key, hold: { jobId: spec.jobId, attempt: spec.attempt, slot, uid, gid } };
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
   * ending it with `graceMs` of grace; `within(ms)` tells whether the job
   * exited within ms) and waits for the exit.
   */
  stop(job: SlotJob<P>, graceMs: number, end: (log: Logger, within: (ms: number) => Promise<boolean>) => Promise<void>): Promise<void> {
    if (job.stopping !== undefined) return job.stopping;
    job.state.stopRequested = true;
    job.stopping = (async () => {
      if (job.status() === "exited") return;
      job.state.phase = "stopping";
      const log = this.options.logger.child({ jobId: job.jobId, attempt: job.attempt });
      log.info({ graceMs }, `stopping ${this.options.names.job}`);
      const within = async (ms: number) => {
        let timer: NodeJS.Timeout | undefined;
        const done = await Promise.race([
          job.exited.then(() => true),
          new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms))),
        ]);
        clearTimeout(timer);
        return done;
      };
      await end(log, within);
      await job.exited;
    })();
    return job.stopping;
  }

  /**
   * The driver's `cleanup`: stops the job, checks that nothing of its uid
   * outlived its sandbox (killing it if so: the uid is claimed, nothing else
   * runs as it), removes its directory, frees its slot.
   */
  cleanup(handle: Prepared | RunningJob): Promise<void> {
    const prepared = ("prepared" in handle ? handle.prepared : handle) as P;
    if (prepared.cleaned !== undefined) return prepared.cleaned;
    prepared.cleaned = (async () => {
      const log = this.options.logger.child({ jobId: prepared.jobId, attempt: prepared.attempt, slot: prepared.slot });
      if (prepared.running !== undefined) await this.options.stop(prepared.running, { graceMs: 0 });
      if (this.options.claim !== undefined) {
        const stray = await processesOfUid(prepared.uid);
        if (stray.length > 0) {
          log.error({ pids: stray.map((p) => p.pid) }, `processes of the slot's uid outlived the ${this.options.names.job}; killing them`);
          const left = await killAllOfUid(prepared.uid);
          if (left.length > 0) throw new DriverError("internal", `processes of slot uid ${prepared.uid} survived sigkill`);
        }
      }
      await rm(prepared.jobDir, { recursive: true, force: true });
      const key = `${prepared.jobId}.${prepared.attempt}`;
      if (this.holders[prepared.slot] === key) {
        this.options.onFree?.(prepared);
        this.holders[prepared.slot] = undefined;
      }
      this.jobs.delete(key);
      log.info(`${this.options.names.job} cleaned up`);
    })();
    return prepared.cleaned;
  }

  /** The driver's `close`: refuses new jobs, stops (with the grace period) and cleans up every job, then gives the slots' uids up. */
  close(): Promise<void> {
    this.closing = true;
    this.closed_ ??= (async () => {
      await Promise.all(
        [...this.jobs.values()].map(async (prepared) => {
          if (prepared.running !== undefined) await this.options.stop(prepared.running);
          await this.cleanup(prepared).catch((err: unknown) => this.options.logger.error({ err }, "cleanup at close failed"));
        }),
      );
      await this.options.claim?.release();
    })();
    return this.closed_;
  }
}
