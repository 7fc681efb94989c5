import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "@jest/globals";
import type { Browser, Page } from "playwright-core";
import { buildConsole } from "../../console/build.js";
import { SubscriptionService } from "../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { launchChromium, loggedInPage } from "../support/browser.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { WebhookReceiver } from "../support/webhook-receiver.js";

const WAIT = { timeout: 30_000 };

/**
 * The web console's subscriptions pages in headless Chromium: subscribing a
 * webhook shows its secret once; a subscription the coordinator disabled
 * is flagged on the list with its reason and can be enabled again; a
 * subscription's page shows its delivery log, sends a test event and
 * redelivers a delivery. Any console error fails the test.
 */
describe("the web console's subscriptions pages in headless Chromium", () => {
  let c: TestCoordinator;
  let dist: string;
  let browser: Browser;
  let page: Page;
  let receiver: WebhookReceiver;
  let user: { id: string; name: string; token: string };
  const errors: string[] = [];

  beforeAll(async () => {
    dist = await mkdtemp(join(tmpdir(), "treadmill-console-"));
    await buildConsole({ outDir: dist });
    c = await startTestCoordinator({ config: { consoleDir: dist, subscriptionLeaderPollMs: 100 } });
    receiver = await WebhookReceiver.start();
    user = await c.createUser({ name: "subs-user" });
    browser = await launchChromium();
    page = await loggedInPage(browser, user, false, errors);
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    await c?.stop();
    await receiver?.close();
    if (dist) await rm(dist, { recursive: true, force: true });
  }, 60_000);

  afterEach(() => {
    expect(errors).toEqual([]);
  });

  it("subscribes a webhook from the form and shows its secret once", async () => {
    await page.goto(`${c.url}/subscriptions`);
    await page.getByRole("link", { name: "Subscriptions" }).first().waitFor(WAIT);
    await page.fill("#sub-name", "from the console");
    await page.fill("#sub-url", receiver.url);
    await page.fill("#sub-labels", "project=tock");
    await page.fill("#sub-states", "finalized");
    await page.click("#subscription-form button[type=submit]");
    const secret = await page.locator("#subscription-secret code").textContent(WAIT);
    expect(secret).toMatch(/^whsec_/);
    const { subscriptions } = await c.client(SubscriptionService, user.token).listSubscriptions({});
    expect(subscriptions.map((s) => [s.name, s.filter?.labels, s.filter?.states])).toEqual([["from the console", { project: "tock" }, ["finalized"]]]);
    await page.reload();
    await page.locator("#subscriptions-table").waitFor(WAIT);
    expect(await page.content()).not.toContain(secret!);
  });

  it("flags a subscription the coordinator disabled, with its reason, and enables it again", async () => {
    const { subscription } = await c.client(SubscriptionService, user.token).createSubscription({
      name: "flaky endpoint",
      destinations: [{ target: { case: "webhook", value: { url: receiver.url } } }],
    });
    await c.sql`update subscriptions set enabled = false, disabled_reason = 'webhook http://x/ has failed for 86400 s without a success (last error: endpoint answered 503)', disabled_at = now() where id = ${subscription!.id}`;
    await page.goto(`${c.url}/subscriptions`);
    const flagged = page.locator(`[data-disabled-subscription="${subscription!.id}"]`);
    await flagged.waitFor(WAIT);
    expect(await flagged.textContent()).toMatch(/Subscription flaky endpoint was disabled on .*: webhook http:\/\/x\/ has failed for 86400 s without a success \(last error: endpoint answered 503\)\./);
    await flagged.getByRole("button", { name: "Enable again" }).click();
    await flagged.waitFor({ state: "detached", timeout: 30_000 });
    const { subscription: back } = await c.client(SubscriptionService, user.token).getSubscription({ id: subscription!.id });
    expect([back!.enabled, back!.disabledReason]).toEqual([true, ""]);
  });

  it("shows a subscription's delivery log, sends a test event and redelivers a delivery", async () => {
    const { subscription } = await c.client(SubscriptionService, user.token).createSubscription({
      name: "with a log",
      destinations: [{ target: { case: "webhook", value: { url: receiver.url } } }],
    });
    const before = receiver.received.length;
    await page.goto(`${c.url}/subscriptions/${subscription!.id}`);
    await page.click("#test-subscription");
    await receiver.until((rs) => rs.length >= before + 1);
    await page.reload();
    const row = page.locator("#deliveries-table tbody tr[data-delivery-id]").first();
    await row.waitFor(WAIT);
    expect(await row.textContent()).toMatch(/subscription\.test/);
    await row.getByRole("button", { name: "Redeliver" }).click();
    await receiver.until((rs) => rs.length >= before + 2);
    await page.locator("#deliveries-table tbody tr[data-delivery-id]").nth(1).waitFor(WAIT);
    expect(await page.locator("#deliveries-table tbody tr[data-delivery-id]").count()).toBe(2);
  });
});
