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
 * in the database and, for each read, makes one delivery per (event,
 * destination of a subscription that takes it, filter.ts). Those due now
 * go to the sender at once, before anything is written: the webhook's
 * latency is the feed's and the request's, not a transaction's.
 *
 * Writing: the committer writes each read's deliveries in the transaction
 * that moves the stored cursor past the read, in feed order, once the
 * read's sends are settled (or after COMMIT_WAIT_MS): a delivery
 * acknowledged by then is written delivered (one row write, no update),
 * the others pending and claimed by this leader until their outcome is
 * recorded. The cursor's update is conditional on the cursor being where
 * this leader left it, so a replica that lost the lead writes nothing. A
 * new leader resumes from the cursor: no event is missed, and one is
 * matched again only when the leader before died before writing it.
 *
 * Sending: also due deliveries of the table (retries, digests,
 * redeliveries), claimed through the lock's own connection (their next
 * attempt is pushed past the request's deadline, so a replica whose lock
 * session died claims nothing), sent, and their outcome recorded.
 *
 * Delivery is at least once: an endpoint that acknowledged a request
 * whose outcome was not written (the leader died in between, or before it
 * wrote the read) receives it again, with the same delivery id (deliveryId).
 */
import type { FeedCursor, FeedEvent } from "../db/queries/feed.js";
import {
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
import { createHash } from "node:crypto";
import { uuidv7 } from "../shared/common.js";
import type { Mailer } from "./email.js";
import { SubscriptionIndex } from "./filter.js";
import { webhookDenyList } from "./address-deny.js";
import { postWebhook, WebhookClient } from "./webhook.js";

/** The worker's advisory lock key ("tmsubs" in ASCII). */
export const WORKER_LOCK = 0x746d73756273n;
/** Requests in flight at once. */
const MAX_IN_FLIGHT = 256;
/** Events of one email digest, at most. */
const DIGEST_MAX = 200;
/** An idle sender looks for due deliveries at least this often. */
const IDLE_POLL_MS = 5000;
/**
 * How long the committer waits for a read's sends before it writes the read
 * with some of them pending (each then written twice): long enough for a
 * sender behind by seconds, short enough that a new leader sends little again.
 */
const COMMIT_WAIT_MS = 3000;
/** Reads matched but not written, and deliveries matched but not sent, at most: the matcher waits beyond. */
const MAX_UNCOMMITTED = 64;
const MAX_UNSENT = 20_000;

/**
 * The id of the delivery of feed event `eventId` to `destinationId`: a
 * UUIDv7 of the event's time whose other bits hash the pair, so a leader that
 * matches an event again (its predecessor died before writing it) sends
 * with the same X-Treadmill-Delivery-Id, and the endpoint can tell a repeat.
 */
export function deliveryId(eventId: string, destinationId: string, atMs: number): string {
  return uuidv7(atMs, createHash("sha256").update(`${eventId}/${destinationId}`).digest());
}

/** A read of the feed whose deliveries and cursor move the committer has not written yet. */
class MatchedRead {
  readonly matchedAt = performance.now();
  /** Ids of its deliveries being sent. */
  readonly sending: Set<string>;
  /** Its deliveries acknowledged before it was sealed. */
  readonly delivered = new Map<string, Delivered>();
  /** The committer is writing it: outcomes from now on are recorded once it is written. */
  sealed = false;
  /** Settles when it is written (or rejects when the lead ends first). */
  readonly written: { promise: Promise<void>; resolve: () => void; reject: (err: Error) => void };

  constructor(
    readonly from: FeedCursor,
    readonly to: FeedCursor,
    readonly rows: NewDelivery[],
    fresh: DueDelivery[],
  ) {
    this.sending = new Set(fresh.map((d) => d.id));
    let resolve!: () => void;
    let reject!: (err: Error) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => undefined); // awaited only by sends that settle late
    this.written = { promise, resolve, reject };
  }
}

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
  /** Counts the sender's wake-ups, so that one while it was busy is not lost. */
  private sendWakes = 0;
  private readonly idle = new Notifier();
  private readonly webhooks: WebhookClient;
  private controller: AbortController | undefined;
  private running: Promise<void> | undefined;
  private lead = false;
  /** Deliveries due as they were matched, for the sender (this lead only). */
  private fresh: DueDelivery[] = [];
  /** Reads matched whose deliveries and cursor move are not written yet, oldest first (this lead only). */
  private uncommitted: MatchedRead[] = [];
  /** The uncommitted read of each of its deliveries still being sent. */
  private readonly readOf = new Map<string, MatchedRead>();
  /** Wakes the committer: a send settled, a read was matched. */
  private readonly committable = new Notifier();
  /** Wakes the matcher: reads were committed. */
  private readonly committed = new Notifier();

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
    this.wakeSender();
  }

  private wakeSender(): void {
    this.sendWakes++;
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
    this.uncommitted = [];
    this.readOf.clear();
    this.log.info({ replicaId: this.ctx.replicaId }, "delivery worker leading");
    const fail = (err: unknown) => {
      if (!lead.signal.aborted) this.log.warn({ err }, "delivery worker lost its lead");
      lead.abort();
    };
    try {
      await Promise.all([
        this.keepalive(lock, lead.signal).catch(fail),
        this.match(lead.signal).catch(fail),
        this.commit(lead.signal).catch(fail),
        this.send(lock, lead.signal).catch(fail),
      ]);
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

  /**
   * Follows the feed from the stored cursor: hands each read's due
   * deliveries to the sender at once and the read to the committer, which
   * writes them with the cursor's move. At most MAX_UNCOMMITTED reads and
   * MAX_UNSENT deliveries wait.
   */
  private async match(signal: AbortSignal): Promise<void> {
    const { sql } = this.ctx;
    const cursor = await readSubscriptionCursor(sql);
    let version: bigint | undefined;
    let subs = new SubscriptionIndex([]);
    let from = cursor;
    for await (const read of this.reader.follow(cursor, { viewer: { kind: "system" }, signal, batch: 1000 })) {
      if (read.cursor === from) continue;
      let rows: NewDelivery[] = [];
      let fresh: DueDelivery[] = [];
      if (read.events.length > 0) {
        const now = await subscriptionsVersion(sql);
        if (now !== version) {
          subs = new SubscriptionIndex(await activeSubscriptions(sql));
          version = now;
        }
        ({ rows, fresh } = await this.deliveriesOf(read.events, subs, new Date(this.ctx.clock())));
      }
      const matched = new MatchedRead(from, read.cursor, rows, fresh);
      from = read.cursor;
      for (const d of fresh) this.readOf.set(d.id, matched);
      this.uncommitted.push(matched);
      this.committable.notify();
      if (fresh.length > 0) {
        this.fresh.push(...fresh);
        this.wakeSender();
      }
      // Memory stays bounded through a burst (the sender drains `fresh` without a notice to the matcher: polled).
      while ((this.uncommitted.length >= MAX_UNCOMMITTED || this.fresh.length >= MAX_UNSENT) && !signal.aborted) {
        await this.committed.wait({ signal, timeoutMs: 100 });
      }
    }
  }

  /**
   * Writes matched reads in feed order: each once its sends are settled or
   * COMMIT_WAIT_MS after it was matched, with every read after it that is
   * ready too, in one transaction that moves the cursor (conditionally:
   * a replica that lost the lead writes nothing). Deliveries acknowledged by
   * then are written delivered; the others pending, claimed by this leader
   * until their sends settle (recordDelivered, recordAttempt). When the lead
   * ends, reads not written are dropped: the next leader matches them again.
   */
  private async commit(signal: AbortSignal): Promise<void> {
    const { sql } = this.ctx;
    try {
      while (!signal.aborted) {
        const head = this.uncommitted[0];
        const waitMs = head ? head.matchedAt + COMMIT_WAIT_MS - performance.now() : IDLE_POLL_MS;
        if (!head || (head.sending.size > 0 && waitMs > 0)) {
          await this.committable.wait({ timeoutMs: waitMs, signal });
          continue;
        }
        // With it, every read after it that is settled or past its wait too.
        const ready = (r: MatchedRead) => r.sending.size === 0 || r.matchedAt + COMMIT_WAIT_MS <= performance.now();
        let n = 1;
        while (n < this.uncommitted.length && ready(this.uncommitted[n])) n++;
        const reads = this.uncommitted.slice(0, n);
        for (const r of reads) r.sealed = true;
        const rows = reads.flatMap((r) => r.rows.map((row) => (r.delivered.has(row.id) ? { ...row, delivered: r.delivered.get(row.id) } : row)));
        const at = new Date(this.ctx.clock());
        const moved = await sql.begin(async (tx) => {
          if (!(await advanceSubscriptionCursor(tx, reads[0].from, reads[n - 1].to, at))) return false;
          await queueDeliveries(tx, rows, at);
          return true;
        });
        if (!moved) throw new LostLead("another replica moved the delivery cursor");
        this.uncommitted.splice(0, n);
        for (const r of reads) r.written.resolve();
        this.committed.notify();
      }
    } finally {
      const dropped = this.uncommitted.splice(0);
      for (const r of dropped) r.written.reject(new LostLead("the lead ended before this read's deliveries were written"));
      this.committed.notify();
    }
  }

  /**
   * One delivery per (event, destination of a subscription that takes it),
   * in feed order, its id derived from both (deliveryId); those due now are
   * for the sender at once (`fresh`), and written claimed by this leader.
   */
  private async deliveriesOf(events: FeedEvent[], subs: SubscriptionIndex, now: Date): Promise<{ rows: NewDelivery[]; fresh: DueDelivery[] }> {
    const claimUntil = new Date(now.getTime() + this.claimMs());
    const fresh: DueDelivery[] = [];
    const wantImages = subs.subscriptions.some((s) => s.filter.images.length > 0);
    const images = wantImages ? await jobImages(this.ctx.sql, [...new Set(events.flatMap((e) => (e.jobId ? [e.jobId] : [])))]) : new Map<string, string>();
    const digests = new Map<string, Date>();
    const rows: NewDelivery[] = [];
    for (const e of events) {
      let body: string | undefined;
      for (const s of subs.matching(e, e.jobId ? images.get(e.jobId) : undefined)) {
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
          const eventId = e.cursor.toString();
          const id = deliveryId(eventId, d.id, e.at.getTime());
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
            createdAt: now,
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
        const wakes = this.sendWakes;
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
            .then(async (ok) => {
              if (!ok) {
                for (const d of sending) busy.delete(d.id);
                return;
              }
              for (const d of ok) {
                // A delivery of a read not yet written: written delivered, or recorded once written.
                const read = await this.settle(d.id, (r) => r.delivered.set(d.id, d));
                if (read === "in-read") busy.delete(d.id);
                else delivered.push(d);
              }
            })
            .catch((err) => {
              for (const d of sending) busy.delete(d.id);
              this.log.warn({ err, deliveryIds: sending.map((d) => d.id) }, "cannot record a delivery attempt");
            })
            .finally(() => {
              inFlight.delete(p);
              this.wakeSender();
            });
          inFlight.add(p);
        }
        // Go on at once only with room for more (else the next finished request wakes the loop).
        const roomLeft = busy.size < MAX_IN_FLIGHT;
        if (delivered.length > 0 || (roomLeft && ((due.length > 0 && due.length === room) || this.fresh.length > 0))) continue;
        let waitMs = IDLE_POLL_MS;
        if (due.length === 0 && roomLeft) {
          const next = await nextDue(sql);
          if (next !== undefined) waitMs = Math.min(IDLE_POLL_MS, Math.max(1, next.getTime() - this.ctx.clock()));
        }
        // A request settled or deliveries came while this round awaited: another round.
        if (this.sendWakes !== wakes) continue;
        await this.sendable.wait({ timeoutMs: waitMs, signal });
      }
    } finally {
      await Promise.allSettled([...inFlight]);
      await flush().catch((err: unknown) => this.log.warn({ err }, "cannot record delivered deliveries"));
    }
  }

  /**
   * Says the send of delivery `id` settled. When its read is not written
   * yet: before the committer sealed it, `unsealed` records the outcome in
   * the read ("in-read"); after, this waits until the read is written
   * (rejects if the lead ends first), and the caller records it in the table.
   */
  private async settle(id: string, unsealed?: (read: MatchedRead) => void): Promise<"in-read" | "table"> {
    const read = this.readOf.get(id);
    if (!read) return "table";
    this.readOf.delete(id);
    read.sending.delete(id);
    this.committable.notify();
    if (!read.sealed && unsealed) {
      unsealed(read);
      return "in-read";
    }
    await read.written.promise;
    return "table";
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
    // A failure is recorded on the row: once its read is written.
    for (const d of group) await this.settle(d.id);
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
