import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { setHostHealth } from "../../coordinator/db/queries/health.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";

describe("a host's health", () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase();
  });
  afterAll(async () => {
    await db?.drop();
  });

  it("changes with its timeline and audit event together, and a repeated change records nothing", async () => {
    const hostId = randomUUID();
    await db.sql`insert into hosts (id, name, driver_kind) values (${hostId}, 'board-1', 'board')`;
    const [fresh] = await db.sql`select health from hosts where id = ${hostId}`;
    expect(fresh.health).toBe("unknown");

    const jobId = randomUUID();
    const first = await db.sql.begin((tx) =>
      setHostHealth(tx, { hostId, health: "quarantined", reason: "3 infrastructure failures in a row", actor: "system", jobId }),
    );
    const again = await db.sql.begin((tx) => setHostHealth(tx, { hostId, health: "quarantined", reason: "again", actor: "system" }));
    expect([first, again]).toEqual(["unknown", undefined]);

    const [host] = await db.sql`select health, health_reason from hosts where id = ${hostId}`;
    expect(host).toEqual({ health: "quarantined", health_reason: "3 infrastructure failures in a row" });
    const timeline = await db.sql`select health, reason, actor, job_id from host_health_events where host_id = ${hostId}`;
    expect(timeline).toEqual([{ health: "quarantined", reason: "3 infrastructure failures in a row", actor: "system", job_id: jobId }]);
    const events = await db.sql`select kind, message, details from audit_events where host_id = ${hostId}`;
    expect(events).toEqual([
      {
        kind: "host.health",
        message: "health unknown -> quarantined: 3 infrastructure failures in a row",
        details: { from: "unknown", to: "quarantined" },
      },
    ]);
  });

  it("rejects a health outside the five states", async () => {
    const hostId = randomUUID();
    await db.sql`insert into hosts (id, name, driver_kind) values (${hostId}, 'board-2', 'board')`;
    await expect(db.sql`update hosts set health = 'sick' where id = ${hostId}`).rejects.toThrow(/check constraint/);
  });
});
