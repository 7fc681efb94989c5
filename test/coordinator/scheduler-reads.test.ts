/**
 * The reads of a scheduling pass (coordinator/db/queries/hosts.ts) against
 * PostgreSQL: a pass counts the free slots in one aggregate and reads, per
 * kind of job, only the free hosts its jobs may take, in the placement's
 * order; an idle lab of 10,000 hosts costs a dispatch a few rows, and so
 * does a busy one (the index of free hosts, kept by the held-slot triggers).
 */
import { randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { firstBooking, freeHostsFor, freeSlotCount, leaseHostsFree } from "../../coordinator/db/queries/hosts.js";
import { queuedLeaseJobs } from "../../coordinator/db/queries/jobs.js";
import { placeableHealthJobs } from "../../coordinator/db/queries/health-checks.js";
import { type TestDatabase, createTestDatabase } from "../support/db.js";
import { waitUntil } from "../support/wait.js";

describe("a scheduling pass's reads of hosts", () => {
  let db: TestDatabase;
  const ids: Record<string, string> = {};

  beforeAll(async () => {
    db = await createTestDatabase();
    const hosts = [
      { name: "a", capacity: 1, tags: { board: "x" }, attached: true },
      { name: "b", capacity: 2, tags: { board: "x" }, attached: true },
      { name: "c", capacity: 1, tags: { board: "y" }, attached: true },
      { name: "d", capacity: 0, tags: { board: "x" }, attached: true },
      { name: "e", capacity: 1, tags: { board: "x" }, attached: false },
      { name: "f", capacity: 1, tags: { board: "x" }, attached: true, site: "lab" },
    ];
    for (const h of hosts) {
      ids[h.name] = randomUUID();
      await db.sql`
        insert into hosts (id, name, tags, driver_kind, media_types, capacity, site, attached_replica)
        values (${ids[h.name]}, ${h.name}, ${db.sql.json(h.tags)}, 'process', ${["rootfs"]}, ${h.capacity}, ${h.site ?? ""},
          ${h.attached ? "replica" : null})`;
    }
  });
  afterAll(async () => {
    await db?.drop();
  });

  const demand = (tags: Record<string, string>, need: number, site: string | null = null) => ({
    tags,
    site,
    driver: null,
    media: ["rootfs"],
    owner: null,
    timeout: null,
    need,
  });
  const names = (rows: { id: string; demand: number }[], d: number) =>
    rows.filter((r) => r.demand === d).map((r) => Object.keys(ids).find((n) => ids[n] === r.id));

  it("counts the free slots of the attached, enabled hosts in one aggregate, and none while no job is queued", async () => {
    expect(await freeSlotCount(db.sql)).toBe(0);
    const owner = randomUUID();
    await db.sql`insert into users (id, name, role) values (${owner}, 'reads', 'user')`;
    await db.sql`insert into jobs (id, owner_id, spec) values (${randomUUID()}, ${owner}, '{}')`;
    expect(await freeSlotCount(db.sql)).toBe(5);
  });

  it("reads for each kind of job its first hosts with a free slot, most free slots then by name, no more than it needs", async () => {
    const rows = await freeHostsFor(db.sql, [demand({ board: "x" }, 2), demand({}, 1), demand({ site: "lab" }, 5)], []);
    expect(names(rows, 0)).toEqual(["b", "a"]);
    expect(names(rows, 1)).toEqual(["b"]);
    expect(names(rows, 2)).toEqual(["f"]);
    expect(rows.find((r) => r.id === ids.b)).toMatchObject({ free: 2, tags: { board: "x" } });
  });

  it("leaves out the hosts the pass already knows", async () => {
    const rows = await freeHostsFor(db.sql, [demand({ board: "x" }, 5)], [ids.b, ids.a]);
    expect(names(rows, 0)).toEqual(["f"]);
  });

  const held = async () =>
    Object.fromEntries(
      (await db.sql<{ name: string; held_slots: number }[]>`select name, held_slots from hosts where name in ('a', 'b')`).map((r) => [
        r.name,
        r.held_slots,
      ]),
    );

  it("keeps each host's held slots equal to its unreleased slots through assignment, release and deletion", async () => {
    const owner = randomUUID();
    await db.sql`insert into users (id, name, role) values (${owner}, 'held', 'user')`;
    const [one, two] = [randomUUID(), randomUUID()];
    await db.sql`insert into jobs (id, owner_id, spec) values (${one}, ${owner}, '{}'), (${two}, ${owner}, '{}')`;
    // One statement taking three slots on two hosts, as an assignment pass does.
    await db.sql`
      insert into job_hosts (job_id, host_id, attempt, host_index)
      values (${one}, ${ids.a}, 1, 0), (${one}, ${ids.b}, 1, 1), (${two}, ${ids.b}, 1, 0)`;
    expect(await held()).toEqual({ a: 1, b: 2 });
    expect(names(await freeHostsFor(db.sql, [demand({ board: "x" }, 5)], []), 0)).toEqual(["f"]);

    await db.sql`update job_hosts set released_at = now() where job_id = ${two}`;
    // Released again (a repeated report): counted once.
    await db.sql`update job_hosts set released_at = now(), terminated_at = now() where job_id = ${two}`;
    expect(await held()).toEqual({ a: 1, b: 1 });
    expect(names(await freeHostsFor(db.sql, [demand({ board: "x" }, 5)], []), 0)).toEqual(["b", "f"]);

    // Deleting the jobs drops their unreleased slots (and not the released one twice).
    await db.sql`delete from jobs where id in (${one}, ${two})`;
    expect(await held()).toEqual({ a: 0, b: 0 });
  });

  it("reads free hosts with the predicate of the index of free hosts, so a busy lab is not scanned", async () => {
    const before = await freeIndexScans();
    await db.sql.begin(async (tx) => {
      await tx`set local enable_seqscan = off`;
      await freeSlotCount(tx);
      // Last: it puts the planner settings back to the session's.
      await freeHostsFor(tx, [demand({ board: "x" }, 1)], []);
    });
    // A backend reports its scans to the statistics within a second of going idle.
    await waitUntil(async () => (await freeIndexScans()) >= before + 2, "both reads to have scanned hosts_free_idx");
  });

  it("puts the planner settings of its read back after it, so the pass's other statements keep their usual plans", async () => {
    const settings = await db.sql.begin(async (tx) => {
      await freeHostsFor(tx, [demand({ board: "x" }, 1)], []);
      return tx<{ name: string; setting: string }[]>`
        select name, setting from pg_settings where name in ('enable_bitmapscan', 'enable_seqscan', 'enable_sort') order by name`;
    });
    expect(settings).toEqual([
      { name: "enable_bitmapscan", setting: "on" },
      { name: "enable_seqscan", setting: "on" },
      { name: "enable_sort", setting: "on" },
    ]);
  });

  it("leaves a host held by an active lease out of the free hosts and their count, and reads it for its lease's queued jobs alone", async () => {
    const owner = randomUUID();
    const lease = randomUUID();
    const leaseJob = randomUUID();
    await db.sql`insert into users (id, name, role) values (${owner}, 'holder', 'user')`;
    await db.sql`
      insert into leases (id, owner_id, state, host_count, starts_at, ends_at, grace_ms, activated_at)
      values (${lease}, ${owner}, 'active', 1, now(), now() + interval '1 hour', 60000, now())`;
    const before = await freeSlotCount(db.sql);
    await db.sql`update hosts set lease_id = ${lease} where id = ${ids.a}`;
    try {
      expect(await freeSlotCount(db.sql)).toBe(before - 1);
      expect(names(await freeHostsFor(db.sql, [demand({ board: "x" }, 5)], []), 0)).toEqual(["b", "f"]);
      // No job of the lease queued: its hosts are not read.
      expect(await leaseHostsFree(db.sql)).toEqual([]);
      expect(await queuedLeaseJobs(db.sql)).toEqual([]);
      await db.sql`insert into jobs (id, owner_id, spec, lease_id) values (${leaseJob}, ${owner}, '{}', ${lease})`;
      expect((await leaseHostsFree(db.sql)).map((h) => [h.lease_id, h.id, h.free])).toEqual([[lease, ids.a, 1]]);
      expect((await queuedLeaseJobs(db.sql)).map((j) => [j.id, j.lease_id])).toEqual([[leaseJob, lease]]);
    } finally {
      await db.sql`update hosts set lease_id = null where id = ${ids.a}`;
      await db.sql`delete from jobs where id = ${leaseJob}`;
    }
  });

  it("reads a booked host only for jobs whose timeout ends before its booking starts, and the earliest booking of all", async () => {
    await db.sql`update hosts set booked_from = now() + interval '30 minutes' where id = ${ids.f}`;
    try {
      const [{ at }] = await db.sql<{ at: number }[]>`select (extract(epoch from booked_from) * 1000)::float8 as at from hosts where id = ${ids.f}`;
      expect((await firstBooking(db.sql)).first).toBe(at);
      const read = (timeout: number | null) => freeHostsFor(db.sql, [{ ...demand({ site: "lab" }, 5), timeout }], []);
      expect(names(await read(3_600_000), 0)).toEqual([]);
      expect(names(await read(600_000), 0)).toEqual(["f"]);
      expect(names(await read(null), 0)).toEqual(["f"]);
      expect((await read(600_000))[0].booked_from).toBe(at);
    } finally {
      await db.sql`update hosts set booked_from = null where id = ${ids.f}`;
    }
    expect((await firstBooking(db.sql)).first).toBeNull();
  });

  it("places a health job on its host only while no lease holds the host and when it ends before the host's booking", async () => {
    const owner = randomUUID();
    const check = randomUUID();
    const job = randomUUID();
    const lease = randomUUID();
    await db.sql`insert into users (id, name, role) values (${owner}, 'checker', 'admin')`;
    await db.sql`insert into health_checks (id, name, image, timeout_ms, owner_id) values (${check}, 'boot', 'check:v1', 600000, ${owner})`;
    await db.sql`
      insert into jobs (id, owner_id, spec, priority, manifest_digest, media_types, host_count, required_tags, max_restarts,
        queue_timeout_ms, job_timeout_ms, health_check_id, pinned_host_id)
      values (${job}, ${owner}, '{}', 100, 'sha256:00', ${["rootfs"]}, 1, '{}', 0, 3600000, 600000, ${check}, ${ids.c})`;
    await db.sql`
      insert into leases (id, owner_id, state, host_count, starts_at, ends_at, grace_ms, activated_at)
      values (${lease}, ${owner}, 'active', 1, now(), now() + interval '1 hour', 60000, now())`;
    const placeable = async () => (await placeableHealthJobs(db.sql)).map((r) => r.id);
    try {
      expect(await placeable()).toEqual([job]);
      await db.sql`update hosts set lease_id = ${lease} where id = ${ids.c}`;
      expect(await placeable()).toEqual([]);
      // Booked in 5 minutes: the 10-minute check would run into it; in 20 it fits before.
      await db.sql`update hosts set lease_id = null, booked_from = now() + interval '5 minutes' where id = ${ids.c}`;
      expect(await placeable()).toEqual([]);
      await db.sql`update hosts set booked_from = now() + interval '20 minutes' where id = ${ids.c}`;
      expect(await placeable()).toEqual([job]);
    } finally {
      await db.sql`update hosts set lease_id = null, booked_from = null where id = ${ids.c}`;
      await db.sql`delete from jobs where id = ${job}`;
    }
  });

  const freeIndexScans = async () => {
    await db.sql`select pg_stat_clear_snapshot()`;
    const [{ n }] = await db.sql<{ n: number }[]>`select idx_scan::int as n from pg_stat_user_indexes where indexrelname = 'hosts_free_idx'`;
    return n;
  };
});
