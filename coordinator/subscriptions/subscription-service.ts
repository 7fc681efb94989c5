/**
 * SubscriptionService: subscriptions, their delivery log, tests and
 * redeliveries (docs/events.md, "Subscriptions"). Validates every field
 * (the message names it); the secret is returned by Create and by a
 * rotation only. A caller sees their own subscriptions and their groups';
 * anything else is NOT_FOUND, as if it did not exist.
 */
import { create } from "@bufbuild/protobuf";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  type CreateSubscriptionRequest,
  type CreateSubscriptionResponse,
  CreateSubscriptionResponseSchema,
  type DeleteSubscriptionRequest,
  type DeleteSubscriptionResponse,
  DeleteSubscriptionResponseSchema,
  type Delivery,
  DeliverySchema,
  DeliveryState,
  type Destination,
  DestinationSchema,
  EmailMode,
  type GetSubscriptionRequest,
  type GetSubscriptionResponse,
  GetSubscriptionResponseSchema,
  type ListDeliveriesRequest,
  type ListDeliveriesResponse,
  ListDeliveriesResponseSchema,
  type ListSubscriptionsResponse,
  ListSubscriptionsResponseSchema,
  type RedeliverRequest,
  type RedeliverResponse,
  RedeliverResponseSchema,
  type Subscription,
  type SubscriptionFilter,
  SubscriptionSchema,
  type SubscriptionService,
  type TestSubscriptionRequest,
  type TestSubscriptionResponse,
  TestSubscriptionResponseSchema,
  type UpdateSubscriptionRequest,
  type UpdateSubscriptionResponse,
  UpdateSubscriptionResponseSchema,
} from "../../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { type UserCaller, requireUser } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import { EVENT_SCHEMA, FEED_KINDS } from "../db/queries/feed.js";
import {
  type DeliveryRow,
  type DestinationRow,
  type NewDelivery,
  type StoredFilter,
  type SubscriptionRow,
  deleteSubscription,
  getDelivery,
  getDeliveryForRedelivery,
  getSubscription,
  insertSubscription,
  listDeliveries,
  listSubscriptions,
  queueDeliveries,
  setSubscriptionEnabled,
  setSubscriptionSecret,
} from "../db/queries/subscriptions.js";
import {
  checkId,
  checkPattern,
  checkTags,
  checkText,
  clip,
  decodePageToken,
  denied,
  durationMs,
  durationOf,
  encodePageToken,
  invalid,
  notFound,
  precondition,
  ts,
  USER_NAME,
  uuidv7,
} from "../shared/common.js";
import { requestSummary } from "./worker.js";
import { newWebhookSecret } from "./webhook.js";

const MAX_DESTINATIONS = 10;
const MAX_RECIPIENTS = 10;
const MAX_LIST = 50;
const JOB_STATES = ["queued", "assigned", "initializing", "running", "terminating", "finalized"];
const LEASE_STATES = ["requested", "waiting", "active", "ended"];
const OUTCOMES = [
  "success",
  "failure",
  "canceled",
  "job_timeout",
  "queue_timeout",
  "host_dropped",
  "image_error",
  "host_start_failure",
  "internal_error",
];
const IMAGE = /^[a-z0-9]+([._/-][a-z0-9]+)*(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?$/;
// Deliberately simple: one @, no spaces or angle brackets; the SMTP server judges the rest.
const EMAIL = /^[^\s@<>(),;:"]{1,64}@[A-Za-z0-9.-]{1,253}$/;

/** One list of words, each among `allowed`. */
function checkWords(field: string, values: readonly string[], allowed: readonly string[]): string[] {
  if (values.length > 32) throw invalid(`${field} must have at most 32 entries`);
  for (const v of values) if (!allowed.includes(v)) throw invalid(`${field}: unknown value "${clip(v)}" (one of ${allowed.join(", ")})`);
  return [...new Set(values)];
}

function filterOf(caller: UserCaller, f: SubscriptionFilter | undefined): StoredFilter {
  const admin = caller.role === "admin";
  const kinds = checkWords("filter.kinds", f?.kinds ?? [], FEED_KINDS);
  if (kinds.includes("host.health") && !admin) throw denied("filter.kinds: only admins may subscribe to host.health");
  const images = [...new Set(f?.images ?? [])];
  if (images.length > 32) throw invalid("filter.images must have at most 32 entries");
  for (const i of images) if (i.length > 256 || !IMAGE.test(i)) throw invalid(`filter.images: "${clip(i)}" is not an image name or name:tag`);
  const owners = [...new Set(f?.ownerUserIds ?? [])];
  if (owners.length > 100) throw invalid("filter.owner_user_ids must have at most 100 entries");
  for (const o of owners) {
    checkId("filter.owner_user_ids", o);
    if (!admin && o !== caller.userId) throw denied("filter.owner_user_ids: only admins may subscribe to another user's events");
  }
  return {
    kinds,
    labels: checkTags("filter.labels", f?.labels ?? {}),
    images,
    owner_ids: owners,
    states: checkWords("filter.states", f?.states ?? [], [...JOB_STATES, ...LEASE_STATES.filter((s) => !JOB_STATES.includes(s))]),
    outcomes: checkWords("filter.outcomes", f?.outcomes ?? [], OUTCOMES),
    regressions_only: f?.regressionsOnly ?? false,
  };
}

function checkUrl(field: string, text: string): string {
  if (text === "") throw invalid(`${field} is required`);
  if (text.length > 2048) throw invalid(`${field} must be at most 2048 characters`);
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw invalid(`${field} is not an absolute url`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") throw invalid(`${field} must be an http:// or https:// url`);
  if (url.username !== "" || url.password !== "") throw invalid(`${field} must not carry credentials (the signature authenticates the sender)`);
  return url.toString();
}

function destinationsOf(ds: readonly Destination[], smtpConfigured: boolean, digestDefaultMs: number): Omit<DestinationRow, "subscription_id" | "failing_since">[] {
  if (ds.length === 0) throw invalid("destinations must have at least one entry (a webhook or an email)");
  if (ds.length > MAX_DESTINATIONS) throw invalid(`destinations must have at most ${MAX_DESTINATIONS} entries`);
  return ds.map((d, i) => {
    const field = `destinations[${i}]`;
    const id = uuidv7();
    if (d.target.case === "webhook") {
      return { id, kind: "webhook" as const, url: checkUrl(`${field}.webhook.url`, d.target.value.url), email_to: null, email_mode: null, digest_window_ms: null };
    }
    if (d.target.case === "email") {
      const e = d.target.value;
      if (!smtpConfigured) throw precondition(`${field}.email: this coordinator has no smtp server (smtp-url)`);
      if (e.to.length === 0 || e.to.length > MAX_RECIPIENTS) throw invalid(`${field}.email.to must have 1 to ${MAX_RECIPIENTS} addresses`);
      for (const a of e.to) if (!EMAIL.test(a)) throw invalid(`${field}.email.to: "${clip(a)}" is not an email address`);
      const digest = e.mode === EmailMode.DIGEST;
      const windowMs = durationMs(`${field}.email.digest_window`, e.digestWindow);
      if (windowMs !== undefined && !digest) throw invalid(`${field}.email.digest_window is only for EMAIL_MODE_DIGEST`);
      return {
        id,
        kind: "email" as const,
        url: null,
        email_to: [...new Set(e.to)],
        email_mode: digest ? ("digest" as const) : ("each" as const),
        digest_window_ms: digest ? String(windowMs ?? digestDefaultMs) : null,
      };
    }
    throw invalid(`${field} must be a webhook or an email`);
  });
}

export function subscriptionMessage(s: SubscriptionRow): Subscription {
  const failing = s.destinations.map((d) => d.failing_since).filter((d): d is Date => d !== null);
  return create(SubscriptionSchema, {
    id: s.id,
    name: s.name,
    ownerUserId: s.owner_id,
    groupName: s.group_name ?? "",
    enabled: s.enabled,
    filter: {
      kinds: s.filter.kinds,
      labels: s.filter.labels,
      images: s.filter.images,
      ownerUserIds: s.filter.owner_ids,
      states: s.filter.states,
      outcomes: s.filter.outcomes,
      regressionsOnly: s.filter.regressions_only,
    },
    destinations: s.destinations.map((d) =>
      create(DestinationSchema, {
        id: d.id,
        target:
          d.kind === "webhook"
            ? { case: "webhook", value: { url: d.url ?? "" } }
            : {
                case: "email",
                value: {
                  to: d.email_to ?? [],
                  mode: d.email_mode === "digest" ? EmailMode.DIGEST : EmailMode.EACH,
                  digestWindow: d.digest_window_ms === null ? undefined : durationOf(Number(d.digest_window_ms)),
                },
              },
      }),
    ),
    createTime: ts(s.created_at),
    disabledReason: s.disabled_reason,
    disableTime: ts(s.disabled_at),
    failingSince: ts(failing.length === 0 ? null : new Date(Math.min(...failing.map((d) => d.getTime())))),
  });
}

const STATES = { pending: DeliveryState.PENDING, delivered: DeliveryState.DELIVERED, failed: DeliveryState.FAILED } as const;

export function deliveryMessage(d: DeliveryRow): Delivery {
  return create(DeliverySchema, {
    id: d.id,
    subscriptionId: d.subscription_id,
    destinationId: d.destination_id,
    eventId: d.event_id,
    eventKind: d.event_kind,
    state: STATES[d.state],
    requestSummary: d.request_summary,
    attemptCount: d.attempt_count,
    createTime: ts(d.created_at),
    lastAttemptTime: ts(d.last_attempt_at),
    nextAttemptTime: d.state === "pending" ? ts(d.next_attempt_at) : undefined,
    responseCode: d.response_code,
    error: d.error,
    attempts: d.attempts.map((a) => ({ time: ts(new Date(a.at)), responseCode: a.code, error: a.error, duration: durationOf(a.ms) })),
    redeliveryOf: d.redelivery_of ?? "",
  });
}

export class SubscriptionServiceImpl implements ServiceImpl<typeof SubscriptionService> {
  constructor(private readonly ctx: CoordinatorContext) {}

  private now(): Date {
    return new Date(this.ctx.clock());
  }

  private async mine(caller: UserCaller, id: string, field = "id"): Promise<SubscriptionRow> {
    checkId(field, id);
    const s = await getSubscription(this.ctx.sql, id, caller.userId);
    if (!s) throw notFound(`subscription ${id} not found`);
    return s;
  }

  async createSubscription(req: CreateSubscriptionRequest, hctx: HandlerContext): Promise<CreateSubscriptionResponse> {
    const caller = requireUser(hctx);
    const { sql, config } = this.ctx;
    const name = checkText("name", req.name.trim(), 100);
    if (name === "") throw invalid("name is required");
    const filter = filterOf(caller, req.filter);
    const destinations = destinationsOf(req.destinations, config.smtpUrl !== "", config.subscriptionDigestWindowMs);
    let groupId: string | null = null;
    if (req.groupName !== "") {
      checkPattern("group_name", req.groupName, USER_NAME, "[a-z][a-z0-9._-]{0,63}");
      const [g] = await sql<{ id: string; member: boolean }[]>`
        select g.id, exists (select 1 from group_members m where m.group_id = g.id and m.user_id = ${caller.userId}::uuid) as member
        from groups g where g.name = ${req.groupName}`;
      if (!g) throw notFound(`group ${req.groupName} not found`);
      if (!g.member) throw denied(`group_name: you are not a member of group ${req.groupName}`);
      groupId = g.id;
    }
    const id = uuidv7(this.ctx.clock());
    const secret = newWebhookSecret();
    const ok = await insertSubscription(
      sql,
      { id, name, ownerId: caller.userId, groupId, filter, secret, createdAt: this.now(), destinations },
      config.subscriptionMaxPerUser,
    );
    if (!ok) throw new ConnectError(`you already have ${config.subscriptionMaxPerUser} subscriptions (the limit)`, Code.ResourceExhausted);
    return create(CreateSubscriptionResponseSchema, { subscription: subscriptionMessage(await this.mine(caller, id)), secret });
  }

  async getSubscription(req: GetSubscriptionRequest, hctx: HandlerContext): Promise<GetSubscriptionResponse> {
    const caller = requireUser(hctx);
    return create(GetSubscriptionResponseSchema, { subscription: subscriptionMessage(await this.mine(caller, req.id)) });
  }

  async listSubscriptions(_req: unknown, hctx: HandlerContext): Promise<ListSubscriptionsResponse> {
    const caller = requireUser(hctx);
    const rows = await listSubscriptions(this.ctx.sql, caller.userId);
    return create(ListSubscriptionsResponseSchema, { subscriptions: rows.map(subscriptionMessage) });
  }

  async updateSubscription(req: UpdateSubscriptionRequest, hctx: HandlerContext): Promise<UpdateSubscriptionResponse> {
    const caller = requireUser(hctx);
    await this.mine(caller, req.id);
    let secret = "";
    if (req.enabled !== undefined) await setSubscriptionEnabled(this.ctx.sql, req.id, caller.userId, req.enabled, this.now());
    if (req.rotateSecret) {
      secret = newWebhookSecret();
      await setSubscriptionSecret(this.ctx.sql, req.id, caller.userId, secret);
    }
    return create(UpdateSubscriptionResponseSchema, { subscription: subscriptionMessage(await this.mine(caller, req.id)), secret });
  }

  async deleteSubscription(req: DeleteSubscriptionRequest, hctx: HandlerContext): Promise<DeleteSubscriptionResponse> {
    const caller = requireUser(hctx);
    checkId("id", req.id);
    if (!(await deleteSubscription(this.ctx.sql, req.id, caller.userId))) throw notFound(`subscription ${req.id} not found`);
    return create(DeleteSubscriptionResponseSchema, {});
  }

  async testSubscription(req: TestSubscriptionRequest, hctx: HandlerContext): Promise<TestSubscriptionResponse> {
    const caller = requireUser(hctx);
    const s = await this.mine(caller, req.id);
    if (!s.enabled) throw precondition(`subscription ${s.id} is disabled; enable it first`);
    const now = this.now();
    const eventId = `test-${uuidv7(now.getTime())}`;
    const body = JSON.stringify({ schema: EVENT_SCHEMA, kind: "subscription.test", subscription_id: s.id, message: "a test event, sent on request" });
    const rows: NewDelivery[] = s.destinations.map((d) => ({
      id: uuidv7(now.getTime()),
      subscriptionId: s.id,
      destinationId: d.id,
      eventId,
      eventKind: "subscription.test",
      body,
      summary: requestSummary({ dest_kind: d.kind, url: d.url, email_to: d.email_to, email_mode: d.email_mode }, body),
      due: now,
    }));
    await this.ctx.sql.begin((tx) => queueDeliveries(tx, rows, now));
    const made = await Promise.all(rows.map((r) => getDelivery(this.ctx.sql, r.id)));
    return create(TestSubscriptionResponseSchema, { deliveries: made.filter((d) => d !== undefined).map(deliveryMessage) });
  }

  async listDeliveries(req: ListDeliveriesRequest, hctx: HandlerContext): Promise<ListDeliveriesResponse> {
    const caller = requireUser(hctx);
    await this.mine(caller, req.subscriptionId, "subscription_id");
    if (req.pageSize < 0 || req.pageSize > 500) throw invalid("page_size must be between 0 and 500");
    const limit = req.pageSize || MAX_LIST;
    const key = decodePageToken(req.pageToken, { s: req.subscriptionId }, 2);
    const after = key ? { createdAt: new Date(key[0]), id: checkId("page_token", key[1]) } : undefined;
    if (after && Number.isNaN(after.createdAt.getTime())) throw invalid("page_token is malformed");
    const rows = await listDeliveries(this.ctx.sql, req.subscriptionId, { limit: limit + 1, after });
    const page = rows.slice(0, limit);
    const last = page[page.length - 1];
    return create(ListDeliveriesResponseSchema, {
      deliveries: page.map(deliveryMessage),
      nextPageToken: rows.length > limit && last ? encodePageToken({ s: req.subscriptionId }, [last.created_at.toISOString(), last.id]) : "",
    });
  }

  async redeliver(req: RedeliverRequest, hctx: HandlerContext): Promise<RedeliverResponse> {
    const caller = requireUser(hctx);
    checkId("delivery_id", req.deliveryId);
    const d = await getDeliveryForRedelivery(this.ctx.sql, req.deliveryId, caller.userId);
    if (!d) throw notFound(`delivery ${req.deliveryId} not found`);
    if (!d.enabled) throw precondition(`subscription ${d.subscription_id} is disabled; enable it first`);
    const now = this.now();
    const id = uuidv7(now.getTime());
    await this.ctx.sql.begin((tx) =>
      queueDeliveries(
        tx,
        [
          {
            id,
            subscriptionId: d.subscription_id,
            destinationId: d.destination_id,
            eventId: d.event_id,
            eventKind: d.event_kind,
            body: d.body,
            summary: d.request_summary,
            due: now,
            redeliveryOf: d.id,
          },
        ],
        now,
      ),
    );
    const made = await getDelivery(this.ctx.sql, id);
    return create(RedeliverResponseSchema, { delivery: made && deliveryMessage(made) });
  }
}
