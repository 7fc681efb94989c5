/**
 * Placement (DESIGN.md §5): which queued jobs go to which hosts in one
 * scheduling pass. Pure: no database, no clock; the scheduler reads the
 * hosts, the queue and the users' access, hands them in, and writes what
 * comes out (scheduler.ts). What a pass may decide here:
 *
 * - Matching: a host matches a job when it carries every required tag (its
 *   site counts as the tag site=<site>: the scheduler's read adds it), is of
 *   the required site and driver, supports every layer media type of the
 *   image, and the job's owner may use it. The hosts handed in are the
 *   attached, enabled, non-draining ones, busy or not (`free` slots).
 * - Order: the queue arrives in the scheduler's order (effective priority,
 *   queued_at, created_at, id: read through the queue index in SQL, so a pass
 *   reads the head of the queue rather than sorting all of it); jobs are
 *   considered in that order. Among matching hosts a job takes those with
 *   the most free slots, then by name.
 * - Co-allocation: an N-host job gets N distinct hosts at once or none.
 * - No starvation of large jobs: a job that cannot be placed now but could
 *   be once busy matching hosts free up reserves the free matching hosts it
 *   sees, so that jobs behind it cannot take them. A job no attached host
 *   could ever satisfy reserves nothing.
 * - Limits: a user's jobs beyond `maxJobsPerUser` assigned or running (0: no
 *   limit) neither run nor reserve.
 * - Leases (docs/leases.md): the hosts handed in are held by no active
 *   lease; a job goes on a host only if it ends before the host's earliest
 *   booking starts (`fitsBookings`: backfill). Jobs inside a lease go on
 *   its hosts alone, ahead of everything, FIFO per lease
 *   (`placeLeaseJobs`).
 *
 * Access (host grants) is asked per (owner, host) pair: `accessToCheck`
 * names the pairs a chunk of the queue may ask about, the scheduler answers
 * them in one statement (`learnDenied`), then `place` decides. So the
 * decisions are the same as if the access function were called inline.
 *
 * The choice of log servers and proxy for each placement (round-robin,
 * the host's site first) is here too (`ServicePicker`).
 */

import type { EligibleHost } from "../db/queries/hosts.js";
import type { LiveService, QueuedJobRow } from "../db/queries/jobs.js";

/** An attached, enabled, non-draining host as a pass sees it (its tags with site=<site>, its free slots). */
export type HostCandidate = EligibleHost;

/** A queued job as a pass sees it. */
export type QueuedJob = QueuedJobRow;

/** A job and the hosts it is placed on, in host-index order. */
export interface Placed {
  job: QueuedJob;
  hosts: HostCandidate[];
}

/** An (owner, host) pair whose access a placement asks about. */
export interface AccessPair {
  owner: string;
  host: string;
}

/**
 * Whether `job`, started at `now` (ms since the epoch), ends before `host`'s
 * earliest booking starts: the backfill rule.
 */
export function fitsBookings(job: QueuedJob, host: HostCandidate, now: number): boolean {
  return host.booked_from === null || now + job.job_timeout_ms <= host.booked_from;
}

/**
 * The placements of jobs inside leases: `jobs` by lease, FIFO within each
 * (queuedLeaseJobs), `hosts` the free hosts of those leases
 * (leaseHostsFree). A job takes its lease's matching hosts with the most
 * free slots, then by name; the first job of a lease that cannot be placed
 * stops that lease's (FIFO: a job of several hosts is not overtaken). No
 * per-user limit: the hosts are the holder's.
 */
export function placeLeaseJobs(jobs: readonly QueuedJob[], hosts: readonly (HostCandidate & { lease_id: string })[]): Placed[] {
  const byLease = new Map<string, HostCandidate[]>();
  for (const h of hosts) {
    const list = byLease.get(h.lease_id) ?? [];
    list.push({ ...h });
    byLease.set(h.lease_id, list);
  }
  const placements: Placed[] = [];
  const stopped = new Set<string>();
  for (const job of jobs) {
    const lease = job.lease_id;
    if (lease === null || stopped.has(lease)) continue;
    const candidates = (byLease.get(lease) ?? []).filter((h) => h.free > 0 && matches(job, h));
    if (candidates.length < job.host_count) {
      stopped.add(lease);
      continue;
    }
    const chosen = firstBy(candidates, job.host_count);
    for (const h of chosen) h.free -= 1;
    placements.push({ job, hosts: chosen });
  }
  return placements;
}

/** Whether `host` meets `job`'s requirements (access aside). */
export function matches(job: QueuedJob, host: HostCandidate): boolean {
  if (job.required_site !== null && host.site !== job.required_site) return false;
  if (job.required_driver !== null && host.driver_kind !== job.required_driver) return false;
  for (const [k, v] of Object.entries(job.required_tags)) if (host.tags[k] !== v) return false;
  for (const t of job.media_types) if (!host.media_types.includes(t)) return false;
  // A retry with other_host (JobSpec.retry) waits for a host its earlier attempts did not run on.
  if (job.avoid_host_ids?.includes(host.id)) return false;
  return true;
}

const pairKey = (owner: string, host: string) => `${owner} ${host}`;

/** Whether `a` is chosen before `b`: more free slots, then by name. */
const before = (a: HostCandidate, b: HostCandidate) => a.free > b.free || (a.free === b.free && a.name < b.name);

/** The first `n` of `hosts` by `before`, in that order: a linear pass, not a sort (a pass may see 10,000 free hosts). */
function firstBy(hosts: readonly HostCandidate[], n: number): HostCandidate[] {
  const top: HostCandidate[] = [];
  for (const h of hosts) {
    if (top.length === n && !before(h, top[n - 1])) continue;
    if (top.length === n) top.pop();
    let i = top.length;
    while (i > 0 && before(h, top[i - 1])) i--;
    top.splice(i, 0, h);
  }
  return top;
}

/**
 * The placements of one pass. Feed it the queue in order, chunk by chunk
 * (`accessToCheck` and `learnDenied` first when host grants exist), until
 * `exhausted` or the queue ends; then read `placements`. With `maxPlacements`
 * a pass stops (`full`) after that many: the scheduler commits them and runs
 * the next pass at once, so that no pass holds the pass lock for long
 * however many slots are free (the decisions are those of one pass: the
 * next one starts from the head of the queue with these committed).
 */
export class PassPlacement {
  readonly placements: Placed[] = [];
  /** Free slots at the start of the pass, over all hosts. */
  readonly freeSlots: number;
  private readonly hosts: HostCandidate[];
  private readonly free: HostCandidate[];
  private readonly reserved = new Set<string>();
  private readonly seen = new Set<string>();
  private readonly running: Map<string, number>;
  private readonly denied = new Set<string>();
  private readonly asked = new Set<string>();
  /** Free slots on hosts not reserved. */
  private open: number;
  private busyKnown: boolean;
  /** The hosts (free or busy) that fit jobs of one kind, by `kindOf`: jobs of a pass are mostly of a few kinds. */
  private readonly fitting = new Map<string, HostCandidate[]>();

  /**
   * `hosts`: every eligible host, busy or not, or only the free ones
   * (`busyKnown` false: `addBusy` adds the others when a job needs them);
   * they are copied: a placement takes slots of the copies. `running`: jobs assigned or running per
   * owner (read only when `maxJobsPerUser` > 0). `grants`: whether host
   * grants exist at all (none: every owner may use every host).
   */
  constructor(
    hosts: readonly HostCandidate[],
    private readonly options: {
      maxJobsPerUser: number;
      running?: ReadonlyMap<string, number>;
      grants: boolean;
      maxPlacements?: number;
      busyKnown?: boolean;
      /** Free slots of every eligible host, when `hosts` are not all of them (the rest come by `addFree`). */
      freeSlots?: number;
      /** The pass's time, ms since the epoch (the backfill rule); default 0. */
      now?: number;
      /** The earliest booking of any host, ms since the epoch; null or unset: none. */
      firstBooking?: number | null;
    },
  ) {
    this.busyKnown = options.busyKnown ?? true;
    this.hosts = hosts.map((h) => ({ ...h }));
    this.free = this.hosts.filter((h) => h.free > 0);
    this.freeSlots = options.freeSlots ?? this.free.reduce((n, h) => n + h.free, 0);
    this.open = this.freeSlots;
    this.running = new Map(options.running ?? []);
  }

  /**
   * Adds the hosts not read yet as hosts without a free slot (the scheduler
   * reads every host only once a job asks for several: `needsBusy`; those it
   * knows keep their free slots). Before the first `place` that needs them.
   */
  addBusy(hosts: readonly HostCandidate[]): void {
    this.add(hosts.map((h) => ({ ...h, free: 0 })));
    this.busyKnown = true;
  }

  /**
   * Adds free hosts read for `demands` (a pass handed only `freeSlots` in
   * the constructor reads the hosts its jobs may take). Hosts already
   * known are left as they are.
   */
  addFree(hosts: readonly HostCandidate[]): void {
    const added = this.add(hosts);
    this.free.push(...added.filter((h) => h.free > 0));
  }

  /** The ids of the hosts known to the pass. */
  knownHosts(): string[] {
    return this.hosts.map((h) => h.id);
  }

  /**
   * The kinds of job of `chunk` not considered yet, each with one of its
   * jobs (what a host must have) and the hosts its jobs ask for in all: a
   * pass that reads free hosts per kind reads at most that many.
   */
  demands(chunk: readonly QueuedJob[]): { kind: string; job: QueuedJob; need: number }[] {
    const byKind = new Map<string, { kind: string; job: QueuedJob; need: number }>();
    for (const job of chunk) {
      if (this.seen.has(job.id)) continue;
      const kind = this.kind(job);
      const d = byKind.get(kind) ?? { kind, job, need: 0 };
      d.need += job.host_count;
      byKind.set(kind, d);
    }
    return [...byKind.values()];
  }

  /**
   * What a host must have for `job` (its requirements, its owner when grants
   * exist, its timeout when it may run into a booking): jobs of one kind fit
   * the same hosts.
   */
  kind(job: QueuedJob): string {
    return JSON.stringify([
      job.required_site,
      job.required_driver,
      job.required_tags,
      job.media_types,
      this.options.grants ? job.owner_id : "",
      this.bookingBound(job),
      job.avoid_host_ids ?? [],
    ]);
  }

  /**
   * The timeout the hosts of `job` must be checked against for bookings:
   * null when it ends before the earliest booking of any host (every host
   * fits it as far as bookings go, so jobs of every timeout share a kind
   * while no booking is near).
   */
  bookingBound(job: QueuedJob): number | null {
    const first = this.options.firstBooking ?? null;
    return first === null || (this.options.now ?? 0) + job.job_timeout_ms <= first ? null : job.job_timeout_ms;
  }

  /** Whether `job` was placed in this pass. */
  placed(job: QueuedJob): boolean {
    return this.placements.some((p) => p.job.id === job.id);
  }

  private add(hosts: readonly HostCandidate[]): HostCandidate[] {
    const known = new Set(this.hosts.map((h) => h.id));
    const added = hosts.filter((h) => !known.has(h.id)).map((h) => ({ ...h }));
    this.hosts.push(...added);
    if (added.length > 0) this.fitting.clear();
    return added;
  }

  /** Whether `place(chunk)` needs the busy hosts (`addBusy`): a job of it asks for several hosts. */
  needsBusy(chunk: readonly QueuedJob[]): boolean {
    return !this.busyKnown && chunk.some((j) => j.host_count > 1);
  }

  /** No free, unreserved slot is left: the rest of the queue can wait. */
  get exhausted(): boolean {
    return this.open === 0;
  }

  /** The pass placed `maxPlacements` jobs: the rest of the queue goes to the next pass. */
  get full(): boolean {
    return this.options.maxPlacements !== undefined && this.placements.length >= this.options.maxPlacements;
  }

  /**
   * The (owner, host) pairs `place(chunk)` may ask about whose answer is not
   * known yet: for each job, its matching hosts (free or busy). Empty when
   * no grants exist.
   */
  accessToCheck(chunk: readonly QueuedJob[]): AccessPair[] {
    if (!this.options.grants) return [];
    const pairs: AccessPair[] = [];
    for (const job of chunk) {
      for (const h of this.hosts) {
        const key = pairKey(job.owner_id, h.id);
        if (this.asked.has(key) || !this.fits(job, h)) continue;
        this.asked.add(key);
        pairs.push({ owner: job.owner_id, host: h.id });
      }
    }
    return pairs;
  }

  /** The pairs of `accessToCheck` whose owner may not use the host. */
  learnDenied(pairs: readonly AccessPair[]): void {
    for (const p of pairs) this.denied.add(pairKey(p.owner, p.host));
    // Access changes what fits.
    if (pairs.length > 0) this.fitting.clear();
  }

  /** Considers the jobs of `chunk` in order (a job seen in an earlier chunk is skipped). */
  place(chunk: readonly QueuedJob[]): void {
    const limit = this.options.maxJobsPerUser;
    for (const job of chunk) {
      if (this.exhausted || this.full) return;
      if (this.seen.has(job.id)) continue;
      this.seen.add(job.id);
      if (limit > 0 && (this.running.get(job.owner_id) ?? 0) >= limit) continue;
      const fitting = this.fittingHosts(job);
      const candidates = fitting.filter((h) => h.free > 0 && !this.reserved.has(h.id));
      if (candidates.length >= job.host_count) {
        const chosen = firstBy(candidates, job.host_count);
        for (const h of chosen) h.free -= 1;
        this.open -= chosen.length;
        this.placements.push({ job, hosts: chosen });
        if (limit > 0) this.running.set(job.owner_id, (this.running.get(job.owner_id) ?? 0) + 1);
      } else if (candidates.length > 0 && fitting.length >= job.host_count) {
        // Blocked, but it will fit once busy hosts free up: keep what it sees for it.
        for (const h of candidates) {
          this.reserved.add(h.id);
          this.open -= h.free;
        }
      }
    }
  }

  /** Whether `host` meets `job`'s requirements and the job ends before the host's bookings (access aside). */
  private fits(job: QueuedJob, host: HostCandidate): boolean {
    return matches(job, host) && fitsBookings(job, host, this.options.now ?? 0);
  }

  /** The hosts, free or busy, that fit `job` (its requirements, its bookings and its owner's access), in name order. */
  private fittingHosts(job: QueuedJob): HostCandidate[] {
    const kind = this.kind(job);
    let hosts = this.fitting.get(kind);
    if (!hosts) {
      hosts = this.hosts.filter((h) => this.fits(job, h) && !this.denied.has(pairKey(job.owner_id, h.id)));
      this.fitting.set(kind, hosts);
    }
    return hosts;
  }
}

/** A live log server or proxy. */
export type Service = LiveService;

/** Where a placed job's logs and sessions go. */
export interface ServiceChoice {
  logs: string[];
  proxy: string;
}

/**
 * Spreads jobs over the live log servers and proxies, round-robin across
 * passes (one picker per scheduler). The host's site's own servers first (a
 * site's hosts may reach no other), then those serving every site (site
 * ""), then any; `logReplicas` log servers per job, one proxy.
 */
export class ServicePicker {
  private logTurn = 0;
  private proxyTurn = 0;

  constructor(private readonly logReplicas: number) {}

  pick(site: string, services: readonly Service[]): ServiceChoice {
    const logServers = services.filter((s) => s.kind === "log_server");
    const proxies = services.filter((s) => s.kind === "proxy");
    const siteLogs = logServers.filter((s) => s.site === site && site !== "");
    const everySite = logServers.filter((s) => s.site === "");
    const logPool = [...siteLogs, ...everySite].length > 0 ? [...siteLogs, ...everySite] : logServers;
    const logs: string[] = [];
    for (let i = 0; i < Math.min(this.logReplicas, logPool.length); i++) logs.push(logPool[(this.logTurn + i) % logPool.length].url);
    this.logTurn = (this.logTurn + 1) % Math.max(1, logServers.length);
    const local = proxies.filter((s) => s.site === site);
    const pool = local.length > 0 ? local : proxies;
    const proxy = pool.length > 0 ? pool[this.proxyTurn++ % pool.length].url : "";
    return { logs, proxy };
  }
}
