/**
 * The sweep's read of jobs past their queue timeout (migration 0016): each
 * queued job's deadline kept on its row wherever it is queued, and read
 * through the index of queued jobs' deadlines.
 */
import { randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { queueTimedOut } from "../../coordinator/db/queries/jobs.js";
import { type TestDatabase, createTestDatabase } from "../support/db.js";

describe("the sweep's read of queue timeouts", () => {
  let db: TestDatabase;
  let owner: string;
  beforeAll(async () => {
    db = await createTestDatabase();
    owner = randomUUID();
    await db.sql`insert into users (id, name, role) values (${owner}, 'deadlines', 'user')`;
  });
  afterAll(async () => {
    await db?.drop();
  });

  const deadline = async (id: string) => {
    const [row] = await db.sql<{ late: boolean; exact: boolean }[]>`
      select queue_deadline_at < now() as late,
        queue_deadline_at = queued_at + queue_timeout_ms * interval '1 millisecond' as exact
      from jobs where id = ${id}`;
    return row;
  };

  it("keeps each job's queue deadline from its queuing, again when it is queued anew, and finds the late ones longest past first", async () => {
    const [late, later, waiting] = [randomUUID(), randomUUID(), randomUUID()];
    await db.sql`
      insert into jobs (id, owner_id, spec, queued_at, queue_timeout_ms) values
        (${late}, ${owner}, '{}', now() - interval '2 hours', 60000),
        (${later}, ${owner}, '{}', now() - interval '1 hour', 60000),
        (${waiting}, ${owner}, '{}', now(), 3600000)`;
    expect(await deadline(late)).toEqual({ late: true, exact: true });
    expect(await deadline(waiting)).toEqual({ late: false, exact: true });
    expect((await queueTimedOut(db.sql, 10)).map((r) => r.id)).toEqual([late, later]);

    // A restart queues the job anew: its deadline starts again.
    await db.sql`update jobs set queued_at = now() where id = ${late}`;
    expect(await deadline(late)).toEqual({ late: false, exact: true });
    expect((await queueTimedOut(db.sql, 10)).map((r) => r.id)).toEqual([later]);
    // A job no longer queued is not the sweep's.
    await db.sql`update jobs set state = 'assigned' where id = ${later}`;
    expect(await queueTimedOut(db.sql, 10)).toEqual([]);
  });
});
