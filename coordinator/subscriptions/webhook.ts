/**
 * A webhook request (docs/events.md, "Webhooks"): what is signed and how,
 * the headers, and one POST with a deadline. The signature is
 * `sha256=` + hex HMAC-SHA256, under the subscription's secret, of the
 * timestamp header's value, a ".", and the body's exact bytes, so a
 * captured request cannot be replayed later with a new timestamp.
 */
import { createHmac, randomBytes } from "node:crypto";
import dns from "node:dns";
import http from "node:http";
import https from "node:https";
import { type BlockList, isIP, type LookupFunction } from "node:net";
import { DEFAULT_WEBHOOK_DENY, denied, webhookDenyList } from "./address-deny.js";

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

/** An idle pooled connection is closed after this long. */
const IDLE_SOCKET_MS = 30_000;

/** The error code of a connection refused by the deny list. */
const DENIED = "ERR_WEBHOOK_ADDRESS_DENIED";

/** dns.lookup without the addresses `deny` holds; fails (DENIED) when none is left. */
function guardedLookup(deny: BlockList): LookupFunction {
  return (hostname, options, callback) => {
    dns.lookup(hostname, { ...options, all: true }, (err, addresses) => {
      if (err) return callback(err, "", 0);
      const allowed = addresses.filter((a) => !denied(deny, a.address));
      if (allowed.length === 0) {
        const refused = Object.assign(new Error(`${hostname} resolves only to denied addresses (${addresses.map((a) => a.address).join(", ")})`), { code: DENIED });
        return callback(refused, "", 0);
      }
      if (options.all) (callback as unknown as (e: null, a: dns.LookupAddress[]) => void)(null, allowed);
      else callback(null, allowed[0].address, allowed[0].family);
    });
  };
}

/**
 * What webhooks go through: keep-alive connection pools, one per protocol
 * and shared by every destination (node:http rather than fetch: a fraction
 * of the CPU per request, which is what bounds a worker sending thousands a
 * second), and the addresses they may not reach (`subscription-webhook-deny`:
 * a user's webhook must not make the coordinator a way into the networks it
 * sits on). The deny list is checked on the addresses a name resolves to as
 * the connection is made, so a name that later resolves elsewhere gains nothing.
 */
export class WebhookClient {
  readonly agents: { "http:": http.Agent; "https:": https.Agent };

  constructor(readonly deny: BlockList = webhookDenyList(DEFAULT_WEBHOOK_DENY)) {
    const lookup = guardedLookup(deny);
    // As many idle connections kept as open ones: a burst to one endpoint
    // that ends must not close and reopen connections (a handshake each, on
    // both ends) at its next burst. Idle ones close after IDLE_SOCKET_MS.
    const options = { keepAlive: true, maxSockets: 128, maxFreeSockets: 128, timeout: IDLE_SOCKET_MS, lookup };
    this.agents = {
      "http:": new http.Agent(options as http.AgentOptions),
      "https:": new https.Agent(options as https.AgentOptions),
    };
  }

  /** Closes the pools' idle connections. */
  close(): void {
    this.agents["http:"].destroy();
    this.agents["https:"].destroy();
  }
}

/** POSTs a signed body; never throws. */
export function postWebhook(
  url: string,
  secret: string,
  body: string,
  h: WebhookHeaders,
  options: { timeoutMs: number; now: () => number; client: WebhookClient },
): Promise<PostOutcome> {
  const timestamp = Math.floor(options.now() / 1000).toString();
  const target = new URL(url);
  const protocol = target.protocol === "https:" ? "https:" : "http:";
  const payload = Buffer.from(body, "utf8");
  // An address in the URL is not looked up: checked here.
  const literal = target.hostname.replace(/^\[(.*)\]$/, "$1");
  if (isIP(literal) !== 0 && denied(options.client.deny, literal)) {
    return Promise.resolve({ code: 0, error: `the endpoint's address ${literal} is denied (subscription-webhook-deny)`, retryable: false });
  }
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
        agent: options.client.agents[protocol],
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
    req.on("error", (err: NodeJS.ErrnoException) =>
      err.code === DENIED
        ? done({ code: 0, error: `the endpoint's address is denied (subscription-webhook-deny): ${err.message}`.slice(0, 300), retryable: false })
        : done({ code: 0, error: `cannot reach the endpoint: ${err.code ?? err.message}`.slice(0, 300), retryable: true }),
    );
    req.end(payload);
  });
}
