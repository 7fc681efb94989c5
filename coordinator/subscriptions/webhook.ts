/**
 * A webhook request (docs/events.md, "Webhooks"): what is signed and how,
 * the headers, and one POST with a deadline. The signature is
 * `sha256=` + hex HMAC-SHA256, under the subscription's secret, of the
 * timestamp header's value, a ".", and the body's exact bytes, so a
 * captured request cannot be replayed later with a new timestamp.
 */
import { createHmac, randomBytes } from "node:crypto";

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

/** POSTs a signed body; never throws. */
export async function postWebhook(
  url: string,
  secret: string,
  body: string,
  h: WebhookHeaders,
  options: { timeoutMs: number; now: () => number },
): Promise<PostOutcome> {
  const timestamp = Math.floor(options.now() / 1000).toString();
  try {
    const res = await fetch(url, {
      method: "POST",
      redirect: "manual",
      signal: AbortSignal.timeout(options.timeoutMs),
      headers: {
        "content-type": "application/json",
        "user-agent": "treadmill-webhook/1",
        "x-treadmill-event-id": h.eventId,
        "x-treadmill-event-kind": h.eventKind,
        "x-treadmill-delivery-id": h.deliveryId,
        "x-treadmill-subscription-id": h.subscriptionId,
        "x-treadmill-timestamp": timestamp,
        "x-treadmill-signature-256": signWebhook(secret, timestamp, body),
      },
      body,
    });
    // The answer's body is not kept (it could be large, or anything).
    await res.body?.cancel().catch(() => undefined);
    if (res.status >= 200 && res.status < 300) return { code: res.status, error: "", retryable: false };
    const retryable = res.status >= 500 || res.status === 408 || res.status === 429;
    return { code: res.status, error: `endpoint answered ${res.status}`, retryable };
  } catch (err) {
    const e = err as Error & { cause?: { code?: string; message?: string } };
    if (e.name === "TimeoutError") return { code: 0, error: `no answer within ${options.timeoutMs} ms`, retryable: true };
    const cause = e.cause?.code ?? e.cause?.message ?? e.message;
    return { code: 0, error: `cannot reach the endpoint: ${cause}`.slice(0, 300), retryable: true };
  }
}
