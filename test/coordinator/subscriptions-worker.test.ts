/**
 * The delivery worker across replicas and crashes (issue #24 item 2): two
 * coordinator processes on one database, one of which runs the worker (its
 * advisory lock); the leader is killed with SIGKILL, the other takes over
 * from the stored cursor, and the killed one comes back as a follower.
 * Every matching event reaches the receiver exactly once throughout; and a
 * leader killed before it wrote what it sent has it sent again, with the
 * same delivery id.
 */
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { hashSecret, newSecret } from "../../coordinator/auth.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { DeliveryState, SubscriptionService } from "../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";
import { insertImage, uniqueTag, waitUntil } from "../support/jobs.js";
import { startProcess, type RunningProcess } from "../support/process.js";
import { WebhookReceiver } from "../support/webhook-receiver.js";

const COORDINATOR_BIN = fileURLToPath(new URL("../../bin/treadmill-coordinator.js", import.meta.url));
const LEADING = /"msg":"delivery worker leading"/;

/** A coordinator replica on `db` (as a child process, killed with the others at the end). */
async function startReplica(db: TestDatabase, children: RunningProcess[]): Promise<{ proc: RunningProcess; url: string }> {
  const proc = startProcess(
    COORDINATOR_BIN,
    ["--port", "0", "--database-url", db.url, "--subscription-leader-poll-ms", "100", "--subscription-retry-initial-ms", "50"],
    { TREADMILL_COORDINATOR_LOG_LEVEL: "info" },
  );
  children.push(proc);
  const url = (JSON.parse(await proc.waitForLine(/coordinator ready/, 60_000)) as { url: string }).url;
  return { proc, url };
}

/** A user of `db` and a bearer-token client maker for it. */
async function newUser(db: TestDatabase) {
  const token = newSecret("user");
  const userId = randomUUID();
  await db.sql`insert into users (id, name, role) values (${userId}, ${`u-${userId.slice(0, 8)}`}, 'user')`;
  await db.sql`insert into api_tokens (id, user_id, hash, name) values (${randomUUID()}, ${userId}, ${hashSecret(token)}, 'test')`;
  return <S extends Parameters<typeof createClient>[0]>(service: S, url: string) =>
    createClient(service, createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => token)] }));
}

/** A database, a webhook receiver and the replicas started on it, for one describe block; all gone after it. */
function replicaFixture() {
  const f = { db: undefined as unknown as TestDatabase, receiver: undefined as unknown as WebhookReceiver, children: [] as RunningProcess[] };
  beforeAll(async () => {
    f.db = await createTestDatabase();
    f.receiver = await WebhookReceiver.start();
  });
  afterAll(async () => {
    for (const c of f.children) {
      c.child.kill("SIGKILL");
      await c.exited;
    }
    await f.receiver?.close();
    await f.db?.drop();
  });
  return f;
}

describe("the delivery worker on two replicas", () => {
  const f = replicaFixture();

  const replica = () => startReplica(f.db, f.children);

  it("runs on one replica at a time, and after the leader is killed the other resumes from the stored cursor without losing or repeating an event", async () => {
    const client = await newUser(f.db);
    const image = (await insertImage(f.db.sql)).ref;
    const a = await replica();
    const b = await replica();
    const labels = uniqueTag();
    const { subscription } = await client(SubscriptionService, a.url).createSubscription({
      name: "replicas",
      filter: { labels, states: ["queued"] },
      destinations: [{ target: { case: "webhook", value: { url: f.receiver.url } } }],
    });
    const made: string[] = [];
    const submit = async (url: string, n: number) => {
      for (let i = 0; i < n; i++) {
        const { job } = await client(JobService, url).submitJob({ spec: { image, hosts: { tags: uniqueTag() }, tags: labels } });
        made.push(job!.id);
      }
    };
    const received = () => f.receiver.received.map((r) => (JSON.parse(r.body) as { job_id: string }).job_id);
    /** Every job made so far arrived, and its delivery is recorded (so that a kill now cannot leave one unacknowledged). */
    const allDelivered = async () => {
      await f.receiver.until((rs) => rs.length >= made.length);
      await waitUntil(async () => {
        const { deliveries } = await client(SubscriptionService, live.url).listDeliveries({ subscriptionId: subscription!.id, pageSize: 500 });
        return deliveries.length === made.length && deliveries.every((d) => d.state === DeliveryState.DELIVERED);
      }, "every delivery recorded delivered");
    };
    let live = b;

    await submit(a.url, 3);
    await submit(b.url, 3);
    await allDelivered();
    // One leader: the other never logged that it leads.
    const leaders = [a, b].filter((r) => r.proc.lines.some((l) => LEADING.test(l)));
    expect(leaders).toHaveLength(1);
    const [leader] = leaders;
    const other = leader === a ? b : a;
    live = other;

    leader.proc.child.kill("SIGKILL");
    await leader.proc.exited;
    // Events while the worker changes hands.
    await submit(other.url, 4);
    await other.proc.waitForLine(LEADING, 30_000);
    await submit(other.url, 2);
    await allDelivered();

    // The killed replica comes back; the survivor keeps the lead.
    const back = await replica();
    await submit(back.url, 3);
    await allDelivered();
    expect(back.proc.lines.some((l) => LEADING.test(l))).toBe(false);

    expect(received().sort()).toEqual([...made].sort());
    expect(new Set(f.receiver.received.map((r) => r.headers["x-treadmill-delivery-id"])).size).toBe(made.length);
  }, 180_000);
});

describe("a delivery worker killed before it wrote what it sent", () => {
  const f = replicaFixture();

  it("has the next leader send the event again, with the same delivery id, and logs it once", async () => {
    const leader = await startReplica(f.db, f.children);
    await leader.proc.waitForLine(LEADING, 30_000);
    const survivor = await startReplica(f.db, f.children);
    const client = await newUser(f.db);
    const image = (await insertImage(f.db.sql)).ref;
    const labels = uniqueTag();
    const { subscription } = await client(SubscriptionService, survivor.url).createSubscription({
      name: "killed-leader",
      filter: { labels, states: ["queued"] },
      destinations: [{ target: { case: "webhook", value: { url: f.receiver.url } } }],
    });
    // The leader dies as its request arrives: it never learns the answer, nor writes the batch.
    f.receiver.answer = (n) => {
      if (n === 0) leader.proc.child.kill("SIGKILL");
      return 204;
    };
    await client(JobService, survivor.url).submitJob({ spec: { image, hosts: { tags: uniqueTag() }, tags: labels } });
    const [first, again] = await f.receiver.until((rs) => rs.length >= 2 && rs, 30_000);
    expect(await survivor.proc.waitForLine(LEADING, 30_000)).toBeTruthy();
    expect(again.headers["x-treadmill-delivery-id"]).toBe(first.headers["x-treadmill-delivery-id"]);
    expect(again.headers["x-treadmill-event-id"]).toBe(first.headers["x-treadmill-event-id"]);
    expect(again.body).toBe(first.body);
    const logged = await waitUntil(async () => {
      const { deliveries } = await client(SubscriptionService, survivor.url).listDeliveries({ subscriptionId: subscription!.id });
      return deliveries.length === 1 && deliveries[0].state === DeliveryState.DELIVERED ? deliveries : undefined;
    }, "the delivery logged delivered");
    expect(logged[0].id).toBe(first.headers["x-treadmill-delivery-id"]);
    expect(f.receiver.received).toHaveLength(2);
  }, 120_000);
});
