/**
 * EventService: the event feed over gRPC (docs/events.md). A caller is
 * authenticated (the authorization hook) and resolved to a viewer before
 * its request is read; the viewer's rights are part of every read's SQL, so
 * a user never receives another user's private events, whatever the filter.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  type Event,
  type EventFilter,
  EventSchema,
  type EventService,
  type ListEventsRequest,
  type ListEventsResponse,
  ListEventsResponseSchema,
  type WatchEventsRequest,
  type WatchEventsResponse,
  WatchEventsResponseSchema,
} from "../../gen/treadmill/coordinator/v1/event_service_pb.js";
import { type UserCaller, requireUser } from "../auth.js";
import { CursorExpiredError, FEED_KINDS, type FeedCursor, type FeedEvent, type FeedFilter, type FeedViewer } from "../db/queries/feed.js";
import { checkId, checkTags, denied, invalid } from "../shared/common.js";
import type { FeedReader } from "./reader.js";

/** Job ids one filter may name. */
const MAX_JOB_IDS = 100;
/** Events one message of WatchEvents carries at most (a follower gets the first at once). */
const WATCH_BATCH = 100;
/** A stream with nothing to send still tells its position this often, at most. */
const POSITION_EVERY_MS = 1000;

function viewerOf(caller: UserCaller): FeedViewer {
  return { kind: "user", userId: caller.userId, admin: caller.role === "admin" };
}

/** The filter as the reader takes it; INVALID_ARGUMENT or PERMISSION_DENIED naming the field. */
function filterOf(caller: UserCaller, f: EventFilter | undefined): FeedFilter {
  if (!f) return {};
  const kinds = [...new Set(f.kinds)];
  for (const k of kinds) {
    if (!(FEED_KINDS as readonly string[]).includes(k)) throw invalid(`filter.kinds: unknown kind "${k.slice(0, 64)}" (one of ${FEED_KINDS.join(", ")})`);
  }
  checkTags("filter.labels", f.labels);
  if (f.ownerUserId !== "") {
    checkId("filter.owner_user_id", f.ownerUserId);
    if (caller.role !== "admin" && f.ownerUserId !== caller.userId) throw denied("filter.owner_user_id: only admins may read another user's events");
  }
  if (f.jobIds.length > MAX_JOB_IDS) throw invalid(`filter.job_ids: at most ${MAX_JOB_IDS} ids`);
  for (const id of f.jobIds) checkId("filter.job_ids", id);
  return { kinds, labels: f.labels, ownerId: f.ownerUserId || undefined, jobIds: f.jobIds };
}

function cursorOf(cursor: bigint): FeedCursor {
  if (cursor < 0n) throw invalid(`after_cursor must not be negative, got ${cursor}`);
  return cursor;
}

/** OUT_OF_RANGE for a swept cursor; anything else unchanged. */
function expired(err: unknown): unknown {
  if (!(err instanceof CursorExpiredError)) return err;
  return new ConnectError(`${err.message}; start again without after_cursor (the head) or with 0 (the oldest event kept)`, Code.OutOfRange);
}

export function eventMessage(e: FeedEvent): Event {
  return create(EventSchema, {
    cursor: e.cursor,
    time: timestampFromDate(e.at),
    kind: e.kind,
    jobId: e.jobId ?? "",
    hostId: e.hostId ?? "",
    leaseId: e.leaseId ?? "",
    ownerUserId: e.ownerId ?? "",
    labels: e.labels,
    payload: e.payload as Event["payload"],
  });
}

export class EventServiceImpl implements ServiceImpl<typeof EventService> {
  constructor(private readonly reader: FeedReader) {}

  async *watchEvents(req: WatchEventsRequest, hctx: HandlerContext): AsyncIterable<WatchEventsResponse> {
    const caller = requireUser(hctx);
    const filter = filterOf(caller, req.filter);
    const start = req.afterCursor !== undefined ? cursorOf(req.afterCursor) : await this.reader.head();
    let lastSent = 0;
    try {
      for await (const read of this.reader.follow(start, { viewer: viewerOf(caller), filter, signal: hctx.signal, batch: WATCH_BATCH })) {
        const now = Date.now();
        if (read.events.length === 0 && lastSent !== 0 && now - lastSent < POSITION_EVERY_MS) continue;
        lastSent = now;
        yield create(WatchEventsResponseSchema, { events: read.events.map(eventMessage), cursor: read.cursor });
      }
    } catch (err) {
      throw expired(err);
    }
  }

  async listEvents(req: ListEventsRequest, hctx: HandlerContext): Promise<ListEventsResponse> {
    const caller = requireUser(hctx);
    const filter = filterOf(caller, req.filter);
    if (req.pageSize < 0 || req.pageSize > 1000) throw invalid("page_size must be between 0 and 1000");
    const size = req.pageSize || 100;
    let cursor = cursorOf(req.afterCursor);
    const events: FeedEvent[] = [];
    let atEnd = false;
    try {
      // A selective filter may pass few of the rows read: read on, boundedly.
      for (let reads = 0; events.length < size && reads < 20; reads++) {
        const read = await this.reader.read(cursor, { viewer: viewerOf(caller), filter, limit: size - events.length });
        events.push(...read.events);
        cursor = read.cursor;
        if (!read.full) {
          atEnd = true;
          break;
        }
      }
    } catch (err) {
      throw expired(err);
    }
    return create(ListEventsResponseSchema, { events: events.map(eventMessage), cursor, atEnd });
  }
}
