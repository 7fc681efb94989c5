import { afterAll, describe, expect, it } from "@jest/globals";
import { LeaseEndReason, LeaseEventKind, LeaseService, LeaseState } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";
import { FAST, uniqueTag, waitUntil } from "../support/jobs.js";

const CONFIG = { ...FAST, leaseSweepIntervalMs: 50, leaseGraceMinMs: 50, leaseKeepaliveIntervalMs: 50 };

describe("leases across a coordinator restart", () => {
  let db: TestDatabase;
  const running: TestCoordinator[] = [];
  afterAll(async () => {
    for (const c of running) await c.stop();
    await db?.drop();
  });

  it("survives a coordinator that was down longer than the grace period: the keepalive resumes and nothing is released early", async () => {
    db = await createTestDatabase();
    const first = await startTestCoordinator({ db, config: CONFIG });
    running.push(first);
    const user = await first.createUser();
    const tag = uniqueTag();
    const hostA = await first.createHost({ tags: tag });
    const hostB = await first.createHost({ tags: tag });
    const leases = (c: TestCoordinator) => c.client(LeaseService, user.token);
    const { lease: kept } = await leases(first).createLease({ hostNames: [hostA.name], duration: { seconds: 3600n }, gracePeriod: { seconds: 20n } });
    const { lease: short } = await leases(first).createLease({
      hostNames: [hostB.name],
      duration: { seconds: 3600n },
      gracePeriod: { seconds: 0n, nanos: 200_000_000 },
    });
    await first.stop();
    running.pop();
    // As if they started before the coordinator went down for an hour: no keepalive reached them meanwhile.
    await db.sql`
      update leases set starts_at = now() - interval '61 minutes', keepalive_at = now() - interval '1 hour'
      where id in (${kept!.id}, ${short!.id})`;

    const second = await startTestCoordinator({ db, config: CONFIG });
    running.push(second);
    // The new keeper gives every lease its grace period from its own start:
    // the short one is lost once that has passed...
    const lost = await waitUntil(async () => {
      const { lease } = await leases(second).getLease({ leaseId: short!.id });
      return lease!.state === LeaseState.ENDED ? lease! : undefined;
    }, "the lease with a short grace period to be lost");
    expect(lost.endReason).toBe(LeaseEndReason.LOST);
    // ... while the other, whose grace has not passed since, is still held.
    const { lease: still } = await leases(second).getLease({ leaseId: kept!.id });
    expect(still!.state).toBe(LeaseState.ACTIVE);
    const [host] = await db.sql<{ lease_id: string | null }[]>`select lease_id from hosts where id = ${hostA.id}`;
    expect(host.lease_id).toBe(kept!.id);

    await leases(second).renewLease({ leaseId: kept!.id });
    const { lease: renewed } = await leases(second).getLease({ leaseId: kept!.id });
    const resumed = renewed!.timeline.filter((e) => e.kind === LeaseEventKind.KEEPALIVE).map((e) => e.message);
    expect(resumed).toEqual([expect.stringMatching(/^keepalive resumed \(RenewLease\) after 1h/)]);
    expect(renewed!.state).toBe(LeaseState.ACTIVE);
  });
});
