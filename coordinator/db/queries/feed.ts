/**
 * The event feed's tables (`feed_pending`, `feed_events`, `feed_state`,
 * migration 0025): every statement that writes, numbers, reads or sweeps
 * them. Events are written without a cursor; `stampFeed` (the sequencer)
 * numbers committed ones in batches that follow one another under one
 * advisory lock, so a
 * reader of `cursor > N` never finds a smaller cursor later (the
 * migration's head comment says why). Job state and stage, host health and
 * lease state are written by the migration's triggers; every other kind by
 * `recordFeedEvent`, in the changing transaction.
 */
import type { Sql, TransactionSql } from "postgres";

type Db = Sql | TransactionSql;

/** The version every payload names in its "schema" field. */
export const EVENT_SCHEMA = "treadmill.event.v1";

/** Every kind of event (docs/events.md gives each payload). */
export const FEED_KINDS = ["job.state", "job.stage", "job.results", "job.artifacts", "host.health", "lease.state"] as const;
export type FeedKind = (typeof FEED_KINDS)[number];

/**
 * A place in the feed: after the event with this cursor (0: before every
 * event). Cursors are positive and only grow; numbers may be skipped.
 */
export type FeedCursor = bigint;

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
      insert into feed_pending (kind, job_id, host_id, lease_id, audience, owner_id, labels, payload)
      select ${e.kind}, ${e.jobId ?? null}::uuid, ${e.hostId ?? null}::uuid, v.lease_id,
        coalesce(${e.audience ?? null}, case when v.owner_id is null then 'admins' else 'owner' end),
        v.owner_id, v.labels, ${tx.json(payload as never)}::jsonb
      from v)
    select pg_notify('treadmill_feed_pending', '')`;
}

/** An event as read. */
export interface FeedEvent {
  cursor: FeedCursor;
  /** Who may see it (see `visibleTo`). */
  audience: "owner" | "users" | "admins";
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
  /** How far the read went (the last event it considered), or where it started. */
  cursor: FeedCursor;
  /** Events were considered up to the limit: read again at once. */
  full: boolean;
}

/** The start cursor was deleted by retention (the sweep went past it). */
export class CursorExpiredError extends Error {
  constructor(
    readonly cursor: FeedCursor,
    readonly swept: FeedCursor,
  ) {
    super(`cursor ${cursor} is older than the feed's retention (events up to ${swept} were deleted)`);
    this.name = "CursorExpiredError";
  }
}

/**
 * Whether `viewer` may see `e` and `filter` takes it: the one rule of who
 * sees what, for events read from the table and for those a batch of this
 * replica's sequencer hands its readers directly. A user sees events of
 * audience "users" and "owner" events they own; admins and the system all.
 */
export function visibleTo(viewer: FeedViewer, f: FeedFilter, e: FeedEvent): boolean {
  if (viewer.kind === "user" && !viewer.admin) {
    if (!(e.audience === "users" || (e.audience === "owner" && e.ownerId === viewer.userId))) return false;
  }
  if (f.kinds && f.kinds.length > 0 && !f.kinds.includes(e.kind)) return false;
  if (f.labels) {
    for (const [k, v] of Object.entries(f.labels)) if (e.labels[k] !== v) return false;
  }
  if (f.ownerId && e.ownerId !== f.ownerId) return false;
  if (f.jobIds && f.jobIds.length > 0 && (e.jobId === null || !f.jobIds.includes(e.jobId))) return false;
  return true;
}

interface EventRow {
  cursor: string;
  at: Date;
  kind: string;
  job_id: string | null;
  host_id: string | null;
  lease_id: string | null;
  audience: FeedEvent["audience"];
  owner_id: string | null;
  labels: Record<string, string>;
  payload: Record<string, unknown>;
}

function eventOf(r: EventRow): FeedEvent {
  return {
    cursor: BigInt(r.cursor),
    audience: r.audience,
    at: r.at,
    kind: r.kind,
    jobId: r.job_id,
    hostId: r.host_id,
    leaseId: r.lease_id,
    ownerId: r.owner_id,
    labels: r.labels,
    payload: r.payload,
  };
}

/** One read of the table: the events after the cursor read (up to the limit), unfiltered. */
export interface FeedRows {
  events: FeedEvent[];
  /** Rows were read up to the limit: read again at once. */
  full: boolean;
}

/**
 * Reads up to `limit` events after `after` (0: from the oldest kept), in
 * cursor order, in one statement: the retention's progress is checked in
 * the same snapshot as the rows (CursorExpiredError when events after
 * `after` were deleted).
 */
export async function readFeedRows(sql: Db, after: FeedCursor, limit: number): Promise<FeedRows> {
  const rows = await sql<(Omit<EventRow, "cursor"> & { cursor: string | null; swept: string })[]>`
    with f as (select swept_cursor from feed_state),
    s as materialized (
      select * from feed_events e
      where e.cursor > greatest(${after.toString()}::bigint, (select swept_cursor from f))
      order by e.cursor limit ${limit})
    select (select swept_cursor from f)::text as swept, s.cursor::text as cursor, s.at, s.kind, s.job_id, s.host_id, s.lease_id,
      s.audience, s.owner_id, s.labels, s.payload
    from (select 1) one left join s on true
    order by s.cursor`;
  const swept = BigInt(rows[0].swept);
  if (after !== 0n && after < swept) throw new CursorExpiredError(after, swept);
  const events = rows.flatMap((r) => (r.cursor === null ? [] : [eventOf({ ...r, cursor: r.cursor })]));
  return { events, full: events.length >= limit };
}

/** `events` (those read after `after`, in order) as `viewer` sees them through `filter`. */
export function seenBy(events: FeedEvent[], after: FeedCursor, viewer: FeedViewer, filter: FeedFilter, full: boolean): FeedRead {
  return {
    events: events.filter((e) => visibleTo(viewer, filter, e)),
    cursor: events.length > 0 ? events[events.length - 1].cursor : after,
    full,
  };
}

/**
 * One read as a viewer sees it: up to `limit` events after `after` read,
 * those `visibleTo` the viewer through the filter kept, and the cursor
 * read up to (past the events left out).
 */
export async function readFeed(sql: Db, after: FeedCursor, options: { viewer: FeedViewer; filter?: FeedFilter; limit: number }): Promise<FeedRead> {
  const { events, full } = await readFeedRows(sql, after, options.limit);
  return seenBy(events, after, options.viewer, options.filter ?? {}, full);
}

/** The feed's head: the newest cursor given (a reader after it sees only what comes next). */
export async function feedHead(sql: Db): Promise<FeedCursor> {
  const [row] = await sql<{ last: string }[]>`select last_cursor::text as last from feed_state`;
  return BigInt(row.last);
}

/**
 * One batch of the sequencer (the migration's treadmill_feed_stamp, one
 * round trip, its own transaction): under the sequencer's lock, numbers up
 * to `batch` committed events without a cursor, in write order, from the
 * last cursor given, and wakes every replica's readers at its commit.
 * Returns the events it numbered, in cursor order, their cursors
 * contiguous (a full batch: call again). Safe on several replicas at once:
 * their batches follow one another.
 */
export async function stampFeed(sql: Sql, batch: number): Promise<FeedEvent[]> {
  const rows = await sql<EventRow[]>`
    select cursor::text as cursor, at, kind, job_id, host_id, lease_id, audience, owner_id, labels, payload
    from treadmill_feed_stamp(${batch})`;
  return rows.map(eventOf);
}

/**
 * Deletes the oldest events, in cursor order, up to the first one written
 * at or after `cutoff`, at most `batch` of them, recording the last cursor
 * deleted as swept in the same transaction. Returns how many it deleted (a
 * full batch: call again). Safe on several replicas at once.
 */
export async function sweepFeed(sql: Sql, cutoff: Date, batch: number): Promise<number> {
  return sql.begin(async (tx) => {
    const [end] = await tx<{ cursor: string | null }[]>`
      with h as materialized (select cursor, at from feed_events order by cursor limit ${batch}),
      young as (select min(cursor) as first from h where at >= ${cutoff})
      select (case when (select first from young) is null then (select max(cursor) from h) else (select first from young) - 1 end)::text as cursor`;
    if (end.cursor === null) return 0;
    const deleted = await tx`delete from feed_events where cursor <= ${end.cursor}::bigint`;
    if (deleted.count > 0) await tx`update feed_state set swept_cursor = ${end.cursor}::bigint where swept_cursor < ${end.cursor}::bigint`;
    return deleted.count;
  });
}
