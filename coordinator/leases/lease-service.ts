/**
 * LeaseService (lease_service.proto, docs/leases.md): users lease hosts
 * now or ahead of time, keep them with a keepalive, extend and release
 * them; admins revoke any. A lease's holder alone (and admins) sees and
 * acts on it: to anyone else it does not exist (NOT_FOUND). Every change is
 * audited (`lease.*`). The lease's later life (activation, expiry, lost
 * keepalives, deadlines) is the keeper's (lease-keeper.ts); the steps both
 * take are in lifecycle.ts, the statements in db/queries/leases.ts.
 */
import { create } from "@bufbuild/protobuf";
import { type Timestamp, timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import {
  type CreateLeaseRequest,
  type ExtendLeaseRequest,
  type GetLeaseCalendarRequest,
  type GetLeaseRequest,
  type LeaseService,
  LeaseExtensionLimitSchema,
  type ListLeasesRequest,
  type ReleaseLeaseRequest,
  type RenewLeaseRequest,
  type RevokeLeaseRequest,
  type WatchLeaseRequest,
  type WatchLeaseResponse,
  WatchLeaseResponseSchema,
} from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import type { HostRequirements } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { AsyncQueue } from "../../lib/async/queue.js";
import { actorOf } from "../audit.js";
import { type UserCaller, requireAdmin, requireUser } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import { audit } from "../db/queries/audit.js";
import { driverKindName } from "../db/queries/hosts.js";
import { type Db, imageForJob } from "../db/queries/jobs.js";
import {
  type LeaseRow,
  type LeaseStateName,
  calendarRows,
  endLease,
  leaseEvents,
  leaseEventMessage,
  leaseHostsOf,
  leaseMessage,
  leaseOfRequest,
  leaseSpansOf,
  leaseStateEnum,
  leaseStateName,
  listLeaseRows,
  loadLease,
  lockBookings,
  leaseRequestDone,
  lockLeaseJobs,
  matchingHostCount,
  moveLeaseEnd,
  namedHosts,
  nextBookingAfter,
  openLeaseCount,
  recordLeaseEvents,
} from "../db/queries/leases.js";
import {
  HOST_NAME,
  checkId,
  checkTags,
  checkText,
  clip,
  decodePageToken,
  encodePageToken,
  invalid,
  notFound,
  pageSize,
  precondition,
  ts,
  uuidv7,
} from "../shared/common.js";
import type { JobWatchers } from "../jobs/watchers.js";
import { checkParameters, durationMs, parseImageReference } from "../jobs/validate.js";
import type { LeaseConfig } from "./config.js";
import { activate, bookLease } from "./lifecycle.js";
import { type Limits, type PolicyOverride, graceProblem, hostHoursOver, humanDuration, limitsFor, parseOverrides, renewEveryMs } from "./policy.js";

const MINUTE = 60_000;
const DAY = 24 * 3600_000;
/** A start this far in the past is taken as now (clocks differ); further back is refused. */
const START_SLACK_MS = MINUTE;
/** A lease's duration, or an extension, at most, whoever asks (admins are exempt from the policy, not from this). */
const MAX_SPAN_MS = 366 * DAY;
/** A calendar's window, at most. */
const MAX_CALENDAR_MS = 14 * DAY;
/** Hosts a calendar shows, at most. */
const MAX_CALENDAR_HOSTS = 1000;
const SITE = /^[a-z0-9][a-z0-9._-]{0,62}$/;

const exhausted = (message: string) => new ConnectError(message, Code.ResourceExhausted);
const iso = (d: Date) => d.toISOString();

/** What CreateLease asks for, validated. */
interface LeaseAsk {
  hostCount: number;
  tags: Record<string, string>;
  site: string | null;
  driver: string | null;
  hostNames: string[];
  durationMs: number;
  startsAt: Date | null;
  deadline: Date | null;
  image: string;
  parameters: { name: string; value: string }[];
  graceMs: number;
  description: string;
  requestId: string | null;
}

/** `hosts` says nothing beside host names (but their count, if it gives one). */
function hostsEmpty(h: HostRequirements | undefined, names: number): boolean {
  return (
    h === undefined ||
    (Object.keys(h.tags).length === 0 && (h.hostCount === 0 || h.hostCount === names) && h.site === undefined && h.driverKind === DriverKind.UNSPECIFIED)
  );
}

function timeOf(field: string, t: Timestamp | undefined): Date | null {
  if (t === undefined) return null;
  if (t.nanos < 0 || t.nanos > 999_999_999) throw invalid(`${field} has invalid nanos`);
  const d = timestampDate(t);
  if (!Number.isFinite(d.getTime()) || d.getFullYear() < 2000 || d.getFullYear() > 9999) throw invalid(`${field} is out of range`);
  return d;
}

/** The selector of a request: tags, count, site, driver (each checked as SubmitJob checks them). */
function selectorOf(field: string, h: HostRequirements | undefined): Pick<LeaseAsk, "hostCount" | "tags" | "site" | "driver"> {
  const hostCount = !h || h.hostCount === 0 ? 1 : h.hostCount;
  if (!Number.isInteger(hostCount) || hostCount < 1 || hostCount > 64) throw invalid(`${field}.host_count must be between 1 and 64`);
  const tags = checkTags(`${field}.tags`, h?.tags ?? {}, { allowSite: true });
  let site: string | null = null;
  if (h?.site !== undefined) {
    if (!SITE.test(h.site)) throw invalid(`${field}.site must match [a-z0-9][a-z0-9._-]{0,62}`);
    site = h.site;
  }
  const kind = h?.driverKind ?? DriverKind.UNSPECIFIED;
  const driver = kind === DriverKind.UNSPECIFIED ? null : driverKindName(`${field}.driver_kind`, kind);
  return { hostCount, tags, site, driver };
}

function validateCreate(req: CreateLeaseRequest, config: LeaseConfig): LeaseAsk {
  checkText("request_id", req.requestId, 64);
  let selector: Pick<LeaseAsk, "hostCount" | "tags" | "site" | "driver">;
  const hostNames = [...req.hostNames];
  if (hostNames.length > 0) {
    if (!hostsEmpty(req.hosts, hostNames.length)) throw invalid("hosts must be empty when host_names is set (or give only their count)");
    if (hostNames.length > 64) throw invalid("host_names must have at most 64 entries");
    for (const [i, n] of hostNames.entries()) {
      if (!HOST_NAME.test(n)) throw invalid(`host_names[${i}] must match [a-z0-9][a-z0-9._-]{0,62}`);
      if (hostNames.indexOf(n) !== i) throw invalid(`host_names[${i}] "${n}" is repeated`);
    }
    selector = { hostCount: hostNames.length, tags: {}, site: null, driver: null };
  } else {
    selector = selectorOf("hosts", req.hosts);
  }
  if (req.duration === undefined) throw invalid("duration is required");
  const duration = durationMs("duration", req.duration, 0, MAX_SPAN_MS);
  if (duration < MINUTE) throw invalid("duration must be at least 1 minute");
  const grace = req.gracePeriod === undefined ? config.leaseGraceDefaultMs : durationMs("grace_period", req.gracePeriod, 0, Number.MAX_SAFE_INTEGER);
  const graceWrong = graceProblem(grace, config);
  if (graceWrong !== undefined) throw invalid(graceWrong);
  const image = req.image;
  if (image !== "") parseImageReference("image", image);
  if (checkParameters("parameters", req.parameters).size > 0) throw invalid("parameters must not be secret: a lease's session job is re-created from its stored parameters");
  if (req.parameters.length > 0 && image === "") throw invalid("parameters need an image (they are the session job's)");
  return {
    ...selector,
    hostNames,
    durationMs: duration,
    startsAt: timeOf("start_time", req.startTime),
    deadline: timeOf("deadline", req.deadline),
    image,
    parameters: req.parameters.map((p) => ({ name: p.name, value: p.value })),
    graceMs: grace,
    description: checkText("description", req.description, 1000),
    requestId: req.requestId === "" ? null : req.requestId,
  };
}

export class LeaseServiceImpl implements ServiceImpl<typeof LeaseService> {
  /** The per-selector limits (loadCoordinatorConfig refused malformed ones). */
  private readonly overrides: readonly PolicyOverride[];

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: LeaseConfig,
    private readonly watchers: JobWatchers,
  ) {
    this.overrides = parseOverrides(config.leasePolicyOverrides).overrides;
  }

  /** The limits of a lease whose selector (with its site) is `tags`. */
  private limits(tags: Record<string, string>, site: string | null): Limits {
    return limitsFor(site === null ? tags : { ...tags, site }, this.overrides, this.config);
  }

  /** Lease `id` if the caller may see it (its holder, an admin); NOT_FOUND otherwise. */
  private async visibleLease(caller: UserCaller, id: string, sql: Db = this.ctx.sql, lock = false): Promise<LeaseRow> {
    checkId("lease_id", id);
    const lease = await loadLease(sql, id, { lock });
    if (!lease || (caller.role !== "admin" && lease.owner_id !== caller.userId)) throw notFound(`lease ${id} not found`);
    return lease;
  }

  private async message(sql: Db, lease: LeaseRow, timeline = false) {
    const hosts = await leaseHostsOf(sql, [lease.id]);
    return leaseMessage(lease, hosts, timeline ? await leaseEvents(sql, lease.id) : []);
  }

  private async now(sql: Db): Promise<Date> {
    const [{ now }] = await sql<{ now: Date }[]>`select now() as now`;
    return now;
  }

  /** RESOURCE_EXHAUSTED when a span of `hostCount` hosts over [from, to) would pass the user's host-hours a day. */
  private async checkHostHours(tx: Db, ownerId: string, span: { starts_at: Date; ends_at: Date; host_count: number }, limits: Limits) {
    const dayStart = new Date(Math.floor(span.starts_at.getTime() / DAY) * DAY);
    const dayEnd = new Date(Math.ceil(span.ends_at.getTime() / DAY) * DAY);
    const others = await leaseSpansOf(tx, ownerId, dayStart, dayEnd, null, limits.scope);
    const over = hostHoursOver(span, others, limits.maxHostHoursPerDay);
    if (over) {
      throw exhausted(
        `${limits.source}: at most ${limits.maxHostHoursPerDay} host-hours a day per user; ${over.day.toISOString().slice(0, 10)} would have ${over.hours.toFixed(1)}`,
      );
    }
  }

  async createLease(req: CreateLeaseRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    const ask = validateCreate(req, this.config);
    const admin = caller.role === "admin";
    const sql = this.ctx.sql;
    let digest: string | null = null;
    if (ask.image !== "") {
      const found = await imageForJob(sql, caller.userId, parseImageReference("image", ask.image));
      if (!found || !found.allowed) throw notFound(`image ${clip(ask.image)} not found`);
      digest = found.digest;
    }
    const id = uuidv7(this.ctx.clock());
    const leaseId = await sql.begin(async (tx) => {
      await lockBookings(tx);
      if (ask.requestId !== null) {
        const existing = await leaseOfRequest(tx, caller.userId, ask.requestId);
        if (existing) return existing;
      }
      const now = await this.now(tx);
      let startsAt = ask.startsAt ?? now;
      if (startsAt.getTime() < now.getTime() - START_SLACK_MS) throw invalid("start_time must not be in the past");
      if (startsAt < now) startsAt = now;
      if (startsAt.getTime() > now.getTime() + this.config.leaseHorizonMs) {
        throw invalid(`start_time must be at most ${humanDuration(this.config.leaseHorizonMs)} ahead (the lease policy's horizon)`);
      }
      const endsAt = new Date(startsAt.getTime() + ask.durationMs);
      if (ask.deadline !== null && (ask.deadline < startsAt || ask.deadline > endsAt)) {
        throw invalid(`deadline must be between the start (${iso(startsAt)}) and the end (${iso(endsAt)})`);
      }
      if (ask.hostNames.length > 0) {
        const found = await namedHosts(tx, ask.hostNames, caller.userId);
        const missing = ask.hostNames.filter((n) => !found.some((f) => f.name === n));
        if (missing.length > 0) throw notFound(`host ${missing[0]} not found`);
        const refused = found.find((f) => !f.allowed);
        if (refused) throw new ConnectError(`host ${refused.name} is not usable by you`, Code.PermissionDenied);
        // The tags all of them carry: what the policy's overrides see of such a lease.
        ask.tags = Object.fromEntries(Object.entries(found[0].tags).filter(([k, v]) => found.every((f) => f.tags[k] === v)));
      }
      const limits = this.limits(ask.tags, ask.site);
      if (!admin && ask.durationMs > limits.maxDurationMs) {
        throw exhausted(`${limits.source}: duration ${humanDuration(ask.durationMs)} is over the maximum of ${humanDuration(limits.maxDurationMs)}`);
      }
      const selector = {
        ownerId: caller.userId,
        hostCount: ask.hostCount,
        tags: ask.tags,
        site: ask.site,
        driver: ask.driver,
        hostNames: ask.hostNames,
        media: digest === null ? [] : ((await imageForJob(tx, caller.userId, { digest }))?.media_types ?? []),
      };
      const matching = await matchingHostCount(tx, selector);
      if (matching < ask.hostCount) {
        const what = ask.hostNames.length > 0 ? `hosts ${ask.hostNames.join(", ")} are` : `${matching} host${matching === 1 ? "" : "s"} in service match${matching === 1 ? "es" : ""} the selector`;
        throw precondition(
          ask.hostNames.length > 0 ? `${what} not all in service (enabled, not quarantined or retired)${digest ? " or cannot run the image" : ""}` : `${what}${digest ? " and run the image" : ""}; the lease needs ${ask.hostCount}`,
        );
      }
      if (!admin) {
        const open = await openLeaseCount(tx, caller.userId, limits.scope);
        if (open >= limits.maxConcurrent) throw exhausted(`${limits.source}: at most ${limits.maxConcurrent} lease${limits.maxConcurrent === 1 ? "" : "s"} per user at once; you have ${open}`);
        await this.checkHostHours(tx, caller.userId, { starts_at: startsAt, ends_at: endsAt, host_count: ask.hostCount }, limits);
      }
      await tx`
        insert into leases (id, owner_id, host_count, required_tags, required_site, required_driver, host_names, image, manifest_digest,
          parameters, starts_at, ends_at, deadline_at, grace_ms, keepalive_at, description, request_id)
        values (${id}, ${caller.userId}, ${ask.hostCount}, ${tx.json(ask.tags)}, ${ask.site}, ${ask.driver}, ${ask.hostNames}, ${ask.image},
          ${digest}, ${tx.json(ask.parameters)}, ${startsAt}, ${endsAt}, ${ask.deadline}, ${ask.graceMs}, ${now}, ${ask.description},
          ${ask.requestId})`;
      const what = ask.hostNames.length > 0 ? `hosts ${ask.hostNames.join(", ")}` : `${ask.hostCount} host${ask.hostCount === 1 ? "" : "s"}`;
      await recordLeaseEvents(tx, id, [{ kind: "requested", state: "requested", message: `${what} from ${iso(startsAt)} to ${iso(endsAt)}` }]);
      await audit(tx, {
        kind: "lease.create",
        actor: actorOf(caller),
        userId: caller.userId,
        message: `lease ${id} requested: ${what} from ${iso(startsAt)} to ${iso(endsAt)}`,
        details: { leaseId: id, ...ask, startsAt: iso(startsAt), endsAt: iso(endsAt), parameters: ask.parameters.map((p) => p.name) },
      });
      const lease = (await loadLease(tx, id, { lock: true }))!;
      if ((await bookLease(tx, lease, now)) && startsAt <= now) await activate(tx, this.ctx, (await loadLease(tx, id))!, actorOf(caller));
      return id;
    });
    return { lease: await this.message(sql, (await loadLease(sql, leaseId))!) };
  }

  async getLease(req: GetLeaseRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    const lease = await this.visibleLease(caller, req.leaseId);
    return { lease: await this.message(this.ctx.sql, lease, true) };
  }

  async listLeases(req: ListLeasesRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    if (req.allUsers && caller.role !== "admin") throw new ConnectError("only admins may list every user's leases", Code.PermissionDenied);
    const states = req.states.map((s, i) => {
      const name = leaseStateName(s);
      if (name === undefined) throw invalid(`states[${i}] is not a lease state`);
      return name;
    });
    const f = { owner: req.allUsers ? null : caller.userId, states: [...new Set(states)].sort() };
    const size = pageSize(req.pageSize);
    const after = decodePageToken(req.pageToken, f, 1)?.[0];
    if (after !== undefined) checkId("page_token", after);
    const sql = this.ctx.sql;
    const rows = await listLeaseRows(sql, f, after, size + 1);
    const page = rows.slice(0, size);
    const hosts = await leaseHostsOf(
      sql,
      page.map((r) => r.id),
    );
    return {
      leases: page.map((r) => leaseMessage(r, hosts)),
      nextPageToken: rows.length > size ? encodePageToken(f, [page[page.length - 1].id]) : "",
    };
  }

  /** Records a keepalive of lease `id` now; FAILED_PRECONDITION once it has ended. A keepalive after half its grace without one is noted on its timeline. */
  private async renew(tx: Db, id: string, how: string): Promise<void> {
    const [row] = await tx<{ state: LeaseStateName; end_reason: string | null; status_message: string; silent_ms: number; grace_ms: number }[]>`
      with old as (select id, keepalive_at from leases where id = ${id} for update)
      update leases l set keepalive_at = case when l.state = 'ended' then l.keepalive_at else now() end
      from old where l.id = old.id
      returning l.state, l.end_reason, l.status_message, l.grace_ms,
        extract(epoch from (now() - greatest(old.keepalive_at, l.starts_at))) * 1000 as silent_ms`;
    if (!row) throw notFound(`lease ${id} not found`);
    if (row.state === "ended") {
      throw precondition(`lease ${id} has ended (${row.end_reason}${row.status_message ? `: ${row.status_message}` : ""})`);
    }
    if (row.silent_ms > row.grace_ms / 2) {
      await recordLeaseEvents(tx, id, [{ kind: "keepalive", state: row.state, message: `keepalive resumed (${how}) after ${humanDuration(row.silent_ms)} without one` }]);
    }
  }

  async renewLease(req: RenewLeaseRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    const sql = this.ctx.sql;
    const lease = await sql.begin(async (tx) => {
      const l = await this.visibleLease(caller, req.leaseId, tx);
      await this.renew(tx, l.id, "RenewLease");
      return (await loadLease(tx, l.id))!;
    });
    return { lease: await this.message(sql, lease) };
  }

  async *watchLease(req: WatchLeaseRequest, hctx: HandlerContext): AsyncIterable<WatchLeaseResponse> {
    const caller = requireUser(hctx);
    const sql = this.ctx.sql;
    const first = await this.visibleLease(caller, req.leaseId);
    const id = first.id;
    const changes = new AsyncQueue<string>();
    const unsubscribe = this.watchers.subscribe(id, (leaseId) => {
      if (changes.size === 0) changes.push(leaseId);
    });
    const onAbort = () => changes.end();
    hctx.signal.addEventListener("abort", onAbort, { once: true });
    let timer: NodeJS.Timeout | undefined;
    const log = this.ctx.logger.child({ subsystem: "leases", leaseId: id });
    try {
      // A lease that ended meanwhile is streamed as it is, without a keepalive.
      const kept =
        req.keepalive &&
        first.state !== "ended" &&
        (await sql
          .begin(async (tx) => {
            await this.renew(tx, id, "WatchLease");
            await recordLeaseEvents(tx, id, [{ kind: "keepalive", state: first.state, message: `keepalive stream opened by ${caller.name}` }]);
            return true;
          })
          .catch((err: unknown) => {
            if (err instanceof ConnectError && err.code === Code.FailedPrecondition) return false;
            throw err;
          }));
      if (kept) {
        timer = setInterval(() => {
          sql.begin((tx) => this.renew(tx, id, "WatchLease")).catch((err: unknown) => {
            if (err instanceof ConnectError) changes.push(id);
            else log.warn({ err }, "lease keepalive failed");
          });
        }, renewEveryMs(first.grace_ms, this.config));
        timer.unref?.();
      }
      let seq = "0";
      let stamp = "";
      const next = async (): Promise<{ message?: WatchLeaseResponse; ended: boolean }> => {
        const lease = await loadLease(sql, id);
        if (!lease) throw notFound(`lease ${id} not found`);
        const events = await leaseEvents(sql, id, seq);
        if (events.length > 0) seq = events[events.length - 1].seq;
        const message = await this.message(sql, lease);
        const now = `${lease.state}|${lease.status_message}|${lease.ends_at.getTime()}|${message.leaseHosts.map((h) => h.jobId).join(",")}`;
        const ended = lease.state === "ended";
        if (events.length === 0 && now === stamp) return { ended };
        stamp = now;
        return { message: create(WatchLeaseResponseSchema, { lease: message, events: events.map(leaseEventMessage) }), ended };
      };
      let out = await next();
      if (out.message) yield out.message;
      if (out.ended) return;
      for await (const _ of changes) {
        out = await next();
        if (out.message) yield out.message;
        if (out.ended) return;
      }
      if (hctx.signal.aborted) return;
      throw new ConnectError("coordinator replica shutting down", Code.Unavailable);
    } finally {
      clearInterval(timer);
      unsubscribe();
      hctx.signal.removeEventListener("abort", onAbort);
      if (timer !== undefined) {
        // Says on the timeline that the keepalive stopped; the keeper ends the lease LOST after its grace unless it resumes.
        await sql
          .begin(async (tx) => {
            const l = await loadLease(tx, id);
            if (!l || l.state === "ended") return;
            const message = `keepalive stream closed; lost after ${humanDuration(first.grace_ms)} without a keepalive`;
            await recordLeaseEvents(tx, id, [{ kind: "keepalive", state: l.state, message }]);
          })
          .catch((err: unknown) => log.warn({ err }, "could not record the end of a keepalive stream"));
      }
    }
  }

  async extendLease(req: ExtendLeaseRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    checkId("lease_id", req.leaseId);
    checkText("request_id", req.requestId, 64);
    if (req.by === undefined) throw invalid("by is required");
    const by = durationMs("by", req.by, 0, MAX_SPAN_MS);
    const sql = this.ctx.sql;
    const lease = await sql.begin(async (tx) => {
      await lockBookings(tx);
      // Its session job's row (moveLeaseEnd changes its timeout) before the lease's: the lock order.
      await lockLeaseJobs(tx, (await this.visibleLease(caller, req.leaseId, tx)).id);
      const l = await this.visibleLease(caller, req.leaseId, tx, true);
      if (req.requestId !== "") {
        if (await leaseRequestDone(tx, l.id, req.requestId)) return l;
      }
      if (l.state === "ended") throw precondition(`lease ${l.id} has ended (${l.end_reason}${l.status_message ? `: ${l.status_message}` : ""})`);
      const endsAt = new Date(l.ends_at.getTime() + by);
      const limit = (max: Date, reason: string, code: Code) =>
        new ConnectError(`${reason}: the lease can end at ${iso(max)} at the latest`, code, undefined, [
          { desc: LeaseExtensionLimitSchema, value: { maxEndTime: ts(max), reason } },
        ]);
      const limits = this.limits(l.required_tags, l.required_site);
      if (caller.role !== "admin" && endsAt.getTime() - l.starts_at.getTime() > limits.maxDurationMs) {
        const max = new Date(l.starts_at.getTime() + limits.maxDurationMs);
        throw limit(max, `${limits.source}: at most ${humanDuration(limits.maxDurationMs)} from its start`, Code.ResourceExhausted);
      }
      const next = await nextBookingAfter(tx, l.id, l.ends_at);
      if (next && next.starts_at < endsAt) {
        throw limit(next.starts_at, `host ${next.host_name} is booked from ${iso(next.starts_at)}`, Code.FailedPrecondition);
      }
      if (caller.role !== "admin") {
        await this.checkHostHours(tx, l.owner_id, { starts_at: l.ends_at, ends_at: endsAt, host_count: l.host_count }, limits);
      }
      await moveLeaseEnd(tx, l, endsAt);
      await recordLeaseEvents(tx, l.id, [
        { kind: "extended", state: l.state, message: `extended by ${humanDuration(by)} to ${iso(endsAt)} by ${caller.name}`, requestId: req.requestId || null },
      ]);
      await audit(tx, {
        kind: "lease.extend",
        actor: actorOf(caller),
        userId: l.owner_id,
        message: `lease ${l.id} extended by ${humanDuration(by)} to ${iso(endsAt)}`,
        details: { leaseId: l.id, byMs: by, endsAt: iso(endsAt), requestId: req.requestId || undefined },
      });
      return (await loadLease(tx, l.id))!;
    });
    return { lease: await this.message(sql, lease) };
  }

  async releaseLease(req: ReleaseLeaseRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    const sql = this.ctx.sql;
    const lease = await sql.begin(async (tx) => {
      const l = await this.visibleLease(caller, req.leaseId, tx);
      await endLease(tx, l.id, { reason: "released", message: `released by ${caller.name}`, actor: actorOf(caller) });
      return (await loadLease(tx, l.id))!;
    });
    return { lease: await this.message(sql, lease) };
  }

  async revokeLease(req: RevokeLeaseRequest, hctx: HandlerContext) {
    const caller = requireAdmin(hctx);
    checkId("lease_id", req.leaseId);
    if (req.reason.trim() === "") throw invalid("reason is required");
    const reason = checkText("reason", req.reason, 1000);
    const sql = this.ctx.sql;
    const lease = await sql.begin(async (tx) => {
      const l = await this.visibleLease(caller, req.leaseId, tx);
      await endLease(tx, l.id, { reason: "revoked", message: `revoked by admin ${caller.name}: ${reason}`, actor: actorOf(caller), revokedBy: caller.userId });
      return (await loadLease(tx, l.id))!;
    });
    return { lease: await this.message(sql, lease) };
  }

  async getLeaseCalendar(req: GetLeaseCalendarRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    const hosts = req.hosts;
    if (hosts !== undefined && hosts.hostCount !== 0) throw invalid("hosts.host_count must be 0: the calendar shows every matching host");
    const selector = selectorOf("hosts", hosts);
    const sql = this.ctx.sql;
    const from = timeOf("from", req.from) ?? (await this.now(sql));
    const to = timeOf("to", req.to) ?? new Date(from.getTime() + 2 * DAY);
    if (to <= from) throw invalid("to must be after from");
    if (to.getTime() - from.getTime() > MAX_CALENDAR_MS) throw invalid("the window (from to to) must be at most 14 days");
    const rows = await calendarRows(sql, { tags: selector.tags, site: selector.site, driver: selector.driver, viewer: caller.userId }, from, to, MAX_CALENDAR_HOSTS);
    const byHost = new Map<string, { hostId: string; hostName: string; entries: object[] }>();
    for (const r of rows) {
      let host = byHost.get(r.host_id);
      if (!host) byHost.set(r.host_id, (host = { hostId: r.host_id, hostName: r.host_name, entries: [] }));
      if (r.kind === null) continue;
      host.entries.push({
        id: r.private ? "" : (r.id ?? ""),
        kind: r.kind,
        ownerUsername: r.private ? "" : (r.owner_username ?? ""),
        startTime: ts(r.starts_at),
        endTime: ts(r.ends_at),
        leaseState: leaseStateEnum(r.lease_state),
      });
    }
    return { hosts: [...byHost.values()], from: ts(from), to: ts(to) };
  }
}
