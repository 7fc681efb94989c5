/**
 * The delivery worker (docs/events.md, "How deliveries are made"): matches
 * feed events against subscriptions and sends the deliveries, on one
 * replica at a time.
 *
 * Leadership: a session advisory lock held on a connection of its own. The
 * replica that gets it leads until it stops or that connection fails (its
 * keepalive query fails); the database frees the lock when the holder's
 * session ends, also when its process dies, and another replica's next try
 * (every subscription-leader-poll-ms) takes over.
 *
 * Matching: the worker follows the feed (FeedReader) from the cursor stored
 * in the database and, for each read, queues one delivery per (event,
 * destination of a subscription that takes it, filter.ts) in the same
 * transaction that moves the cursor past
 * the read; that update is conditional on the cursor being where this
 * leader left it, so a replica that lost the lead cannot queue anything.
 * A restart resumes from the cursor: no event is matched twice or missed.
 *
 * Sending: due deliveries are claimed through the lock's own connection
 * (their next attempt is pushed past the request's deadline, so a replica
 * whose lock session died claims nothing), sent, and their outcome recorded.
 * An endpoint that acknowledged a request whose outcome was not recorded
 * (the leader died in between) receives it again, with the same delivery id:
 * delivery is at least once.
 */
import type { FeedEvent } from "../db/queries/feed.js";
import {
  type ActiveSubscription,
  type Delivered,
  type DueDelivery,
  type NewDelivery,
  activeSubscriptions,
  advanceSubscriptionCursor,
  digestDue,
  dueDeliveries,
  jobImages,
  nextDue,
  pendingOfDestination,
  queueDeliveries,
  readSubscriptionCursor,
  recordAttempt,
  recordDelivered,
  subscriptionsVersion,
} from "../db/queries/subscriptions.js";
import type { CoordinatorContext } from "../context.js";
import type { FeedReader } from "../feed/reader.js";
import { Notifier } from "../../lib/async/notifier.js";
import { SessionLock } from "../db/session-lock.js";
import { uuidv7 } from "../shared/common.js";
import type { Mailer } from "./email.js";
import { subscriptionTakes } from "./filter.js";
import { webhookDenyList } from "./address-deny.js";
import { postWebhook, WebhookClient } from "./webhook.js";

/** The worker's advisory lock key ("tmsubs" in ASCII). */
export const WORKER_LOCK = 0x746d73756273n;
/** Requests in flight at once. */
const MAX_IN_FLIGHT = 128;
/** Events of one email digest, at most. */
const DIGEST_MAX = 200;
/** An idle sender looks for due deliveries at least this often. */
const IDLE_POLL_MS = 5000;

/** The summary line of a request, for the delivery log. */
export function requestSummary(m: { dest_kind: string; url: string | null; email_to: string[] | null; email_mode: string | null }, body: string): string {
  if (m.dest_kind === "webhook") return `POST ${m.url} ${Buffer.byteLength(body)} bytes`;
  return `email to ${(m.email_to ?? []).join(", ")}${m.email_mode === "digest" ? " (digest)" : ""}`;
}

/**
 * The delay before attempt `n + 1` after `n` failed ones: exponential from
 * `initialMs`, capped at `maxMs`, with "equal jitter" (uniform in the upper
 * half) so that endpoints failing together are not retried in lockstep.
 */
export function retryDelay(n: number, initialMs: number, maxMs: number, random = Math.random): number {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(n - 1, 40));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

class LostLead extends Error {}

export class DeliveryWorker {
  private readonly log;
  private readonly sendable = new Notifier();
  private readonly idle = new Notifier();
  private readonly webhooks: WebhookClient;
  private controller: AbortController | undefined;
  private running: Promise<void> | undefined;
  private lead = false;
  /** Deliveries the matcher queued already claimed, for the sender (this lead only). */
  private fresh: DueDelivery[] = [];

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly reader: FeedReader,
    private readonly mailer: Mailer | undefined,
  ) {
    this.log = ctx.logger.child({ subsystem: "deliveries" });
    this.webhooks = new WebhookClient(webhookDenyList(ctx.config.subscriptionWebhookDeny));
  }

  /** How long a claimed delivery is this leader's to send: past any request's deadline. */
  private claimMs(): number {
    return this.ctx.config.subscriptionWebhookTimeoutMs * 2 + 1000;
  }

  /** Whether this replica runs the worker now. */
  get leading(): boolean {
    return this.lead;
  }

  start(): void {
    this.controller = new AbortController();
    this.running = this.run(this.controller.signal);
  }

  /** Idempotent: resolves when the worker has let go of the lead. */
  async stop(): Promise<void> {
    this.controller?.abort();
    await this.running;
    this.webhooks.close();
  }

  /** Deliveries may be due (queued by another replica, a redelivery): look now. */
  wake(): void {
    this.sendable.notify();
  }

  private async run(signal: AbortSignal): Promise<void> {
    const { config } = this.ctx;
    const lock = new SessionLock({ url: this.ctx.databaseUrl, key: WORKER_LOCK, applicationName: "treadmill-coordinator-deliveries" });
    try {
      while (!signal.aborted) {
        try {
          if (!this.ctx.notifications.connected) throw new Error("database unreachable");
          const held = await lock.tryLock();
          if (held) await this.leadWith(lock, held, signal);
        } catch (err) {
          if (!signal.aborted) this.log.warn({ err }, "delivery worker interrupted; trying again");
        }
        await this.idle.wait({ timeoutMs: config.subscriptionLeaderPollMs, signal });
      }
    } finally {
      await lock.close();
    }
  }

  /** Leads until `signal` aborts or the lock is lost (`held` aborts). */
  private async leadWith(lock: SessionLock, held: AbortSignal, signal: AbortSignal): Promise<void> {
    const lead = new AbortController();
    const onAbort = () => lead.abort();
    signal.addEventListener("abort", onAbort, { once: true });
    held.addEventListener("abort", onAbort, { once: true });
    this.lead = true;
    this.fresh = [];
    this.log.info({ replicaId: this.ctx.replicaId }, "delivery worker leading");
    const fail = (err: unknown) => {
      if (!lead.signal.aborted) this.log.warn({ err }, "delivery worker lost its lead");
      lead.abort();
    };
    try {
      await Promise.all([this.keepalive(lock, lead.signal).catch(fail), this.match(lead.signal).catch(fail), this.send(lock, lead.signal).catch(fail)]);
      if (held.aborted && !signal.aborted) this.log.warn({ err: held.reason }, "delivery worker lost its lead");
    } finally {
      this.lead = false;
      signal.removeEventListener("abort", onAbort);
      held.removeEventListener("abort", onAbort);
      await lock.unlock();
    }
  }

  /** Proves the lock's session alive; rejects when it is not. */
  private async keepalive(lock: SessionLock, signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      await this.idle.wait({ timeoutMs: this.ctx.config.subscriptionLeaderPollMs, signal });
      if (signal.aborted) return;
      const [{ held }] = await lock.run(
        (session) => session<{ held: boolean }[]>`
        select exists (select 1 from pg_locks where locktype = 'advisory' and pid = pg_backend_pid() and granted
          and ((classid::bigint << 32) | objid::bigint) = ${WORKER_LOCK.toString()}::bigint) as held`,
      );
      if (!held) throw new LostLead("the worker's advisory lock is no longer held");
    }
  }

  /** Follows the feed from the stored cursor and queues the deliveries of each read. */
  private async match(signal: AbortSignal): Promise<void> {
    const { sql } = this.ctx;
    let cursor = await readSubscriptionCursor(sql);
    let version: bigint | undefined;
    let subs: ActiveSubscription[] = [];
    for await (const read of this.reader.follow(cursor, { viewer: { kind: "system" }, signal, batch: 1000 })) {
      if (read.cursor === cursor) continue;
      let rows: NewDelivery[] = [];
      let fresh: DueDelivery[] = [];
      if (read.events.length > 0) {
        const now = await subscriptionsVersion(sql);
        if (now !== version) {
          subs = await activeSubscriptions(sql);
          version = now;
        }
        ({ rows, fresh } = await this.deliveriesOf(read.events, subs, new Date(this.ctx.clock())));
      }
      const from = cursor;
      const to = read.cursor;
      const at = new Date(this.ctx.clock());
      const moved = await sql.begin(async (tx) => {
        if (!(await advanceSubscriptionCursor(tx, from, to, at))) return false;
        await queueDeliveries(tx, rows, at);
        return true;
      });
      if (!moved) throw new LostLead("another replica moved the delivery cursor");
      cursor = to;
      this.fresh.push(...fresh);
      if (rows.length > 0) this.sendable.notify();
    }
  }

  /**
   * One delivery per (event, destination of a subscription that takes it),
   * in feed order; those due now are queued already claimed by this leader
   * and handed to the sender in memory (`fresh`), sparing it a read and a
   * claim per delivery.
   */
  private async deliveriesOf(events: FeedEvent[], subs: ActiveSubscription[], now: Date): Promise<{ rows: NewDelivery[]; fresh: DueDelivery[] }> {
    const claimUntil = new Date(now.getTime() + this.claimMs());
    const fresh: DueDelivery[] = [];
    const wantImages = subs.some((s) => s.filter.images.length > 0);
    const images = wantImages ? await jobImages(this.ctx.sql, [...new Set(events.flatMap((e) => (e.jobId ? [e.jobId] : [])))]) : new Map<string, string>();
    const digests = new Map<string, Date>();
    const rows: NewDelivery[] = [];
    for (const e of events) {
      let body: string | undefined;
      for (const s of subs) {
        if (e.at < s.created_at || !subscriptionTakes(s, e, e.jobId ? images.get(e.jobId) : undefined)) continue;
        body ??= JSON.stringify(e.payload);
        for (const d of s.destinations) {
          let due = now;
          if (d.kind === "email" && d.email_mode === "digest") {
            let at = digests.get(d.id);
            if (at === undefined) {
              at = await digestDue(this.ctx.sql, d.id, now, Number(d.digest_window_ms ?? this.ctx.config.subscriptionDigestWindowMs));
              digests.set(d.id, at);
            }
            due = at;
          }
          const id = uuidv7(now.getTime());
          const eventId = e.cursor.toString();
          if (due === now) {
            due = claimUntil;
            fresh.push({
              id,
              subscription_id: s.id,
              destination_id: d.id,
              event_id: eventId,
              event_kind: e.kind,
              body,
              attempt_count: 0,
              created_at: now,
              next_attempt_at: claimUntil,
              dest_kind: d.kind,
              url: d.url,
              email_to: d.email_to,
              email_mode: d.email_mode,
              secret: s.secret,
              subscription_name: s.name,
            });
          }
          rows.push({
            id,
            subscriptionId: s.id,
            destinationId: d.id,
            eventId,
            eventKind: e.kind,
            body,
            summary: requestSummary({ dest_kind: d.kind, url: d.url, email_to: d.email_to, email_mode: d.email_mode }, body),
            due,
          });
        }
      }
    }
    return { rows, fresh };
  }

  /**
   * Claims due deliveries through the lock's connection (one statement per
   * round) and sends them, MAX_IN_FLIGHT at once; the successes of a round
   * are recorded together (one statement), failures one by one (each may
   * disable its subscription).
   */
  private async send(lock: SessionLock, signal: AbortSignal): Promise<void> {
    const { sql } = this.ctx;
    const busy = new Set<string>();
    const inFlight = new Set<Promise<void>>();
    let delivered: Delivered[] = [];
    const flush = async () => {
      if (delivered.length === 0) return;
      const batch = delivered;
      delivered = [];
      await recordDelivered(sql, batch);
      for (const d of batch) busy.delete(d.id);
    };
    try {
      while (!signal.aborted) {
        await flush();
        const now = new Date(this.ctx.clock());
        const handed = this.fresh.splice(0, Math.max(0, MAX_IN_FLIGHT - busy.size));
        const room = MAX_IN_FLIGHT - busy.size - handed.length;
        const due = room <= 0 || this.fresh.length > 0 ? [] : await dueDeliveries(sql, now, room, [...busy, ...handed.map((d) => d.id)]);
        const groups = await this.groups(due, busy);
        const ids = groups.flat().map((d) => d.id);
        // The claim: a replica whose lock session died fails here.
        const claimUntil = new Date(now.getTime() + this.claimMs());
        const claimed =
          ids.length === 0
            ? []
            : await lock.run(
                (session) => session<{ id: string }[]>`
                  update subscription_deliveries set next_attempt_at = ${claimUntil}
                  where id = any(${ids}::uuid[]) and state = 'pending' returning id`,
              );
        const mine = new Set([...claimed.map((c) => c.id), ...handed.map((d) => d.id)]);
        for (const group of [...handed.map((d) => [d]), ...groups]) {
          const sending = group.filter((d) => mine.has(d.id));
          if (sending.length === 0) continue;
          for (const d of sending) busy.add(d.id);
          const p = this.attempt(sending)
            .then((ok) => {
              if (ok) delivered.push(...ok);
              else for (const d of sending) busy.delete(d.id);
            })
            .catch((err) => {
              for (const d of sending) busy.delete(d.id);
              this.log.warn({ err, deliveryIds: sending.map((d) => d.id) }, "cannot record a delivery attempt");
            })
            .finally(() => {
              inFlight.delete(p);
              this.sendable.notify();
            });
          inFlight.add(p);
        }
        // Go on at once only with room for more (else the next finished request wakes the loop).
        const roomLeft = busy.size < MAX_IN_FLIGHT;
        if (delivered.length > 0 || (roomLeft && ((due.length > 0 && due.length === room) || this.fresh.length > 0))) continue;
        let waitMs = IDLE_POLL_MS;
        if (due.length === 0) {
          const next = await nextDue(sql);
          if (next !== undefined) waitMs = Math.min(IDLE_POLL_MS, Math.max(1, next.getTime() - this.ctx.clock()));
        }
        await this.sendable.wait({ timeoutMs: waitMs, signal });
      }
    } finally {
      await Promise.allSettled([...inFlight]);
      await flush().catch((err: unknown) => this.log.warn({ err }, "cannot record delivered deliveries"));
    }
  }

  /** Due deliveries as requests: one each, but one per email digest with every pending event of its destination. */
  private async groups(due: DueDelivery[], busy: ReadonlySet<string>): Promise<DueDelivery[][]> {
    const out: DueDelivery[][] = [];
    const digests = new Set<string>();
    for (const d of due) {
      if (d.dest_kind !== "email" || d.email_mode !== "digest") {
        out.push([d]);
        continue;
      }
      if (digests.has(d.destination_id)) continue;
      digests.add(d.destination_id);
      const pending = await pendingOfDestination(this.ctx.sql, d.destination_id, DIGEST_MAX);
      out.push(pending.filter((p) => !busy.has(p.id)).map((p) => ({ ...d, id: p.id, event_id: p.event_id, event_kind: p.event_kind, body: p.body })));
    }
    return out;
  }

  /**
   * Sends one request (a webhook POST, an email) for `group`. A success is
   * returned for the caller to record with others; a failure is recorded
   * here (undefined).
   */
  private async attempt(group: DueDelivery[]): Promise<Delivered[] | undefined> {
    const { config } = this.ctx;
    const first = group[0];
    const started = this.ctx.clock();
    let code = 0;
    let error = "";
    let retryable = true;
    if (first.dest_kind === "webhook") {
      const out = await postWebhook(
        first.url!,
        first.secret,
        first.body,
        { deliveryId: first.id, eventId: first.event_id, eventKind: first.event_kind, subscriptionId: first.subscription_id },
        { timeoutMs: config.subscriptionWebhookTimeoutMs, now: this.ctx.clock, client: this.webhooks },
      );
      ({ code, error, retryable } = out);
      if (code >= 400 && !retryable) {
        this.log.warn({ subscriptionId: first.subscription_id, deliveryId: first.id, code }, "webhook endpoint refused a delivery; not retried");
      }
    } else if (!this.mailer) {
      error = "no smtp server is configured (smtp-url)";
    } else {
      try {
        await this.mailer.send(
          first.email_to ?? [],
          { id: first.subscription_id, name: first.subscription_name },
          group.map((d) => d.id),
          group.map((d) => ({ eventId: d.event_id, kind: d.event_kind, body: d.body })),
        );
      } catch (err) {
        const e = err as { responseCode?: number; message?: string };
        error = `smtp: ${e.message ?? String(err)}`.slice(0, 300);
        // A permanent SMTP refusal (5xx) is not retried.
        retryable = !(typeof e.responseCode === "number" && e.responseCode >= 500);
      }
    }
    const at = new Date(this.ctx.clock());
    if (error === "") return group.map((d) => ({ id: d.id, destinationId: d.destination_id, at, ms: at.getTime() - started, code }));
    let result: { state: "retry"; retryAt: Date } | { state: "failed" };
    if (!retryable) result = { state: "failed" };
    else {
      const retryAt = at.getTime() + retryDelay(first.attempt_count + 1, config.subscriptionRetryInitialMs, config.subscriptionRetryMaxMs);
      if (retryAt - first.created_at.getTime() > config.subscriptionRetryWindowMs) {
        result = { state: "failed" };
        error = `${error}; given up after ${first.attempt_count + 1} attempts`;
      } else result = { state: "retry", retryAt: new Date(retryAt) };
    }
    const target = first.dest_kind === "webhook" ? `webhook ${first.url}` : `email to ${(first.email_to ?? []).join(", ")}`;
    const disabled = await recordAttempt(
      this.ctx.sql,
      {
        ids: group.map((d) => d.id),
        destinationId: first.destination_id,
        subscriptionId: first.subscription_id,
        at,
        ms: at.getTime() - started,
        code,
        error,
        result,
      },
      new Date(at.getTime() - config.subscriptionDisableAfterMs),
      `${target} has failed for ${Math.round(config.subscriptionDisableAfterMs / 1000)} s without a success (last error: ${error})`,
    );
    if (disabled) this.log.warn({ subscriptionId: first.subscription_id }, "subscription disabled: its destination kept failing");
    return undefined;
  }
}
