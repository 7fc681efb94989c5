import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { LeaseEndReason, LeaseService, LeaseState } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { FAST, insertImage, waitUntil } from "../support/jobs.js";

const CONFIG = { ...FAST, leaseSweepIntervalMs: 20, leaseGraceMinMs: 50 };

describe("leases on two coordinator replicas", () => {
  let a: TestCoordinator;
  let b: TestCoordinator;
  beforeAll(async () => {
    a = await startTestCoordinator({ config: CONFIG });
    b = await startTestCoordinator({ config: CONFIG, db: a.db });
  });
  afterAll(async () => {
    await b?.stop();
    await a?.stop();
  });

  it("activates each lease booked ahead once, with one session job, and ends each once, whichever replica's keeper comes first", async () => {
    const user = await a.createUser();
    const media = "application/x-treadmill-replica-test";
    const image = (await insertImage(a.sql, { mediaTypes: [media] })).ref;
    const hosts = [];
    for (let i = 0; i < 6; i++) hosts.push(await a.createHost({ mediaTypes: [media] }));
    // Far enough ahead that a loaded CI machine books all six before it comes.
    const start = { seconds: BigInt(Math.floor(Date.now() / 1000) + 5) };
    const ids: string[] = [];
    for (const [i, host] of hosts.entries()) {
      const c = (i % 2 === 0 ? a : b).client(LeaseService, user.token);
      const { lease } = await c.createLease({ hostNames: [host.name], duration: { seconds: 3600n }, startTime: start, image, gracePeriod: { seconds: 3n } });
      expect(lease!.state).toBe(LeaseState.WAITING);
      ids.push(lease!.id);
    }
    const client = a.client(LeaseService, user.token);
    // Nobody holds their keepalives: active at their start, lost 3 s later.
    // (A waiting lease silent for its grace is lost without activation: the
    // grace is long enough for two loaded keepers to activate all six first.)
    for (const id of ids) {
      const ended = await waitUntil(async () => {
        const { lease } = await client.getLease({ leaseId: id });
        return lease!.state === LeaseState.ENDED ? lease! : undefined;
      }, `lease ${id} to end`);
      expect(ended.endReason).toBe(LeaseEndReason.LOST);
    }
    const events = await a.sql<{ kind: string; n: number }[]>`
      select kind, count(*)::int as n from lease_events where lease_id = any(${ids}::uuid[]) and kind in ('active', 'ended', 'job')
      group by kind order by kind`;
    expect(events).toEqual([
      { kind: "active", n: 6 },
      { kind: "ended", n: 6 },
      { kind: "job", n: 6 },
    ]);
    const [jobs] = await a.sql<{ n: number; canceled: number }[]>`
      select count(*)::int as n, count(*) filter (where reason = 'canceled')::int as canceled from jobs where lease_id = any(${ids}::uuid[])`;
    expect(jobs).toEqual({ n: 6, canceled: 6 });
  }, 60_000);
});
