/**
 * The event feed's table (`feed_events`, migration 0025): every statement
 * that writes, reads or sweeps it. A position is (xid, id): the writing
 * transaction's id and the row's; a read returns only rows whose xid is
 * below its snapshot's xmin, so no row committed later can sort before what
 * it returned (the migration's head comment says why). Job state and stage,
 * host health and lease state are written by the migration's triggers;
 * every other kind by `recordFeedEvent`, in the changing transaction.
 */
import type { Fragment, Sql, TransactionSql } from "postgres";

type Db = Sql | TransactionSql;

/** The version every payload names in its "schema" field. */
export const EVENT_SCHEMA = "treadmill.event.v1";

/** Every kind of event (docs/events.md gives each payload). */
export const FEED_KINDS = ["job.state", "job.stage", "job.results", "job.artifacts", "host.health", "lease.state"] as const;
export type FeedKind = (typeof FEED_KINDS)[number];

/** A place in the feed: after the event written by transaction `xid` as row `id`. */
export interface FeedPosition {
  xid: bigint;
  id: bigint;
}

/** Before every event. */
export const FEED_START: FeedPosition = { xid: 0n, id: 0n };

/** The cursor of a position: "XID-ID". */
export function formatCursor(p: FeedPosition): string {
  return `${p.xid}-${p.id}`;
}

const CURSOR = /^(\d{1,20})-(\d{1,19})$/;
const MAX_U64 = (1n << 64n) - 1n;
const MAX_I64 = (1n << 63n) - 1n;

/** The position a cursor names; undefined when it is not one. */
export function parseCursor(text: string): FeedPosition | undefined {
  const m = CURSOR.exec(text);
  if (!m) return undefined;
  const p = { xid: BigInt(m[1]), id: BigInt(m[2]) };
  return p.xid > MAX_U64 || p.id > MAX_I64 ? undefined : p;
}

/** Negative, zero or positive as `a` is before, at or after `b`. */
export function comparePositions(a: FeedPosition, b: FeedPosition): number {
  if (a.xid !== b.xid) return a.xid < b.xid ? -1 : 1;
  return a.id === b.id ? 0 : a.id < b.id ? -1 : 1;
}

/** What `recordFeedEvent` writes. */
export interface FeedEventInput {
  kind: FeedKind;
  /**
   * The job it is about: its owner, labels and lease are copied from the job
   * row (so the event's visibility is the job's) unless given here.
   */
  jobId?: string;
  hostId?: string;
  leaseId?: string;
  /** Default "owner" with an owner (given or the job's), else "admins". */
  audience?: "owner" | "users" | "admins";
  ownerId?: string;
  labels?: Record<string, string>;
  /** The kind-specific fields; "schema" and "kind" are added. */
  payload: Record<string, unknown>;
}

/**
 * Writes one event in the caller's transaction and wakes the feed's
 * readers at its commit (nothing is seen before it commits; a rollback
 * takes the event with it). For a job event, pass `jobId`: the job's owner,
 * labels and lease come with it.
 */
export async function recordFeedEvent(tx: Db, e: FeedEventInput): Promise<void> {
  const payload = { ...e.payload, schema: EVENT_SCHEMA, kind: e.kind };
  const labels = e.labels === undefined ? null : tx.json(e.labels);
  await tx`
    with j as (select owner_id, spec->'tags' as labels, lease_id from jobs where id = ${e.jobId ?? null}::uuid),
    v as (select
      coalesce(${e.ownerId ?? null}::uuid, (select owner_id from j)) as owner_id,
      coalesce(${labels}::jsonb, (select labels from j), '{}') as labels,
      coalesce(${e.leaseId ?? null}::uuid, (select lease_id from j)) as lease_id),
    ins as (
      insert into feed_events (kind, job_id, host_id, lease_id, audience, owner_id, labels, payload)
      select ${e.kind}, ${e.jobId ?? null}::uuid, ${e.hostId ?? null}::uuid, v.lease_id,
        coalesce(${e.audience ?? null}, case when v.owner_id is null then 'admins' else 'owner' end),
        v.owner_id, v.labels, ${tx.json(payload as never)}::jsonb
      from v)
    select pg_notify('treadmill_feed', '')`;
}

/** An event as read. */
export interface FeedEvent {
  position: FeedPosition;
  at: Date;
  kind: string;
  jobId: string | null;
  hostId: string | null;
  leaseId: string | null;
  ownerId: string | null;
  labels: Record<string, string>;
  payload: Record<string, unknown>;
}

/** Who reads: a user sees their own jobs' and leases' events and what every user may see; an admin and the system see all. */
export type FeedViewer = { kind: "user"; userId: string; admin: boolean } | { kind: "system" };

/** Which events a reader wants; every part given must match. */
export interface FeedFilter {
  kinds?: readonly string[];
  labels?: Record<string, string>;
  ownerId?: string;
  jobIds?: readonly string[];
}

/** One read of the feed. */
export interface FeedRead {
  /** The events that passed the viewer's rights and the filter, in order. */
  events: FeedEvent[];
  /** How far the read went (the last row it considered), or where it started. */
  position: FeedPosition;
  /** Rows were considered up to the limit: read again at once. */
  full: boolean;
  /**
   * Committed rows exist after `position` that a running transaction holds
   * back (one with a smaller xid has not ended): read again soon, even
   * without a notification.
   */
  heldBack: boolean;
}

/** The start position was deleted by retention (the sweep's horizon is after it). */
export class CursorExpiredError extends Error {
  constructor(
    readonly cursor: FeedPosition,
    readonly horizon: FeedPosition,
  ) {
    super(`cursor ${formatCursor(cursor)} is older than the feed's retention (events up to ${formatCursor(horizon)} were deleted)`);
    this.name = "CursorExpiredError";
  }
}

/**
 * The feed's visibility rule, the one place it is written: whether a user
 * (`userId`, `admin`: SQL expressions) may see feed row `s`. Readers pass
 * constants; subscriptions (db/queries/subscriptions.ts) their owner's
 * columns, so a subscription matches only what its owner may read.
 */
export function visibleTo(sql: Db, userId: Fragment, admin: Fragment): Fragment {
  return sql`(${admin} or s.audience = 'users' or (s.audience = 'owner' and s.owner_id = ${userId}))`;
}

function matchOf(sql: Db, viewer: FeedViewer, f: FeedFilter): Fragment {
  const parts: Fragment[] = [];
  if (viewer.kind === "user" && !viewer.admin) parts.push(visibleTo(sql, sql`${viewer.userId}::uuid`, sql`false`));
  if (f.kinds && f.kinds.length > 0) parts.push(sql`s.kind = any(${f.kinds as string[]}::text[])`);
  if (f.labels && Object.keys(f.labels).length > 0) parts.push(sql`s.labels @> ${sql.json(f.labels)}::jsonb`);
  if (f.ownerId) parts.push(sql`s.owner_id = ${f.ownerId}::uuid`);
  if (f.jobIds && f.jobIds.length > 0) parts.push(sql`s.job_id = any(${f.jobIds as string[]}::uuid[])`);
  if (parts.length === 0) return sql`true`;
  return parts.reduce((a, b) => sql`${a} and ${b}`);
}

interface ReadRow {
  held: boolean;
  expired: boolean;
  hz_xid: string;
  hz_id: string;
  xid: string | null;
  id: string | null;
  at: Date | null;
  kind: string | null;
  job_id: string | null;
  host_id: string | null;
  lease_id: string | null;
  owner_id: string | null;
  labels: Record<string, string> | null;
  hit: boolean | null;
  payload: Record<string, unknown> | null;
}

/**
 * Reads up to `limit` rows after `after` in one statement (one snapshot):
 * the settled rows (xid below the snapshot's xmin), which of them pass,
 * whether more are held back, and the retention horizon, checked in the same
 * snapshot as the rows (CursorExpiredError when `after` is before it).
 */
export async function readFeed(
  sql: Db,
  after: FeedPosition,
  options: { viewer: FeedViewer; filter?: FeedFilter; limit: number },
): Promise<FeedRead> {
  const x = after.xid.toString();
  const i = after.id.toString();
  const rows = await sql<ReadRow[]>`
    with snap as materialized (select pg_snapshot_xmin(pg_current_snapshot()) as xmin),
    s as materialized (
      select * from feed_events e
      where (e.xid, e.id) > (${x}::xid8, ${i}::bigint) and e.xid < (select xmin from snap)
      order by e.xid, e.id limit ${options.limit}),
    h as materialized (
      select
        exists (select 1 from feed_events e where e.xid >= (select xmin from snap) and (e.xid, e.id) > (${x}::xid8, ${i}::bigint)) as held,
        (f.xid, f.id) > (${x}::xid8, ${i}::bigint) as expired, f.xid::text as hz_xid, f.id::text as hz_id
      from feed_horizon f)
    select h.*, s.xid::text as xid, s.id::text as id, s.at, s.kind, s.job_id, s.host_id, s.lease_id, s.owner_id,
      m.hit, case when m.hit then s.labels end as labels, case when m.hit then s.payload end as payload
    from h left join (s cross join lateral (select ${matchOf(sql, options.viewer, options.filter ?? {})} as hit) m) on true
    order by s.xid, s.id`;
  const first = rows[0];
  if (first.expired) throw new CursorExpiredError(after, { xid: BigInt(first.hz_xid), id: BigInt(first.hz_id) });
  const events: FeedEvent[] = [];
  let position = after;
  let scanned = 0;
  for (const r of rows) {
    if (r.xid === null || r.id === null) continue;
    scanned++;
    position = { xid: BigInt(r.xid), id: BigInt(r.id) };
    if (!r.hit) continue;
    events.push({
      position,
      at: r.at!,
      kind: r.kind!,
      jobId: r.job_id,
      hostId: r.host_id,
      leaseId: r.lease_id,
      ownerId: r.owner_id,
      labels: r.labels ?? {},
      payload: r.payload ?? {},
    });
  }
  return { events, position, full: scanned >= options.limit, heldBack: first.held };
}

/**
 * The feed's head: the position after which a reader starting now sees
 * only what comes next (the newest settled row, or the retention horizon
 * when there is none).
 */
export async function feedHead(sql: Db): Promise<FeedPosition> {
  const rows = await sql<{ xid: string; id: string }[]>`
    select xid::text, id::text from (
      (select e.xid, e.id from feed_events e
        where e.xid < pg_snapshot_xmin(pg_current_snapshot())
        order by e.xid desc, e.id desc limit 1)
      union all
      select xid, id from feed_horizon) p
    order by p.xid desc, p.id desc limit 1`;
  return { xid: BigInt(rows[0].xid), id: BigInt(rows[0].id) };
}

/** The retention horizon: every event up to it was deleted. */
export async function feedHorizon(sql: Db): Promise<FeedPosition> {
  const [row] = await sql<{ xid: string; id: string }[]>`select xid::text, id::text from feed_horizon`;
  return { xid: BigInt(row.xid), id: BigInt(row.id) };
}

/**
 * Deletes up to `batch` events of the prefix of the feed that ends with the
 * newest-positioned event written before `cutoff`, moving the horizon to
 * that position in the same transaction. Returns how many it deleted (a
 * full batch: call again). Safe on several replicas at once.
 */
export async function sweepFeed(sql: Sql, cutoff: Date, batch: number): Promise<number> {
  return sql.begin(async (tx) => {
    const [end] = await tx<{ xid: string; id: string }[]>`
      with old as materialized (select xid, id from feed_events where at < ${cutoff})
      select xid::text, id::text from old order by xid desc, id desc limit 1`;
    if (!end) return 0;
    await tx`
      update feed_horizon set xid = ${end.xid}::xid8, id = ${end.id}::bigint
      where (xid, id) < (${end.xid}::xid8, ${end.id}::bigint)`;
    const deleted = await tx`
      delete from feed_events where (xid, id) in (
        select xid, id from feed_events where (xid, id) <= (${end.xid}::xid8, ${end.id}::bigint)
        order by xid, id limit ${batch})`;
    return deleted.count;
  });
}
