/**
 * The reads of a scheduling pass (coordinator/db/queries/hosts.ts) against
 * PostgreSQL: a pass counts the free slots in one aggregate and reads, per
 * kind of job, only the free hosts its jobs may take, in the placement's
 * order; an idle lab of 10,000 hosts costs a dispatch a few rows.
 */
import { randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { freeHostsFor, freeSlotCount } from "../../coordinator/db/queries/hosts.js";
import { type TestDatabase, createTestDatabase } from "../support/db.js";

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
});
