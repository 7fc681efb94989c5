/**
 * coordinator/subscriptions/webhook.ts against a real HTTP receiver on this
 * machine: a signed POST arrives; the deny list (subscription-webhook-deny)
 * keeps webhooks off the addresses it holds, whether the URL names the
 * address or a name that resolves to it, and the refusal is a clear,
 * final failure with nothing sent.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { DEFAULT_WEBHOOK_DENY, webhookDenyList } from "../../coordinator/subscriptions/address-deny.js";
import { postWebhook, signWebhook, WebhookClient } from "../../coordinator/subscriptions/webhook.js";
import { loadCoordinatorConfig } from "../../coordinator/config.js";
import { ConfigError } from "../../lib/config.js";

const headers = { deliveryId: "d-1", eventId: "e-1", eventKind: "job.state", subscriptionId: "s-1" };
const now = () => Date.UTC(2026, 11, 8);

describe("webhook requests and the deny list", () => {
  let server: Server;
  let port: number;
  const received: { req: IncomingMessage; body: string }[] = [];
  const clients: WebhookClient[] = [];
  const client = (deny: string[]) => {
    const c = new WebhookClient(webhookDenyList(deny));
    clients.push(c);
    return c;
  };
  const post = (url: string, c: WebhookClient) => postWebhook(url, "whsec_test", '{"kind":"job.state"}', headers, { timeoutMs: 5000, now, client: c });

  beforeAll(async () => {
    server = createServer((req, res) => {
      let body = "";
      req.on("data", (chunk: Buffer) => (body += chunk.toString()));
      req.on("end", () => {
        received.push({ req, body });
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    port = (server.address() as AddressInfo).port;
  });

  afterAll(async () => {
    for (const c of clients) c.close();
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  });

  it("posts a signed body to an allowed address", async () => {
    received.length = 0;
    const out = await post(`http://127.0.0.1:${port}/hook`, client(DEFAULT_WEBHOOK_DENY));
    expect(out).toEqual({ code: 204, error: "", retryable: false });
    expect(received).toHaveLength(1);
    const { req, body } = received[0];
    const timestamp = req.headers["x-treadmill-timestamp"] as string;
    expect(req.headers["x-treadmill-signature-256"]).toBe(signWebhook("whsec_test", timestamp, body));
  });

  it("refuses an address the list holds, named in the URL, without sending", async () => {
    received.length = 0;
    const out = await post(`http://127.0.0.1:${port}/hook`, client(["127.0.0.0/8"]));
    expect(out).toEqual({ code: 0, error: "the endpoint's address 127.0.0.1 is denied (subscription-webhook-deny)", retryable: false });
    const v6 = await post(`http://[::1]:${port}/hook`, client(["::1"]));
    expect(v6.error).toBe("the endpoint's address ::1 is denied (subscription-webhook-deny)");
    expect(received).toEqual([]);
  });

  it("refuses a name that resolves only to denied addresses, at connection time", async () => {
    received.length = 0;
    const out = await post(`http://localhost:${port}/hook`, client(["127.0.0.0/8", "::1"]));
    expect(out.code).toBe(0);
    expect(out.retryable).toBe(false);
    expect(out.error).toMatch(/^the endpoint's address is denied \(subscription-webhook-deny\): localhost resolves only to denied addresses \(/);
    expect(received).toEqual([]);
    // The same name through a list that holds none of its addresses reaches the receiver.
    const allowed = await post(`http://localhost:${port}/hook`, client(["10.0.0.0/8"]));
    expect(allowed.code).toBe(204);
  });

  it("denies link-local (metadata services) by default", () => {
    const list = webhookDenyList(DEFAULT_WEBHOOK_DENY);
    expect(list.check("169.254.169.254", "ipv4")).toBe(true);
    expect(list.check("fe80::1", "ipv6")).toBe(true);
    expect(list.check("10.1.2.3", "ipv4")).toBe(false);
  });

  it("rejects a deny list entry that is not an address or range when the coordinator's configuration loads", () => {
    expect(() => loadCoordinatorConfig({ env: {}, argv: ["--subscription-webhook-deny", "10.0.0.0/8,intranet"] })).toThrow(ConfigError);
    expect(() => loadCoordinatorConfig({ env: {}, argv: ["--subscription-webhook-deny", "10.0.0.0/33"] })).toThrow(/subscription-webhook-deny: "10.0.0.0\/33" has no valid prefix length/);
    expect(loadCoordinatorConfig({ env: {}, argv: ["--subscription-webhook-deny", "10.0.0.0/8,fd00::/8"] }).subscriptionWebhookDeny).toEqual(["10.0.0.0/8", "fd00::/8"]);
  });
});
