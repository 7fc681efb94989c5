import { createHmac } from "node:crypto";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "@jest/globals";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import {
  DeliveryState,
  GetSubscriptionResponseSchema,
  ListSubscriptionsResponseSchema,
  SubscriptionService,
  type SubscriptionFilter,
} from "../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { type MessageInitShape, toJsonString } from "@bufbuild/protobuf";
import type { SubscriptionFilterSchema } from "../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { FAST, codeOf, insertImage, uniqueTag, waitUntil } from "../support/jobs.js";
import { WebhookReceiver } from "../support/webhook-receiver.js";

/** Durations of hours shrunk to fractions of a second. */
const QUICK = {
  ...FAST,
  subscriptionRetryInitialMs: 30,
  subscriptionRetryMaxMs: 120,
  subscriptionRetryWindowMs: 60_000,
  subscriptionDisableAfterMs: 60_000,
  subscriptionWebhookTimeoutMs: 2000,
  subscriptionLeaderPollMs: 100,
};

function verify(secret: string, headers: Record<string, string | string[] | undefined>, body: string): boolean {
  const timestamp = String(headers["x-treadmill-timestamp"]);
  const expected = "sha256=" + createHmac("sha256", secret).update(`${timestamp}.${body}`).digest("hex");
  return headers["x-treadmill-signature-256"] === expected;
}

describe("subscriptions and signed webhooks", () => {
  let c: TestCoordinator;
  let image: string;
  const receivers: WebhookReceiver[] = [];
  beforeAll(async () => {
    c = await startTestCoordinator({ config: QUICK });
    image = (await insertImage(c.sql)).ref;
  });
  afterEach(async () => {
    for (const r of receivers.splice(0)) await r.close();
  });
  afterAll(async () => {
    await c?.stop();
  });

  async function receiver(): Promise<WebhookReceiver> {
    const r = await WebhookReceiver.start();
    receivers.push(r);
    return r;
  }

  async function subscribe(token: string, url: string, filter: MessageInitShape<typeof SubscriptionFilterSchema>) {
    const res = await c.client(SubscriptionService, token).createSubscription({
      name: "test",
      filter: filter as SubscriptionFilter,
      destinations: [{ target: { case: "webhook", value: { url } } }],
    });
    return { id: res.subscription!.id, secret: res.secret };
  }

  async function submit(token: string, labels: Record<string, string>): Promise<string> {
    const { job } = await c.client(JobService, token).submitJob({ spec: { image, hosts: { tags: uniqueTag() }, tags: labels } });
    return job!.id;
  }

  it("posts a correctly signed body for each matching event, with the event and delivery ids, and nothing for others", async () => {
    const alice = await c.createUser();
    const r = await receiver();
    const labels = uniqueTag();
    const sub = await subscribe(alice.token, r.url, { kinds: ["job.state"], labels });
    expect(sub.secret).toMatch(/^whsec_/);
    const matching = await submit(alice.token, labels);
    await submit(alice.token, uniqueTag());
    await c.client(JobService, alice.token).cancelJob({ jobId: matching });
    const got = await r.until((rs) => rs.length >= 2 && rs);
    const bodies = got.map((g) => JSON.parse(g.body) as Record<string, unknown>);
    expect(bodies.map((b) => [b.schema, b.kind, b.job_id, b.state])).toEqual([
      ["treadmill.event.v1", "job.state", matching, "queued"],
      ["treadmill.event.v1", "job.state", matching, "finalized"],
    ]);
    for (const g of got) {
      expect(verify(sub.secret, g.headers, g.body)).toBe(true);
      expect(verify(sub.secret.replace(/.$/, "x"), g.headers, g.body)).toBe(false);
      expect(g.headers["content-type"]).toBe("application/json");
      expect(g.headers["x-treadmill-event-id"]).toMatch(/^\d+$/);
      expect(g.headers["x-treadmill-delivery-id"]).toMatch(/^[0-9a-f-]{36}$/);
      expect(g.headers["x-treadmill-subscription-id"]).toBe(sub.id);
    }
    // The secret is shown once: no later answer carries it.
    const again = await c.client(SubscriptionService, alice.token).getSubscription({ id: sub.id });
    expect(toJsonString(GetSubscriptionResponseSchema, again)).not.toContain(sub.secret);
    expect(toJsonString(ListSubscriptionsResponseSchema, await c.client(SubscriptionService, alice.token).listSubscriptions({}))).not.toContain(sub.secret);
    // A round's successes are recorded together, just after the receiver answered the last of them.
    const log = await waitUntil(async () => {
      const l = await c.client(SubscriptionService, alice.token).listDeliveries({ subscriptionId: sub.id });
      return l.deliveries.every((d) => d.state !== DeliveryState.PENDING) ? l : undefined;
    }, "the deliveries recorded");
    expect(log.deliveries.map((d) => d.state)).toEqual([DeliveryState.DELIVERED, DeliveryState.DELIVERED]);
    expect(log.deliveries[0].requestSummary).toMatch(/^POST http:\/\/127\.0\.0\.1:\d+\/hook \d+ bytes$/);
  });

  it("retries a receiver that fails three times and then succeeds: the event arrives acknowledged once, after three logged failures", async () => {
    const alice = await c.createUser();
    const r = await receiver();
    r.answer = (n) => [503, 500, 502][n] ?? 200;
    const labels = uniqueTag();
    const sub = await subscribe(alice.token, r.url, { kinds: ["job.state"], states: ["queued"], labels });
    await submit(alice.token, labels);
    const client = c.client(SubscriptionService, alice.token);
    const [delivery] = await waitUntil(async () => {
      const { deliveries } = await client.listDeliveries({ subscriptionId: sub.id });
      return deliveries[0]?.state === DeliveryState.DELIVERED && deliveries;
    }, "the delivery delivered");
    expect(r.received.map((g) => g.status)).toEqual([503, 500, 502, 200]);
    // Every attempt is the same delivery: one id, one signed body.
    expect(new Set(r.received.map((g) => g.headers["x-treadmill-delivery-id"]))).toEqual(new Set([delivery.id]));
    expect(new Set(r.received.map((g) => g.body)).size).toBe(1);
    expect(delivery.attemptCount).toBe(4);
    expect(delivery.attempts.map((a) => [a.responseCode, a.error])).toEqual([
      [503, "endpoint answered 503"],
      [500, "endpoint answered 500"],
      [502, "endpoint answered 502"],
      [200, ""],
    ]);
    const after = await client.getSubscription({ id: sub.id });
    expect(after.subscription?.failingSince).toBeUndefined();
  });

  it("does not retry a 4xx other than 408 and 429, and logs it failed", async () => {
    const alice = await c.createUser();
    const r = await receiver();
    r.answer = () => 404;
    const labels = uniqueTag();
    const sub = await subscribe(alice.token, r.url, { states: ["queued"], labels });
    await submit(alice.token, labels);
    const client = c.client(SubscriptionService, alice.token);
    const [d] = await waitUntil(async () => {
      const { deliveries } = await client.listDeliveries({ subscriptionId: sub.id });
      return deliveries[0]?.state === DeliveryState.FAILED && deliveries;
    }, "the delivery failed");
    expect([d.attemptCount, d.responseCode, r.received.length]).toEqual([1, 404, 1]);
  });

  it("disables a subscription whose endpoint is down for the whole failure window and tells its owner why", async () => {
    const c2 = await startTestCoordinator({ config: { ...QUICK, subscriptionDisableAfterMs: 600, subscriptionRetryWindowMs: 60_000 } });
    try {
      const alice = await c2.createUser();
      const img = (await insertImage(c2.sql)).ref;
      // A port nothing listens on: every attempt is a connection error.
      const closed = await WebhookReceiver.start();
      const url = closed.url;
      await closed.close();
      const labels = uniqueTag();
      const client = c2.client(SubscriptionService, alice.token);
      const { subscription } = await client.createSubscription({
        name: "down",
        filter: { labels },
        destinations: [{ target: { case: "webhook", value: { url } } }],
      });
      await c2.client(JobService, alice.token).submitJob({ spec: { image: img, hosts: { tags: uniqueTag() }, tags: labels } });
      const s = await waitUntil(async () => {
        const got = (await client.getSubscription({ id: subscription!.id })).subscription!;
        return !got.enabled && got;
      }, "the subscription disabled");
      expect(s.disabledReason).toMatch(/^webhook http:\/\/127\.0\.0\.1:\d+\/hook has failed for 1 s without a success \(last error: cannot reach the endpoint: ECONNREFUSED\)$/);
      expect(s.disableTime).toBeDefined();
      const { deliveries } = await client.listDeliveries({ subscriptionId: subscription!.id });
      expect(deliveries[0].state).toBe(DeliveryState.FAILED);
      expect(deliveries[0].attemptCount).toBeGreaterThan(1);
      expect(deliveries[0].attempts.every((a) => a.error.startsWith("cannot reach the endpoint"))).toBe(true);
      // Enabling it again clears the notice.
      const { subscription: back } = await client.updateSubscription({ id: subscription!.id, enabled: true });
      expect([back!.enabled, back!.disabledReason, back!.failingSince]).toEqual([true, "", undefined]);
    } finally {
      await c2.stop();
    }
  });

  it("redelivers one logged delivery as a new delivery with the same event id and body", async () => {
    const alice = await c.createUser();
    const r = await receiver();
    const labels = uniqueTag();
    const sub = await subscribe(alice.token, r.url, { states: ["queued"], labels });
    await submit(alice.token, labels);
    const [first] = await r.until((rs) => rs.length === 1 && rs);
    const client = c.client(SubscriptionService, alice.token);
    // The log has it once the worker has written the batch it was sent from.
    const deliveries = await waitUntil(async () => {
      const l = await client.listDeliveries({ subscriptionId: sub.id });
      return l.deliveries.length === 1 && l.deliveries[0].state === DeliveryState.DELIVERED ? l.deliveries : undefined;
    }, "the delivery to be logged");
    const { delivery } = await client.redeliver({ deliveryId: deliveries[0].id });
    expect([delivery!.redeliveryOf, delivery!.eventId]).toEqual([deliveries[0].id, deliveries[0].eventId]);
    // Read back after its commit: the worker, woken by that commit, may have sent it already.
    expect([DeliveryState.PENDING, DeliveryState.DELIVERED]).toContain(delivery!.state);
    const [, second] = await r.until((rs) => rs.length === 2 && rs);
    expect(second.body).toBe(first.body);
    expect(second.headers["x-treadmill-event-id"]).toBe(first.headers["x-treadmill-event-id"]);
    expect(second.headers["x-treadmill-delivery-id"]).toBe(delivery!.id);
    expect(verify(sub.secret, second.headers, second.body)).toBe(true);
    // Another user cannot redeliver it, nor see the log.
    const bob = await c.createUser();
    expect(await codeOf(c.client(SubscriptionService, bob.token).redeliver({ deliveryId: deliveries[0].id }))).toBe("NotFound");
    expect(await codeOf(c.client(SubscriptionService, bob.token).listDeliveries({ subscriptionId: sub.id }))).toBe("NotFound");
  });

  it("writes the other deliveries of a batch once when a subscription is deleted while its request is in flight", async () => {
    const alice = await c.createUser();
    const labels = uniqueTag();
    // A receiver that answers after 800 ms: its subscription is deleted meanwhile.
    let slowRequests = 0;
    const slow = createServer((req, res) => {
      slowRequests++;
      req.resume();
      setTimeout(() => res.writeHead(204).end(), 800);
    });
    await new Promise<void>((resolve) => slow.listen(0, "127.0.0.1", resolve));
    try {
      const doomed = await subscribe(alice.token, `http://127.0.0.1:${(slow.address() as AddressInfo).port}/hook`, { states: ["queued"], labels });
      const r = await receiver();
      const kept = await subscribe(alice.token, r.url, { states: ["queued"], labels });
      await submit(alice.token, labels);
      await waitUntil(async () => slowRequests === 1 || undefined, "the slow receiver's request");
      await c.client(SubscriptionService, alice.token).deleteSubscription({ id: doomed.id });
      await r.until((rs) => rs.length === 1);
      const log = await waitUntil(async () => {
        const l = await c.client(SubscriptionService, alice.token).listDeliveries({ subscriptionId: kept.id });
        return l.deliveries.length === 1 && l.deliveries[0].state === DeliveryState.DELIVERED ? l : undefined;
      }, "the kept subscription's delivery logged");
      expect(log.deliveries[0].id).toBe(r.received[0].headers["x-treadmill-delivery-id"]);
      // Its batch was written: the worker kept its lead and sent nothing again (a new leader would, within 100 ms).
      await new Promise((resolve) => setTimeout(resolve, 1500));
      expect(r.received).toHaveLength(1);
      expect(slowRequests).toBe(1);
    } finally {
      slow.closeAllConnections();
      await new Promise((resolve) => slow.close(resolve));
    }
  });

  it("sends a synthetic event on TestSubscription", async () => {
    const alice = await c.createUser();
    const r = await receiver();
    const sub = await subscribe(alice.token, r.url, { labels: uniqueTag() });
    const { deliveries } = await c.client(SubscriptionService, alice.token).testSubscription({ id: sub.id });
    expect(deliveries).toHaveLength(1);
    const [got] = await r.until((rs) => rs.length === 1 && rs);
    expect(JSON.parse(got.body)).toMatchObject({ schema: "treadmill.event.v1", kind: "subscription.test", subscription_id: sub.id });
    expect(got.headers["x-treadmill-event-id"]).toBe(deliveries[0].eventId);
    expect(verify(sub.secret, got.headers, got.body)).toBe(true);
  });

  it("never matches another user's private job, whatever the filter, and shows a user only their own subscriptions", async () => {
    const alice = await c.createUser();
    const bob = await c.createUser();
    const admin = await c.createUser({ role: "admin" });
    const labels = uniqueTag();
    const bobs = await receiver();
    const admins = await receiver();
    // Bob's filter names Alice's labels and Alice's job's image: it must still match nothing of hers.
    const bobSub = await subscribe(bob.token, bobs.url, { labels, images: [image] });
    await subscribe(admin.token, admins.url, { labels });
    expect(await codeOf(subscribe(bob.token, bobs.url, { ownerUserIds: [alice.id] }))).toBe("PermissionDenied");
    expect(await codeOf(subscribe(bob.token, bobs.url, { kinds: ["host.health"] }))).toBe("PermissionDenied");
    const job = await submit(alice.token, labels);
    await c.client(JobService, alice.token).cancelJob({ jobId: job });
    // The admin sees both of Alice's events; by then Bob's worker pass has gone by them too.
    await admins.until((rs) => rs.length === 2);
    await c.client(SubscriptionService, bob.token).testSubscription({ id: bobSub.id });
    const got = await bobs.until((rs) => rs.length >= 1 && rs);
    expect(got.map((g) => (JSON.parse(g.body) as { kind: string }).kind)).toEqual(["subscription.test"]);
    expect(await codeOf(c.client(SubscriptionService, alice.token).getSubscription({ id: bobSub.id }))).toBe("NotFound");
    const { subscriptions } = await c.client(SubscriptionService, alice.token).listSubscriptions({});
    expect(subscriptions).toEqual([]);
  });

  it("answers bad input with INVALID_ARGUMENT naming the field", async () => {
    const alice = await c.createUser();
    const client = c.client(SubscriptionService, alice.token);
    const bad = async (req: Parameters<typeof client.createSubscription>[0]) => {
      try {
        await client.createSubscription(req);
        return "ok";
      } catch (err) {
        return (err as Error).message;
      }
    };
    const hook = [{ target: { case: "webhook" as const, value: { url: "http://127.0.0.1:1/x" } } }];
    expect(await bad({ name: "", destinations: hook })).toMatch(/name is required/);
    expect(await bad({ name: "x", destinations: [] })).toMatch(/destinations must have at least one entry/);
    expect(await bad({ name: "x", destinations: [{ target: { case: "webhook", value: { url: "ftp://x/" } } }] })).toMatch(/destinations\[0\]\.webhook\.url must be an http/);
    expect(await bad({ name: "x", destinations: [{ target: { case: "webhook", value: { url: "http://u:p@x/" } } }] })).toMatch(/must not carry credentials/);
    expect(await bad({ name: "x", filter: { states: ["bogus"] }, destinations: hook })).toMatch(/filter\.states: unknown value "bogus"/);
    expect(await bad({ name: "x", filter: { kinds: ["job.nope"] }, destinations: hook })).toMatch(/filter\.kinds: unknown value/);
    expect(await bad({ name: "x", filter: { images: ["Bad Image"] }, destinations: hook })).toMatch(/filter\.images/);
    expect(await bad({ name: "x", groupName: "nogroup", destinations: hook })).toMatch(/group nogroup not found/);
    expect(await codeOf(client.getSubscription({ id: "nope" }))).toBe("InvalidArgument");
  });
});
