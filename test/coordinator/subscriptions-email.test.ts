/**
 * Email deliveries (issue #24 item 2) against a real SMTP server started in
 * the test (the smtp-server package): one message per event, and one
 * digest per window with every event of the window.
 */
import type { AddressInfo } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { SMTPServer } from "smtp-server";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { DeliveryState, EmailMode, SubscriptionService } from "../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { Notifier } from "../../lib/async/notifier.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { FAST, codeOf, insertImage, uniqueTag, waitUntil } from "../support/jobs.js";

interface Mail {
  from: string;
  to: string[];
  raw: string;
}

describe("email subscriptions", () => {
  let c: TestCoordinator;
  let smtp: SMTPServer;
  let image: string;
  const mails: Mail[] = [];
  const arrived = new Notifier();
  beforeAll(async () => {
    smtp = new SMTPServer({
      authOptional: true,
      disabledCommands: ["STARTTLS"],
      logger: false,
      onData(stream, session, callback) {
        const chunks: Buffer[] = [];
        stream.on("data", (c: Buffer) => chunks.push(c));
        stream.on("end", () => {
          mails.push({
            from: session.envelope.mailFrom === false ? "" : session.envelope.mailFrom.address,
            to: session.envelope.rcptTo.map((r) => r.address),
            // Folded header lines unfolded (RFC 5322), so a test can match a header on one line.
            raw: Buffer.concat(chunks).toString("utf8").replace(/\r?\n[ \t]+/g, " "),
          });
          arrived.notify();
          callback();
        });
      },
    });
    await new Promise<void>((resolve) => smtp.listen(0, "127.0.0.1", resolve));
    const port = (smtp.server.address() as AddressInfo).port;
    c = await startTestCoordinator({
      config: { ...FAST, smtpUrl: `smtp://127.0.0.1:${port}`, smtpFrom: "treadmill@lab.example", subscriptionLeaderPollMs: 100 },
    });
    image = (await insertImage(c.sql)).ref;
  });
  afterAll(async () => {
    await c?.stop();
    await new Promise<void>((resolve) => smtp.close(() => resolve()));
  });

  const mailsTo = (address: string) => arrived.until(() => mails.filter((m) => m.to.includes(address)).length > 0 && mails.filter((m) => m.to.includes(address)), 15_000, () => new Error(`no mail to ${address}`));

  it("sends one message per matching event through the configured smtp server", async () => {
    const alice = await c.createUser();
    const labels = uniqueTag();
    const { subscription } = await c.client(SubscriptionService, alice.token).createSubscription({
      name: "mail each",
      filter: { labels, states: ["queued"] },
      destinations: [{ target: { case: "email", value: { to: ["alice@lab.example"], mode: EmailMode.EACH } } }],
    });
    const { job } = await c.client(JobService, alice.token).submitJob({ spec: { image, hosts: { tags: uniqueTag() }, tags: labels } });
    const [mail] = await mailsTo("alice@lab.example");
    expect(mail.from).toBe("treadmill@lab.example");
    expect(mail.raw).toMatch(/^Subject: \[treadmill\] mail each: job\.state: job [0-9a-f-]+: queued\r?$/m);
    expect(mail.raw).toMatch(new RegExp(`^X-Treadmill-Subscription-Id: ${subscription!.id}\r?$`, "mi"));
    expect(mail.raw).toMatch(/^X-Treadmill-Event-Id: \d+\r?$/im);
    expect(mail.raw).toMatch(/^X-Treadmill-Delivery-Id: [0-9a-f-]{36}\r?$/im);
    expect(mail.raw).toContain(job!.id);
    const d = await waitUntil(async () => {
      const { deliveries } = await c.client(SubscriptionService, alice.token).listDeliveries({ subscriptionId: subscription!.id });
      return deliveries[0]?.state === DeliveryState.DELIVERED && deliveries[0];
    }, "the email delivery recorded");
    expect(d.requestSummary).toBe("email to alice@lab.example");
  });

  it("sends one digest for the events of a window", async () => {
    const bob = await c.createUser();
    const labels = uniqueTag();
    await c.client(SubscriptionService, bob.token).createSubscription({
      name: "mail digest",
      filter: { labels, states: ["queued"] },
      destinations: [{ target: { case: "email", value: { to: ["bob@lab.example"], mode: EmailMode.DIGEST, digestWindow: { seconds: 2n } } } }],
    });
    const jobs: string[] = [];
    for (let i = 0; i < 3; i++) {
      const { job } = await c.client(JobService, bob.token).submitJob({ spec: { image, hosts: { tags: uniqueTag() }, tags: labels } });
      jobs.push(job!.id);
    }
    const [digest] = await mailsTo("bob@lab.example");
    expect(digest.raw).toMatch(/^Subject: \[treadmill\] mail digest: 3 events\r?$/m);
    for (const id of jobs) expect(digest.raw).toContain(id);
    expect(mails.filter((m) => m.to.includes("bob@lab.example"))).toHaveLength(1);
  });

  it("refuses an email destination with a bad address, naming the field", async () => {
    const alice = await c.createUser();
    const err = c.client(SubscriptionService, alice.token).createSubscription({
      name: "bad",
      destinations: [{ target: { case: "email", value: { to: ["not an address"] } } }],
    });
    expect(await codeOf(err)).toBe("InvalidArgument");
    await expect(err).rejects.toThrow(/destinations\[0\]\.email\.to: "not an address" is not an email address/);
  });
});
