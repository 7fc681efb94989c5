/**
 * Leases across a coordinator restart (issue #22): the keeper of a new
 * coordinator gives every lease its grace period from its own start, so a
 * holder whose client reconnects keeps its lease however long the
 * coordinator was down, and one that does not is lost a grace period later.
 */
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { hashSecret, newSecret } from "../../coordinator/auth.js";
import { LeaseEndReason, LeaseEventKind, LeaseService, LeaseState } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";
import { FAST, uniqueTag, waitUntil } from "../support/jobs.js";
import { startProcess, type RunningProcess } from "../support/process.js";

const COORDINATOR_BIN = fileURLToPath(new URL("../../bin/treadmill-coordinator.js", import.meta.url));

const CONFIG = { ...FAST, leaseSweepIntervalMs: 50, leaseGraceMinMs: 50, leaseKeepaliveIntervalMs: 50 };

describe("leases across a coordinator restart", () => {
  let db: TestDatabase;
  const running: TestCoordinator[] = [];
  const killers: (() => Promise<void>)[] = [];
  beforeAll(async () => {
    db = await createTestDatabase();
  });
  afterAll(async () => {
    for (const c of running) await c.stop();
    for (const kill of killers) await kill();
    await db?.drop();
  });

  it("survives a coordinator that was down longer than the grace period: the keepalive resumes and nothing is released early", async () => {
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
    await second.stop();
    running.pop();
  });

  it("keeps a lease whose holder's keepalive stream reconnects after the coordinator was killed with SIGKILL, and loses the one whose holder does not", async () => {
    const sql = db.sql;
    const token = newSecret("user");
    const userId = randomUUID();
    await sql`insert into users (id, name, role) values (${userId}, ${`holder-${userId.slice(0, 8)}`}, 'user')`;
    await sql`insert into api_tokens (id, user_id, hash, name) values (${randomUUID()}, ${userId}, ${hashSecret(token)}, 'test')`;
    const names = [`kept-${userId.slice(0, 8)}`, `dropped-${userId.slice(0, 8)}`];
    for (const name of names) {
      await sql`insert into hosts (id, name, driver_kind, credential_hash) values (${randomUUID()}, ${name}, 'process', ${hashSecret(newSecret("host"))})`;
    }
    const args = ["--port", "0", "--database-url", db.url, "--lease-sweep-interval-ms", "50", "--lease-grace-min-ms", "50", "--lease-keepalive-interval-ms", "100"];
    const start = async (): Promise<{ child: RunningProcess; client: ReturnType<typeof createClient<typeof LeaseService>> }> => {
      const child = startProcess(COORDINATOR_BIN, args, { TREADMILL_COORDINATOR_LOG_LEVEL: "info" });
      killers.push(async () => {
        child.child.kill("SIGKILL");
        await child.exited;
      });
      const url = (JSON.parse(await child.waitForLine(/coordinator ready/, 60_000)) as { url: string }).url;
      return { child, client: createClient(LeaseService, createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => token)] })) };
    };
    /** A holder's keepalive stream (what `tml reserve` holds), read until it fails. */
    const hold = (client: ReturnType<typeof createClient<typeof LeaseService>>, leaseId: string) => {
      const abort = new AbortController();
      const first = (async () => {
        const it = client.watchLease({ leaseId, keepalive: true }, { signal: abort.signal })[Symbol.asyncIterator]();
        await it.next();
        return it;
      })();
      return { opened: first, done: first.then(async (it) => { for (;;) if ((await it.next()).done) return; }).catch(() => undefined), abort };
    };

    const one = await start();
    const { lease: kept } = await one.client.createLease({ hostNames: [names[0]], duration: { seconds: 3600n }, gracePeriod: { seconds: 2n } });
    const { lease: dropped } = await one.client.createLease({ hostNames: [names[1]], duration: { seconds: 3600n }, gracePeriod: { seconds: 0n, nanos: 300_000_000 } });
    const holders = [hold(one.client, kept!.id), hold(one.client, dropped!.id)];
    await Promise.all(holders.map((h) => h.opened));
    one.child.child.kill("SIGKILL");
    await one.child.exited;
    await Promise.all(holders.map((h) => h.done));
    // Down for longer than either grace period.
    await waitUntil(async () => {
      const [r] = await sql<{ stale: boolean }[]>`select bool_and(now() - keepalive_at > interval '2500 milliseconds') as stale from leases where id in (${kept!.id}, ${dropped!.id})`;
      return r.stale;
    }, "both leases to be silent for longer than their grace");

    const two = await start();
    const again = hold(two.client, kept!.id);
    await again.opened;
    const lost = await waitUntil(async () => {
      const { lease } = await two.client.getLease({ leaseId: dropped!.id });
      return lease!.state === LeaseState.ENDED ? lease! : undefined;
    }, "the lease whose holder did not come back to be lost");
    expect(lost.endReason).toBe(LeaseEndReason.LOST);
    const { lease } = await two.client.getLease({ leaseId: kept!.id });
    expect(lease!.state).toBe(LeaseState.ACTIVE);
    expect(lease!.timeline.filter((e) => e.kind === LeaseEventKind.KEEPALIVE).map((e) => e.message)).toEqual([
      expect.stringMatching(/^keepalive stream opened by holder-/),
      expect.stringMatching(/^keepalive resumed \(WatchLease\) after \ds/),
      expect.stringMatching(/^keepalive stream opened by holder-/),
    ]);
    again.abort.abort();
    await again.done;
  }, 120_000);
});
