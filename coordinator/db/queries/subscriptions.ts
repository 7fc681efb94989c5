/**
 * Subscriptions, their destinations, the delivery log and the delivery
 * worker's cursor (migration 0026): every statement that reads or writes
 * them. Who may see a subscription (its owner, the members of its group)
 * is part of each statement. Which events a subscription matches is
 * decided by the worker (subscriptions/filter.ts), with the feed's own
 * visibility rule.
 */
import type { Fragment, Sql, TransactionSql } from "postgres";
import type { FeedCursor } from "./feed.js";

type Db = Sql | TransactionSql;

/** A subscription's filter as stored (SubscriptionFilter's fields). */
export interface StoredFilter {
  kinds: string[];
  labels: Record<string, string>;
  images: string[];
  owner_ids: string[];
  states: string[];
  outcomes: string[];
  regressions_only: boolean;
}

export interface DestinationRow {
  id: string;
  subscription_id: string;
  kind: "webhook" | "email";
  url: string | null;
  email_to: string[] | null;
  email_mode: "each" | "digest" | null;
  digest_window_ms: string | null;
  failing_since: Date | null;
}

export interface SubscriptionRow {
  id: string;
  name: string;
  owner_id: string;
  group_name: string | null;
  filter: StoredFilter;
  enabled: boolean;
  disabled_reason: string;
  disabled_at: Date | null;
  created_at: Date;
  destinations: DestinationRow[];
}

export interface AttemptLog {
  at: string;
  code: number;
  error: string;
  ms: number;
}

export interface DeliveryRow {
  id: string;
  subscription_id: string;
  destination_id: string;
  event_id: string;
  event_kind: string;
  state: "pending" | "delivered" | "failed";
  request_summary: string;
  attempt_count: number;
  attempts: AttemptLog[];
  created_at: Date;
  next_attempt_at: Date | null;
  last_attempt_at: Date | null;
  response_code: number;
  error: string;
  redelivery_of: string | null;
}

/** Rows of subscriptions the user may see: their own and their groups'. */
function mayManage(sql: Db, userId: string): Fragment {
  return sql`(s.owner_id = ${userId}::uuid or s.group_id in (select group_id from group_members where user_id = ${userId}::uuid))`;
}

const SUBSCRIPTION_COLUMNS = (sql: Db) => sql`
  s.id, s.name, s.owner_id, g.name as group_name, s.filter, s.enabled, s.disabled_reason, s.disabled_at, s.created_at,
  coalesce((select jsonb_agg(to_jsonb(d) - 'position' order by d.position) from subscription_destinations d where d.subscription_id = s.id), '[]') as destinations`;

type RawSubscription = Omit<SubscriptionRow, "destinations"> & { destinations: (Omit<DestinationRow, "failing_since"> & { failing_since: string | null })[] };

function subscriptionOf(r: RawSubscription): SubscriptionRow {
  return { ...r, destinations: r.destinations.map((d) => ({ ...d, failing_since: d.failing_since === null ? null : new Date(d.failing_since) })) };
}

/** What insertSubscription writes. */
export interface NewSubscription {
  id: string;
  name: string;
  ownerId: string;
  groupId: string | null;
  filter: StoredFilter;
  secret: string;
  createdAt: Date;
  destinations: Omit<DestinationRow, "subscription_id" | "failing_since">[];
}

/** Writes a subscription and its destinations; false when the owner already has `max`. */
export async function insertSubscription(sql: Sql, s: NewSubscription, max: number): Promise<boolean> {
  return sql.begin(async (tx) => {
    // Serializes one owner's creations, so the limit holds under concurrency.
    await tx`select id from users where id = ${s.ownerId}::uuid for update`;
    const [{ n }] = await tx<{ n: number }[]>`select count(*)::int as n from subscriptions where owner_id = ${s.ownerId}::uuid`;
    if (n >= max) return false;
    await tx`
      insert into subscriptions (id, name, owner_id, group_id, filter, secret, created_at)
      values (${s.id}, ${s.name}, ${s.ownerId}, ${s.groupId}, ${tx.json(s.filter as never)}, ${s.secret}, ${s.createdAt})`;
    for (const [position, d] of s.destinations.entries()) {
      await tx`
        insert into subscription_destinations (id, subscription_id, position, kind, url, email_to, email_mode, digest_window_ms)
        values (${d.id}, ${s.id}, ${position}, ${d.kind}, ${d.url}, ${d.email_to}, ${d.email_mode}, ${d.digest_window_ms})`;
    }
    return true;
  });
}

/** One subscription the user may see; undefined otherwise. */
export async function getSubscription(sql: Db, id: string, userId: string): Promise<SubscriptionRow | undefined> {
  const [row] = await sql<RawSubscription[]>`
    select ${SUBSCRIPTION_COLUMNS(sql)} from subscriptions s left join groups g on g.id = s.group_id
    where s.id = ${id}::uuid and ${mayManage(sql, userId)}`;
  return row && subscriptionOf(row);
}

/** The user's subscriptions and their groups', newest first. */
export async function listSubscriptions(sql: Db, userId: string): Promise<SubscriptionRow[]> {
  const rows = await sql<RawSubscription[]>`
    select ${SUBSCRIPTION_COLUMNS(sql)} from subscriptions s left join groups g on g.id = s.group_id
    where ${mayManage(sql, userId)} order by s.created_at desc, s.id desc`;
  return rows.map(subscriptionOf);
}

/**
 * Enables (clearing an automatic disable's notice and the destinations'
 * failing state) or disables a subscription the user may see; a disable
 * fails its pending deliveries. False when there is none.
 */
export async function setSubscriptionEnabled(sql: Sql, id: string, userId: string, enabled: boolean, now: Date): Promise<boolean> {
  return sql.begin(async (tx) => {
    const rows = await tx`
      update subscriptions s set enabled = ${enabled},
        disabled_reason = case when ${enabled} then '' else s.disabled_reason end,
        disabled_at = case when ${enabled} then null else s.disabled_at end
      where s.id = ${id}::uuid and ${mayManage(tx, userId)} returning s.id`;
    if (rows.count === 0) return false;
    if (enabled) await tx`update subscription_destinations set failing_since = null where subscription_id = ${id}::uuid`;
    else await failPending(tx, id, "subscription disabled", now);
    return true;
  });
}

async function failPending(tx: Db, subscriptionId: string, error: string, now: Date): Promise<void> {
  await tx`
    update subscription_deliveries set state = 'failed', next_attempt_at = null, error = ${error}
    where subscription_id = ${subscriptionId}::uuid and state = 'pending' and created_at <= ${now}`;
}

/** Replaces the secret of a subscription the user may see; false when there is none. */
export async function setSubscriptionSecret(sql: Db, id: string, userId: string, secret: string): Promise<boolean> {
  const rows = await sql`update subscriptions s set secret = ${secret} where s.id = ${id}::uuid and ${mayManage(sql, userId)} returning s.id`;
  return rows.count > 0;
}

/** Deletes a subscription the user may see, with its log; false when there is none. */
export async function deleteSubscription(sql: Db, id: string, userId: string): Promise<boolean> {
  const rows = await sql`delete from subscriptions s where s.id = ${id}::uuid and ${mayManage(sql, userId)} returning s.id`;
  return rows.count > 0;
}

/**
 * What queueDeliveries writes: one delivery, pending and due at `due`, or,
 * with `delivered`, already delivered by that one attempt (the worker sends
 * before it writes; worker.ts).
 */
export interface NewDelivery {
  id: string;
  subscriptionId: string;
  destinationId: string;
  eventId: string;
  eventKind: string;
  body: string;
  summary: string;
  due: Date;
  redeliveryOf?: string;
  delivered?: { at: Date; ms: number; code: number };
  /** When it was made, if before it is written (default: the write's `now`). */
  createdAt?: Date;
}

/**
 * Writes deliveries (one statement) and, when some are pending, wakes the
 * workers at commit. Delivered ones clear their destinations' failing state,
 * as recordDelivered does. Those of a destination deleted meanwhile are
 * dropped, so that one user's deletion never fails the worker's batch.
 */
export async function queueDeliveries(tx: Db, rows: NewDelivery[], now: Date): Promise<void> {
  if (rows.length === 0) return;
  const ok = (r: NewDelivery) => r.delivered;
  await tx`
    insert into subscription_deliveries (id, subscription_id, destination_id, event_id, event_kind, body, request_summary, created_at, next_attempt_at,
      redelivery_of, state, attempt_count, attempts, last_attempt_at, response_code)
    select v.id, v.subscription_id, v.destination_id, v.event_id, v.event_kind, v.body, v.summary, v.created_at,
      case when v.code is null then v.due end, v.redelivery_of,
      case when v.code is null then 'pending' else 'delivered' end,
      case when v.code is null then 0 else 1 end,
      case when v.code is null then '[]'::jsonb else jsonb_build_array(jsonb_build_object('at', v.at_text, 'code', v.code, 'error', '', 'ms', v.ms)) end,
      v.at_text::timestamptz, coalesce(v.code, 0)
    from unnest(
      ${rows.map((r) => r.id)}::uuid[], ${rows.map((r) => r.subscriptionId)}::uuid[], ${rows.map((r) => r.destinationId)}::uuid[],
      ${rows.map((r) => r.eventId)}::text[], ${rows.map((r) => r.eventKind)}::text[], ${rows.map((r) => r.body)}::text[],
      ${rows.map((r) => r.summary)}::text[], ${rows.map((r) => (r.createdAt ?? now).toISOString())}::timestamptz[], ${rows.map((r) => r.due.toISOString())}::timestamptz[],
      ${rows.map((r) => r.redeliveryOf ?? null)}::uuid[], ${rows.map((r) => ok(r)?.at.toISOString() ?? null)}::text[],
      ${rows.map((r) => ok(r)?.code ?? null)}::int[], ${rows.map((r) => ok(r)?.ms ?? null)}::int[])
      as v(id, subscription_id, destination_id, event_id, event_kind, body, summary, created_at, due, redelivery_of, at_text, code, ms)
    -- A destination deleted since its deliveries were made (its log is gone with it): its rows are dropped, the others written.
    where exists (select 1 from subscription_destinations t where t.id = v.destination_id)`;
  const delivered = [...new Set(rows.filter(ok).map((r) => r.destinationId))];
  if (delivered.length > 0) {
    await tx`update subscription_destinations set failing_since = null where id = any(${delivered}::uuid[]) and failing_since is not null`;
  }
  if (rows.some((r) => !ok(r))) await tx`select pg_notify('treadmill_subscriptions', 'deliveries')`;
}

/** A delivery of a subscription the user may see, with what a redelivery needs. */
export async function getDeliveryForRedelivery(
  sql: Db,
  deliveryId: string,
  userId: string,
): Promise<(DeliveryRow & { body: string; enabled: boolean }) | undefined> {
  const [row] = await sql<(DeliveryRow & { body: string; enabled: boolean })[]>`
    select d.*, s.enabled from subscription_deliveries d join subscriptions s on s.id = d.subscription_id
    where d.id = ${deliveryId}::uuid and ${mayManage(sql, userId)}`;
  return row;
}

/** One delivery by id (any subscription). */
export async function getDelivery(sql: Db, id: string): Promise<DeliveryRow | undefined> {
  const [row] = await sql<DeliveryRow[]>`select * from subscription_deliveries where id = ${id}::uuid`;
  return row;
}

/** A page of a subscription's log, newest first, after the (created_at, id) key. */
export async function listDeliveries(
  sql: Db,
  subscriptionId: string,
  options: { limit: number; after?: { createdAt: Date; id: string } },
): Promise<DeliveryRow[]> {
  const after = options.after;
  return sql<DeliveryRow[]>`
    select id, subscription_id, destination_id, event_id, event_kind, state, request_summary, attempt_count, attempts,
      created_at, next_attempt_at, last_attempt_at, response_code, error, redelivery_of
    from subscription_deliveries
    where subscription_id = ${subscriptionId}::uuid
      ${after ? sql`and (created_at, id) < (${after.createdAt}, ${after.id}::uuid)` : sql``}
    order by created_at desc, id desc limit ${options.limit}`;
}

// ---- The delivery worker ------------------------------------------------

/** The worker's position: every event up to this cursor has been matched. */
export async function readSubscriptionCursor(sql: Db): Promise<FeedCursor> {
  const [row] = await sql<{ cursor: string }[]>`select cursor::text from subscription_cursor`;
  return BigInt(row.cursor);
}

/**
 * Moves the cursor from `from` to `to`; false (nothing moved) when it is no
 * longer at `from`: another replica moved it, and this one must stop.
 */
export async function advanceSubscriptionCursor(tx: Db, from: FeedCursor, to: FeedCursor, now: Date): Promise<boolean> {
  const rows = await tx`
    update subscription_cursor set cursor = ${to.toString()}::bigint, updated_at = ${now}
    where cursor = ${from.toString()}::bigint`;
  return rows.count === 1;
}

/** An enabled subscription as the worker matches it, with its owner's rights. */
export interface ActiveSubscription {
  id: string;
  name: string;
  secret: string;
  created_at: Date;
  owner_id: string;
  owner_admin: boolean;
  filter: StoredFilter;
  destinations: Pick<DestinationRow, "id" | "kind" | "url" | "email_to" | "email_mode" | "digest_window_ms">[];
}

/** Every enabled subscription of an owner who is not disabled, destinations in order. */
export async function activeSubscriptions(sql: Db): Promise<ActiveSubscription[]> {
  return sql<ActiveSubscription[]>`
    select s.id, s.name, s.secret, s.created_at, s.owner_id, u.role = 'admin' as owner_admin, s.filter,
      (select jsonb_agg(jsonb_build_object('id', d.id, 'kind', d.kind, 'url', d.url, 'email_to', d.email_to,
          'email_mode', d.email_mode, 'digest_window_ms', d.digest_window_ms::text) order by d.position)
        from subscription_destinations d where d.subscription_id = s.id) as destinations
    from subscriptions s join users u on u.id = s.owner_id and not u.disabled
    where s.enabled`;
}

/** The image (spec.image) of each of these jobs. */
export async function jobImages(sql: Db, jobIds: string[]): Promise<Map<string, string>> {
  if (jobIds.length === 0) return new Map();
  const rows = await sql<{ id: string; image: string }[]>`select id, spec->>'image' as image from jobs where id = any(${jobIds}::uuid[])`;
  return new Map(rows.map((r) => [r.id, r.image]));
}

/** The version of the subscriptions (migration 0026): it moves with every change of one. */
export async function subscriptionsVersion(sql: Db): Promise<bigint> {
  const [row] = await sql<{ v: string }[]>`select version::text as v from subscription_version`;
  return BigInt(row.v);
}

/** A pending delivery that is due, with its destination and secret. */
export interface DueDelivery {
  id: string;
  subscription_id: string;
  destination_id: string;
  event_id: string;
  event_kind: string;
  body: string;
  attempt_count: number;
  created_at: Date;
  next_attempt_at: Date;
  dest_kind: "webhook" | "email";
  url: string | null;
  email_to: string[] | null;
  email_mode: "each" | "digest" | null;
  secret: string;
  subscription_name: string;
}

/** Pending deliveries due at `now`, oldest due first, not among `busy`. */
export async function dueDeliveries(sql: Db, now: Date, limit: number, busy: readonly string[]): Promise<DueDelivery[]> {
  return sql<DueDelivery[]>`
    select d.id, d.subscription_id, d.destination_id, d.event_id, d.event_kind, d.body, d.attempt_count, d.created_at, d.next_attempt_at,
      t.kind as dest_kind, t.url, t.email_to, t.email_mode, s.secret, s.name as subscription_name
    from subscription_deliveries d
    join subscription_destinations t on t.id = d.destination_id
    join subscriptions s on s.id = d.subscription_id
    where d.state = 'pending' and d.next_attempt_at <= ${now} and d.id <> all(${busy as string[]}::uuid[])
    order by d.next_attempt_at limit ${limit}`;
}

/** When the next pending delivery is due; undefined when none is. */
export async function nextDue(sql: Db): Promise<Date | undefined> {
  const [row] = await sql<{ at: Date | null }[]>`select min(next_attempt_at) as at from subscription_deliveries where state = 'pending'`;
  return row.at ?? undefined;
}

/** What one attempt at some deliveries came to. */
export interface AttemptOutcome {
  ids: string[];
  destinationId: string;
  subscriptionId: string;
  at: Date;
  ms: number;
  code: number;
  error: string;
  /** delivered; retry at `retryAt`; or failed for good. */
  result: { state: "delivered" } | { state: "retry"; retryAt: Date } | { state: "failed" };
}

/**
 * Records an attempt on deliveries of one destination: the attempt log,
 * the new state, and the destination's failing state (cleared by a
 * success, started by a failure). Then, when the destination has failed
 * since before `disableBefore`, disables the subscription with `reason`
 * and fails its pending deliveries. Returns whether it disabled it.
 */
export async function recordAttempt(sql: Sql, o: AttemptOutcome, disableBefore: Date, reason: string): Promise<boolean> {
  return sql.begin(async (tx) => {
    const entry = { at: o.at.toISOString(), code: o.code, error: o.error, ms: o.ms };
    const state = o.result.state === "retry" ? "pending" : o.result.state;
    const next = o.result.state === "retry" ? o.result.retryAt : null;
    await tx`
      update subscription_deliveries set state = ${state}, attempt_count = attempt_count + 1,
        attempts = attempts || ${tx.json([entry] as never)}::jsonb, last_attempt_at = ${o.at}, next_attempt_at = ${next},
        response_code = ${o.code}, error = ${o.error}
      where id = any(${o.ids}::uuid[]) and state = 'pending'`;
    if (o.result.state === "delivered") {
      await tx`update subscription_destinations set failing_since = null where id = ${o.destinationId}::uuid`;
      return false;
    }
    const [dest] = await tx<{ failing_since: Date }[]>`
      update subscription_destinations set failing_since = coalesce(failing_since, ${o.at})
      where id = ${o.destinationId}::uuid returning failing_since`;
    if (!dest || dest.failing_since > disableBefore) return false;
    const disabled = await tx`
      update subscriptions set enabled = false, disabled_reason = ${reason}, disabled_at = ${o.at}
      where id = ${o.subscriptionId}::uuid and enabled returning id`;
    if (disabled.count === 0) return false;
    await failPending(tx, o.subscriptionId, "subscription disabled: " + reason, o.at);
    return true;
  });
}

/** A delivery acknowledged by its destination. */
export interface Delivered {
  id: string;
  destinationId: string;
  at: Date;
  ms: number;
  code: number;
}

/**
 * Records successful attempts in one statement (many deliveries, one
 * round trip), and clears their destinations' failing state.
 */
export async function recordDelivered(sql: Sql, rows: Delivered[]): Promise<void> {
  if (rows.length === 0) return;
  await sql.begin(async (tx) => {
    await tx`
      update subscription_deliveries d set state = 'delivered', attempt_count = d.attempt_count + 1,
        attempts = d.attempts || jsonb_build_array(jsonb_build_object('at', v.at_text, 'code', v.code, 'error', '', 'ms', v.ms)),
        last_attempt_at = v.at_text::timestamptz, next_attempt_at = null, response_code = v.code, error = ''
      from unnest(${rows.map((r) => r.id)}::uuid[], ${rows.map((r) => r.at.toISOString())}::text[], ${rows.map((r) => r.code)}::int[],
        ${rows.map((r) => r.ms)}::int[]) as v(id, at_text, code, ms)
      where d.id = v.id and d.state = 'pending'`;
    await tx`
      update subscription_destinations set failing_since = null
      where id = any(${[...new Set(rows.map((r) => r.destinationId))]}::uuid[]) and failing_since is not null`;
  });
}

/** Pending email-digest deliveries of one destination (its digest). */
export async function pendingOfDestination(sql: Db, destinationId: string, limit: number): Promise<{ id: string; event_id: string; event_kind: string; body: string }[]> {
  return sql`
    select id, event_id, event_kind, body from subscription_deliveries
    where destination_id = ${destinationId}::uuid and state = 'pending' order by created_at, id limit ${limit}`;
}

/** When a new digest delivery of this destination is due: with the open window's, or a window from now. */
export async function digestDue(sql: Db, destinationId: string, now: Date, windowMs: number): Promise<Date> {
  const [row] = await sql<{ at: Date | null }[]>`
    select min(next_attempt_at) as at from subscription_deliveries
    where destination_id = ${destinationId}::uuid and state = 'pending' and attempt_count = 0`;
  return row.at ?? new Date(now.getTime() + windowMs);
}

/** Deletes up to `batch` deliveries queued before `cutoff`; returns how many. */
export async function sweepDeliveries(sql: Db, cutoff: Date, batch: number): Promise<number> {
  const rows = await sql`
    delete from subscription_deliveries where id in (
      select id from subscription_deliveries where created_at < ${cutoff} order by created_at limit ${batch})`;
  return rows.count;
}
