import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { audit } from "../../coordinator/db/queries/audit.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";

describe("the audit log", () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase();
  });
  afterAll(async () => {
    await db?.drop();
  });

  it("writes an event in the caller's transaction, and loses it with a rollback", async () => {
    const hostId = randomUUID();
    await db.sql.begin(async (tx) => {
      await audit(tx, { kind: "host.test", actor: "user:alice", hostId, message: "kept", details: { a: 1 } });
    });
    await db.sql
      .begin(async (tx) => {
        await audit(tx, { kind: "host.test", hostId, message: "rolled back" });
        throw new Error("abort");
      })
      .catch(() => undefined);
    const rows = await db.sql`select kind, actor, message, details, job_id from audit_events where host_id = ${hostId}`;
    expect(rows).toEqual([{ kind: "host.test", actor: "user:alice", message: "kept", details: { a: 1 }, job_id: null }]);
  });
});
