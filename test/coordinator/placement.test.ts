/**
 * Placement (coordinator/jobs/placement.ts) without a database: each row is a
 * pass over some hosts and a queue in order, and what it places. The
 * scheduler's integration tests (scheduler.test.ts) cover the same rules
 * end to end through PostgreSQL.
 */
import { describe, expect, it } from "@jest/globals";
import {
  type HostCandidate,
  PassPlacement,
  type QueuedJob,
  ServicePicker,
  fitsBookings,
  matches,
  placeLeaseJobs,
} from "../../coordinator/jobs/placement.js";

function host(name: string, init: Partial<HostCandidate> = {}): HostCandidate {
  const site = init.site ?? "";
  return {
    id: `h-${name}`,
    name,
    driver_kind: "process",
    media_types: ["rootfs"],
    free: 1,
    attached_replica: "r1",
    booked_from: null,
    ...init,
    site,
    tags: { ...(init.tags ?? {}), ...(site !== "" ? { site } : {}) },
  };
}

function job(id: string, init: Partial<QueuedJob> = {}): QueuedJob {
  return {
    id,
    owner_id: "alice",
    attempt: 1,
    host_count: 1,
    required_tags: {},
    required_site: null,
    required_driver: null,
    media_types: ["rootfs"],
    manifest_digest: "sha256:00",
    image_holder: null,
    job_timeout_ms: 60_000,
    lease_id: null,
    ...init,
  };
}

interface Row {
  name: string;
  hosts: HostCandidate[];
  /** The queue in the scheduler's order, in chunks. */
  queue: QueuedJob[][];
  limit?: number;
  running?: Record<string, number>;
  /** "owner host-name" pairs that are denied; grants exist when set. */
  denied?: string[];
  /** The pass's time (ms; hosts' booked_from are on the same clock); default 0. */
  now?: number;
  /** job id -> host names, in host-index order; jobs not placed are absent. */
  placed: Record<string, string[]>;
}

const rows: Row[] = [
  {
    name: "a job goes only to a host carrying every required tag",
    hosts: [host("a", { tags: { board: "x" } }), host("b", { tags: { board: "y" } })],
    queue: [[job("j", { required_tags: { board: "y" } })]],
    placed: { j: ["b"] },
  },
  {
    name: "a host's site counts as the tag site=<site>, and a required site and driver must match",
    hosts: [host("a", { site: "lab-a" }), host("b", { site: "lab-b", driver_kind: "qemu" }), host("c", { site: "lab-b" })],
    queue: [[job("by-tag", { required_tags: { site: "lab-a" } }), job("by-site", { required_site: "lab-b", required_driver: "qemu" })]],
    placed: { "by-tag": ["a"], "by-site": ["b"] },
  },
  {
    name: "a job goes only to a host supporting every media type of its image",
    hosts: [host("a"), host("b", { media_types: ["rootfs", "qcow2"] })],
    queue: [[job("j", { media_types: ["qcow2", "rootfs"] })]],
    placed: { j: ["b"] },
  },
  {
    name: "a job no host matches stays queued and keeps nothing",
    hosts: [host("a")],
    queue: [[job("nowhere", { required_tags: { board: "z" } }), job("next")]],
    placed: { next: ["a"] },
  },
  {
    name: "jobs take hosts in queue order",
    hosts: [host("a")],
    queue: [[job("first"), job("second")]],
    placed: { first: ["a"] },
  },
  {
    name: "among matching hosts a job takes those with the most free slots, then by name",
    hosts: [host("b", { free: 1 }), host("c", { free: 3 }), host("a", { free: 1 })],
    queue: [[job("one"), job("two", { host_count: 2 })]],
    placed: { one: ["c"], two: ["c", "a"] },
  },
  {
    name: "a host with several free slots takes several jobs",
    hosts: [host("a", { free: 2 })],
    queue: [[job("j1"), job("j2"), job("j3")]],
    placed: { j1: ["a"], j2: ["a"] },
  },
  {
    name: "an N-host job gets N distinct hosts or none",
    hosts: [host("a", { free: 2 }), host("b")],
    queue: [[job("three", { host_count: 3 }), job("two", { host_count: 2 })]],
    placed: { two: ["a", "b"] },
  },
  {
    name: "a blocked large job that could fit once busy hosts free up reserves the free hosts it sees",
    hosts: [host("a"), host("b", { free: 0 }), host("c")],
    queue: [[job("big", { host_count: 3 }), job("small")]],
    placed: {},
  },
  {
    name: "a large job no attached hosts could ever satisfy reserves nothing",
    hosts: [host("a"), host("b", { free: 0 })],
    queue: [[job("impossible", { host_count: 3 }), job("small")]],
    placed: { small: ["a"] },
  },
  {
    name: "a reservation holds only the hosts the blocked job matches",
    hosts: [host("a", { tags: { board: "x" } }), host("b", { tags: { board: "x" }, free: 0 }), host("c")],
    queue: [[job("big", { host_count: 2, required_tags: { board: "x" } }), job("x", { required_tags: { board: "x" } }), job("any")]],
    placed: { any: ["c"] },
  },
  {
    name: "a user's jobs beyond the per-user limit neither run nor reserve, other users' do",
    hosts: [host("a"), host("b"), host("c")],
    queue: [[job("a1"), job("a2"), job("a3"), job("b1", { owner_id: "bob" })]],
    limit: 2,
    running: { alice: 1 },
    placed: { a1: ["a"], b1: ["b"] },
  },
  {
    name: "no limit (0) lets a user take every host",
    hosts: [host("a"), host("b")],
    queue: [[job("a1"), job("a2")]],
    limit: 0,
    running: { alice: 100 },
    placed: { a1: ["a"], a2: ["b"] },
  },
  {
    name: "a job goes only to hosts its owner may use (host grants)",
    hosts: [host("a"), host("b")],
    queue: [[job("j"), job("k", { owner_id: "bob" })]],
    denied: ["alice h-a"],
    placed: { j: ["b"], k: ["a"] },
  },
  {
    name: "a blocked job reserves only if enough hosts it may use exist",
    hosts: [host("a"), host("b", { free: 0 }), host("c")],
    queue: [[job("big", { host_count: 3 }), job("small", { owner_id: "bob" })]],
    denied: ["alice h-b"],
    placed: { small: ["a"] },
  },
  {
    name: "later chunks go on where the earlier left off, a job seen twice counts once",
    hosts: [host("a"), host("b")],
    queue: [[job("j1")], [job("j1"), job("j2")], [job("j3")]],
    placed: { j1: ["a"], j2: ["b"] },
  },
  {
    name: "a job goes on a booked host only if its timeout ends before the booking starts (backfill)",
    hosts: [host("a", { booked_from: 1_000_000 + 600_000 })],
    queue: [[job("long", { job_timeout_ms: 3_600_000 }), job("short", { job_timeout_ms: 600_000 })]],
    now: 1_000_000,
    placed: { short: ["a"] },
  },
  {
    name: "a host whose booking has started takes no job, a host booked later than every timeout takes any",
    hosts: [host("a", { booked_from: 999_000 }), host("b", { booked_from: 1_000_000 + 86_400_000 })],
    queue: [[job("j1", { job_timeout_ms: 1000 }), job("j2", { job_timeout_ms: 3_600_000 })]],
    now: 1_000_000,
    placed: { j1: ["b"] },
  },
  {
    name: "a blocked large job counts only the hosts free of bookings for its timeout, and reserves nothing when too few are",
    hosts: [host("a"), host("b", { free: 0 }), host("c", { booked_from: 1_000_000 + 30_000 })],
    queue: [[job("big", { host_count: 3 }), job("small", { owner_id: "bob" })]],
    now: 1_000_000,
    placed: { small: ["a"] },
  },
];

describe("placement of queued jobs on hosts", () => {
  it.each(rows)("$name", (row) => {
    const booked = row.hosts.flatMap((h) => (h.booked_from === null ? [] : [h.booked_from]));
    const placement = new PassPlacement(row.hosts, {
      maxJobsPerUser: row.limit ?? 0,
      running: new Map(Object.entries(row.running ?? {})),
      grants: row.denied !== undefined,
      now: row.now ?? 0,
      firstBooking: booked.length > 0 ? Math.min(...booked) : null,
    });
    for (const chunk of row.queue) {
      if (placement.exhausted) break;
      const ask = placement.accessToCheck(chunk);
      placement.learnDenied(ask.filter((p) => row.denied?.includes(`${p.owner} ${p.host}`)));
      placement.place(chunk);
    }
    const placed = Object.fromEntries(placement.placements.map((p) => [p.job.id, p.hosts.map((h) => h.name)]));
    expect(placed).toEqual(row.placed);
  });

  it("asks about access only when grants exist, each (owner, host) pair once, and only for matching hosts", () => {
    const hosts = [host("a", { tags: { board: "x" } }), host("b", { free: 0, tags: { board: "x" } }), host("c")];
    const without = new PassPlacement(hosts, { maxJobsPerUser: 0, grants: false });
    expect(without.accessToCheck([job("j")])).toEqual([]);
    const withGrants = new PassPlacement(hosts, { maxJobsPerUser: 0, grants: true });
    const x = { required_tags: { board: "x" } };
    expect(withGrants.accessToCheck([job("j", x), job("k", x)])).toEqual([
      { owner: "alice", host: "h-a" },
      { owner: "alice", host: "h-b" },
    ]);
    expect(withGrants.accessToCheck([job("l"), job("m", { owner_id: "bob", ...x })])).toEqual([
      { owner: "alice", host: "h-c" },
      { owner: "bob", host: "h-a" },
      { owner: "bob", host: "h-b" },
    ]);
  });

  it("counts the free slots of the pass and leaves the hosts handed in untouched", () => {
    const hosts = [host("a", { free: 2 }), host("b", { free: 0 }), host("c")];
    const placement = new PassPlacement(hosts, { maxJobsPerUser: 0, grants: false });
    expect(placement.freeSlots).toBe(3);
    placement.place([job("j1"), job("j2"), job("j3"), job("j4")]);
    expect(placement.placements).toHaveLength(3);
    expect(placement.exhausted).toBe(true);
    expect(hosts.map((h) => h.free)).toEqual([2, 0, 1]);
  });

  it("stops a pass at maxPlacements, and passes in a row place what one unbounded pass places", () => {
    const hosts = [host("a", { free: 2 }), host("b"), host("c", { tags: { board: "x" } }), host("d", { free: 0 }), host("e"), host("f")];
    const queue = [
      job("j1"),
      job("j2", { required_tags: { board: "x" } }),
      job("j3", { host_count: 2 }),
      job("j4", { owner_id: "bob" }),
      job("j5", { host_count: 6 }), // blocked by d: reserves what it sees
      job("j6"),
      job("j7"),
    ];
    const byName = (placements: { job: QueuedJob; hosts: HostCandidate[] }[]) =>
      Object.fromEntries(placements.map((p) => [p.job.id, p.hosts.map((h) => h.name)]));
    const whole = new PassPlacement(hosts, { maxJobsPerUser: 0, grants: false });
    whole.place(queue);
    expect(whole.full).toBe(false);

    // Each bounded pass starts from the hosts and queue the last one committed.
    let left = hosts.map((h) => ({ ...h }));
    let waiting = queue;
    const placed: Record<string, string[]> = {};
    for (let passes = 1; ; passes++) {
      const pass = new PassPlacement(left, { maxJobsPerUser: 0, grants: false, maxPlacements: 2 });
      pass.place(waiting);
      expect(pass.placements.length).toBeLessThanOrEqual(2);
      Object.assign(placed, byName(pass.placements));
      const taken = pass.placements.flatMap((p) => p.hosts.map((h) => h.name));
      left = left.map((h) => ({ ...h, free: h.free - taken.filter((n) => n === h.name).length }));
      waiting = waiting.filter((j) => !(j.id in placed));
      if (!pass.full) {
        expect(passes).toBe(3);
        break;
      }
    }
    expect(placed).toEqual(byName(whole.placements));
    expect(placed).toEqual({ j1: ["a"], j2: ["c"], j3: ["a", "b"], j4: ["e"] });
  });

  it("given only the free hosts, asks for the busy ones once a job needs several hosts, and decides as if it had all", () => {
    const all = [host("a"), host("b", { free: 0 }), host("c"), host("d", { free: 0 })];
    const queue = [[job("j1")], [job("j2", { host_count: 3 }), job("j3")]];
    const whole = new PassPlacement(all, { maxJobsPerUser: 0, grants: false });
    const lazy = new PassPlacement(
      all.filter((h) => h.free > 0),
      { maxJobsPerUser: 0, grants: false, busyKnown: false },
    );
    expect(lazy.needsBusy(queue[0])).toBe(false);
    for (const chunk of queue) {
      whole.place(chunk);
      if (lazy.needsBusy(chunk)) lazy.addBusy(all.filter((h) => h.free === 0));
      lazy.place(chunk);
    }
    expect(lazy.needsBusy(queue[1])).toBe(false);
    // j2 could fit once b or d frees up: it reserves c, and j3 waits.
    const names = (p: PassPlacement) => p.placements.map((x) => `${x.job.id}:${x.hosts.map((h) => h.name).join("+")}`);
    expect(names(lazy)).toEqual(["j1:a"]);
    expect(names(lazy)).toEqual(names(whole));
  });

  it("applies the backfill rule at the booking's start exactly: a job ending then fits, a millisecond later does not", () => {
    const h = host("a", { booked_from: 10_000 });
    expect(fitsBookings(job("j", { job_timeout_ms: 4000 }), h, 6000)).toBe(true);
    expect(fitsBookings(job("j", { job_timeout_ms: 4001 }), h, 6000)).toBe(false);
    expect(fitsBookings(job("j", { job_timeout_ms: 1e9 }), host("b"), 6000)).toBe(true);
  });

  it("gives jobs of any timeout one kind while none reaches the earliest booking, and tells them apart once one does", () => {
    const options = { maxJobsPerUser: 0, grants: false, now: 1000, firstBooking: 1000 + 3_600_000 };
    const placement = new PassPlacement([], options);
    const [short, shorter, long] = [job("s", { job_timeout_ms: 60_000 }), job("t", { job_timeout_ms: 120_000 }), job("l", { job_timeout_ms: 7_200_000 })];
    expect(placement.kind(short)).toBe(placement.kind(shorter));
    expect(placement.kind(long)).not.toBe(placement.kind(short));
    expect(placement.bookingBound(short)).toBeNull();
    expect(placement.bookingBound(long)).toBe(7_200_000);
    expect(placement.demands([short, shorter, long]).map((d) => d.need)).toEqual([2, 1]);
    const noBookings = new PassPlacement([], { ...options, firstBooking: null });
    expect(noBookings.kind(long)).toBe(noBookings.kind(short));
  });

  it("matches on tags, site, driver and media types, each alone", () => {
    const h = host("a", { site: "lab", tags: { board: "x" }, media_types: ["rootfs", "qcow2"] });
    expect(matches(job("j"), h)).toBe(true);
    expect(matches(job("j", { required_tags: { board: "x", site: "lab" } }), h)).toBe(true);
    expect(matches(job("j", { required_tags: { board: "y" } }), h)).toBe(false);
    expect(matches(job("j", { required_site: "other" }), h)).toBe(false);
    expect(matches(job("j", { required_driver: "board" }), h)).toBe(false);
    expect(matches(job("j", { media_types: ["firmware"] }), h)).toBe(false);
  });
});

describe("placement of jobs inside leases", () => {
  const on = (lease: string, h: HostCandidate) => ({ ...h, lease_id: lease });
  const names = (placements: { job: QueuedJob; hosts: HostCandidate[] }[]) =>
    Object.fromEntries(placements.map((p) => [p.job.id, p.hosts.map((h) => h.name)]));

  it("puts a lease's jobs on its own hosts only, in queue order, several on a host with several free slots", () => {
    const hosts = [on("L1", host("a", { free: 2 })), on("L2", host("b"))];
    const jobs = [job("j1", { lease_id: "L1" }), job("j2", { lease_id: "L1" }), job("j3", { lease_id: "L1" }), job("k1", { lease_id: "L2" })];
    expect(names(placeLeaseJobs(jobs, hosts))).toEqual({ j1: ["a"], j2: ["a"], k1: ["b"] });
  });

  it("keeps a lease's jobs FIFO: one that cannot be placed holds back those behind it in its lease, not another lease's", () => {
    const hosts = [on("L1", host("a")), on("L1", host("b")), on("L2", host("c"))];
    const jobs = [
      job("big", { lease_id: "L1", host_count: 3 }),
      job("small", { lease_id: "L1" }),
      job("other", { lease_id: "L2" }),
      job("y", { lease_id: "L2", required_tags: { board: "y" } }),
    ];
    expect(names(placeLeaseJobs(jobs, hosts))).toEqual({ other: ["c"] });
  });

  it("matches a lease job's requirements against its lease's hosts, ignores their bookings and leaves the hosts handed in untouched", () => {
    const hosts = [on("L1", host("a", { tags: { board: "x" }, booked_from: 0 })), on("L1", host("b", { tags: { board: "y" }, booked_from: 0 }))];
    const placed = placeLeaseJobs([job("j", { lease_id: "L1", required_tags: { board: "y" }, job_timeout_ms: 1e9 })], hosts);
    expect(names(placed)).toEqual({ j: ["b"] });
    expect(hosts.map((h) => h.free)).toEqual([1, 1]);
  });
});

describe("the choice of log servers and proxy", () => {
  const services = [
    { kind: "log_server", url: "http://log-a1", site: "lab-a" },
    { kind: "log_server", url: "http://log-any", site: "" },
    { kind: "log_server", url: "http://log-b1", site: "lab-b" },
    { kind: "proxy", url: "http://proxy-a", site: "lab-a" },
    { kind: "proxy", url: "http://proxy-b", site: "lab-b" },
  ];

  it("prefers the host's site, then servers of every site, round-robin across picks", () => {
    const picker = new ServicePicker(2);
    expect(picker.pick("lab-a", services)).toEqual({ logs: ["http://log-a1", "http://log-any"], proxy: "http://proxy-a" });
    expect(picker.pick("lab-a", services)).toEqual({ logs: ["http://log-any", "http://log-a1"], proxy: "http://proxy-a" });
    expect(picker.pick("lab-c", services)).toEqual({ logs: ["http://log-any"], proxy: "http://proxy-a" });
  });

  it("falls back to any log server and gives no proxy when none is live", () => {
    const picker = new ServicePicker(3);
    const logsOnly = [{ kind: "log_server", url: "http://log-b1", site: "lab-b" }];
    expect(picker.pick("lab-a", logsOnly)).toEqual({ logs: ["http://log-b1"], proxy: "" });
  });
});
