/**
 * A webhook request (docs/events.md, "Webhooks"): what is signed and how,
 * the headers, and one POST with a deadline. The signature is
 * `sha256=` + hex HMAC-SHA256, under the subscription's secret, of the
 * timestamp header's value, a ".", and the body's exact bytes, so a
 * captured request cannot be replayed later with a new timestamp.
 */
import { createHmac, randomBytes } from "node:crypto";
import http from "node:http";
import https from "node:https";

/** The prefix of a subscription secret. */
const SECRET_PREFIX = "whsec_";

/** A new webhook secret: the prefix and 32 random bytes, base64url. */
export function newWebhookSecret(): string {
  return SECRET_PREFIX + randomBytes(32).toString("base64url");
}

/** The X-Treadmill-Signature-256 value of `body` sent at `timestamp` (unix seconds, as sent). */
export function signWebhook(secret: string, timestamp: string, body: string): string {
  return "sha256=" + createHmac("sha256", secret).update(`${timestamp}.${body}`, "utf8").digest("hex");
}

/** What a webhook request carries besides its body. */
export interface WebhookHeaders {
  deliveryId: string;
  eventId: string;
  eventKind: string;
  subscriptionId: string;
}

/** How one POST went. */
export interface PostOutcome {
  /** The HTTP status; 0 when none came (connection error, timeout). */
  code: number;
  /** Why it failed; empty on a 2xx. */
  error: string;
  /** Whether another attempt may succeed: connection errors, timeouts, 408, 429 and 5xx. */
  retryable: boolean;
}

/**
 * Keep-alive connection pools, one per protocol and shared by every
 * destination (node:http rather than fetch: a fraction of the CPU per
 * request, which is what bounds a worker sending thousands a second).
 */
const AGENTS = {
  "http:": new http.Agent({ keepAlive: true, maxSockets: 64, maxFreeSockets: 16 }),
  "https:": new https.Agent({ keepAlive: true, maxSockets: 64, maxFreeSockets: 16 }),
};

/** POSTs a signed body; never throws. */
export function postWebhook(
  url: string,
  secret: string,
  body: string,
  h: WebhookHeaders,
  options: { timeoutMs: number; now: () => number },
): Promise<PostOutcome> {
  const timestamp = Math.floor(options.now() / 1000).toString();
  const target = new URL(url);
  const protocol = target.protocol === "https:" ? "https:" : "http:";
  const payload = Buffer.from(body, "utf8");
  return new Promise((resolve) => {
    let settled = false;
    const done = (o: PostOutcome) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(o);
    };
    const req = (protocol === "https:" ? https : http).request(
      target,
      {
        method: "POST",
        agent: AGENTS[protocol],
        headers: {
          "content-type": "application/json",
          "content-length": payload.length,
          "user-agent": "treadmill-webhook/1",
          "x-treadmill-event-id": h.eventId,
          "x-treadmill-event-kind": h.eventKind,
          "x-treadmill-delivery-id": h.deliveryId,
          "x-treadmill-subscription-id": h.subscriptionId,
          "x-treadmill-timestamp": timestamp,
          "x-treadmill-signature-256": signWebhook(secret, timestamp, body),
        },
      },
      (res) => {
        // The answer's body is not kept (it could be large, or anything).
        res.resume();
        const status = res.statusCode ?? 0;
        res.on("end", () => {
          if (status >= 200 && status < 300) done({ code: status, error: "", retryable: false });
          else done({ code: status, error: `endpoint answered ${status}`, retryable: status >= 500 || status === 408 || status === 429 });
        });
        res.on("error", () => done({ code: status, error: `endpoint answered ${status} and broke off its answer`, retryable: true }));
      },
    );
    const timer = setTimeout(() => {
      done({ code: 0, error: `no answer within ${options.timeoutMs} ms`, retryable: true });
      req.destroy();
    }, options.timeoutMs);
    req.on("error", (err: NodeJS.ErrnoException) => done({ code: 0, error: `cannot reach the endpoint: ${err.code ?? err.message}`.slice(0, 300), retryable: true }));
    req.end(payload);
  });
}
