import { create, equals } from "@bufbuild/protobuf";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import type { TransactionSql } from "postgres";
import { type Host, HostAdminState, HostSchema } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import {
  type CreateHostRequest,
  type DeleteHostRequest,
  type GetHostRequest,
  type GetHostStatsRequest,
  HostChangeKind,
  type HostService,
  type ListHostsRequest,
  type UpdateHostRequest,
  type WatchHostsRequest,
  type WatchHostsResponse,
  WatchHostsResponseSchema,
} from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { actorOf } from "../audit.js";
import { audit } from "../db/queries/audit.js";
import { hashSecret, newSecret, requireAdmin, requireUser } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import {
  checkId,
  checkMediaTypes,
  checkPattern,
  checkTags,
  checkText,
  decodePageToken,
  encodePageToken,
  exists,
  HOST_NAME,
  invalid,
  isUniqueViolation,
  notFound,
  pageSize,
  precondition,
  uuidv7,
} from "../shared/common.js";
import {
  adminStateName,
  driverKindName,
  type HostConditions,
  hostColumns,
  hostConditions,
  hostMessage,
  type HostRow,
  hostWhere,
  notifyHost,
} from "../db/queries/hosts.js";
import type { HostWatchHub } from "./host-watch.js";
import { hostStats } from "./host-stats.js";

const HOST_NAME_SHAPE = "[a-z0-9][a-z0-9._-]{0,62}";
const UPDATABLE = new Set(["name", "tags", "media_types", "site", "capacity", "admin_state", "admin_state_reason"]);
/** Hosts a WatchHosts snapshot sends at most (a testbed has hundreds). */
const WATCH_MAX_HOSTS = 100_000;

function checkSite(field: string, site: string): string {
  return site === "" ? "" : checkPattern(field, site, HOST_NAME, `${HOST_NAME_SHAPE} or be empty`);
}

function checkCapacity(field: string, capacity: number): number {
  if (!Number.isInteger(capacity) || capacity < 1 || capacity > 1024) throw invalid(`${field} must be 1 to 1024`);
  return capacity;
}

/** Tells the scheduler that hosts may now take jobs they could not before. */
async function wakeScheduler(tx: TransactionSql) {
  await tx`select pg_notify('treadmill_schedule', 'hosts')`;
}

/**
 * HostService: admins create, change and delete hosts; every user reads and
 * watches them. Online and last-seen come from the supervisor stream's
 * columns (attached_replica, last_seen_at), written by the job system.
 */
export class HostServiceImpl implements ServiceImpl<typeof HostService> {
  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly hub: HostWatchHub,
  ) {}

  async createHost(req: CreateHostRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const name = checkPattern("name", req.name, HOST_NAME, HOST_NAME_SHAPE);
    const tags = checkTags("tags", req.tags);
    const driverKind = driverKindName("driver_kind", req.driverKind);
    const mediaTypes = checkMediaTypes("media_types", req.mediaTypes, { required: true });
    const site = checkSite("site", req.site);
    const capacity = req.capacity === 0 ? 1 : checkCapacity("capacity", req.capacity);
    const adminState = req.adminState === HostAdminState.UNSPECIFIED ? "enabled" : adminStateName("admin_state", req.adminState);
    const id = uuidv7(this.ctx.clock());
    const credential = newSecret("host");
    const now = new Date(this.ctx.clock());
    try {
      return await this.ctx.sql.begin(async (tx) => {
        await tx`
          insert into hosts (id, name, tags, driver_kind, media_types, site, capacity, admin_state, credential_hash, created_at, updated_at)
          values (${id}, ${name}, ${tx.json(tags)}, ${driverKind}, ${mediaTypes}, ${site}, ${capacity}, ${adminState},
                  ${hashSecret(credential)}, ${now}, ${now})`;
        await audit(tx, {
          kind: "host.create",
          actor: actorOf(caller),
          hostId: id,
          message: `host ${name} created`,
          details: { name, tags, driverKind, mediaTypes, site, capacity, adminState },
        });
        await notifyHost(tx, id);
        await wakeScheduler(tx);
        return { host: await this.load(tx, id), credential };
      });
    } catch (err) {
      if (isUniqueViolation(err)) throw exists(`host ${name} already exists`);
      throw err;
    }
  }

  async listHosts(req: ListHostsRequest, context: HandlerContext) {
    requireUser(context);
    const conditions = hostConditions(req.filter);
    const size = pageSize(req.pageSize);
    const after = decodePageToken(req.pageToken, conditions, 1);
    const sql = this.ctx.sql;
    const rows = await sql<HostRow[]>`
      select ${hostColumns(sql)} from hosts h
      where ${hostWhere(sql, conditions)} ${after ? sql`and h.name > ${after[0]}` : sql``}
      order by h.name limit ${size + 1}`;
    const page = rows.slice(0, size);
    return {
      hosts: page.map(hostMessage),
      nextPageToken: rows.length > size ? encodePageToken(conditions, [page[page.length - 1].name]) : "",
    };
  }

  async getHost(req: GetHostRequest, context: HandlerContext) {
    requireUser(context);
    return { host: hostMessage(await this.find(req.host)) };
  }

  async getHostStats(req: GetHostStatsRequest, context: HandlerContext) {
    requireUser(context);
    return hostStats(this.ctx.sql, await this.find(req.host), this.ctx.clock());
  }

  async updateHost(req: UpdateHostRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const hostId = checkId("host_id", req.hostId);
    const paths = req.updateMask?.paths ?? [];
    if (paths.length > UPDATABLE.size * 2) throw invalid("update_mask has too many paths");
    for (const p of paths) if (!UPDATABLE.has(p)) throw invalid(`update_mask path "${p.slice(0, 64)}" is not one of ${[...UPDATABLE].join(", ")}`);
    if (paths.length === 0 && !req.rotateCredential) throw invalid("update_mask or rotate_credential is required");
    const h = req.host ?? create(HostSchema);
    const set: Record<string, unknown> = {};
    const mask = new Set(paths);
    if (mask.has("name")) set.name = checkPattern("host.name", h.name, HOST_NAME, HOST_NAME_SHAPE);
    if (mask.has("tags")) set.tags = checkTags("host.tags", h.tags);
    if (mask.has("media_types")) set.media_types = checkMediaTypes("host.media_types", h.mediaTypes, { required: true });
    if (mask.has("site")) set.site = checkSite("host.site", h.site);
    if (mask.has("capacity")) set.capacity = checkCapacity("host.capacity", h.capacity);
    if (mask.has("admin_state")) set.admin_state = adminStateName("host.admin_state", h.adminState);
    if (mask.has("admin_state_reason")) set.admin_state_reason = checkText("host.admin_state_reason", h.adminStateReason, 1024);
    const credential = req.rotateCredential ? newSecret("host") : undefined;
    const now = new Date(this.ctx.clock());
    try {
      return await this.ctx.sql.begin(async (tx) => {
        const [before] = await tx<HostRow[]>`select ${hostColumns(tx)} from hosts h where h.id = ${hostId} for update of h`;
        if (!before) throw notFound(`host ${hostId} not found`);
        const keep = (column: string) => tx`${tx(column)}`;
        await tx`
          update hosts set
            name = ${(set.name as string | undefined) ?? keep("name")},
            tags = ${set.tags !== undefined ? tx.json(set.tags as never) : keep("tags")},
            media_types = ${(set.media_types as string[] | undefined) ?? keep("media_types")},
            site = ${(set.site as string | undefined) ?? keep("site")},
            capacity = ${(set.capacity as number | undefined) ?? keep("capacity")},
            admin_state = ${(set.admin_state as string | undefined) ?? keep("admin_state")},
            admin_state_reason = ${(set.admin_state_reason as string | undefined) ?? keep("admin_state_reason")},
            credential_hash = ${credential !== undefined ? hashSecret(credential) : keep("credential_hash")},
            updated_at = ${now}
          where id = ${hostId}`;
        const changes = Object.fromEntries(
          Object.entries(set).filter(([key, value]) => JSON.stringify(value) !== JSON.stringify((before as unknown as Record<string, unknown>)[key])),
        );
        await audit(tx, {
          kind: "host.update",
          actor: actorOf(caller),
          hostId,
          message: `host ${before.name} changed`,
          details: { changes, ...(credential !== undefined ? { credentialRotated: true } : {}) },
        });
        await notifyHost(tx, hostId);
        await wakeScheduler(tx);
        return { host: await this.load(tx, hostId), credential };
      });
    } catch (err) {
      if (isUniqueViolation(err)) throw exists(`host ${String(set.name)} already exists`);
      throw err;
    }
  }

  async deleteHost(req: DeleteHostRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const hostId = checkId("host_id", req.hostId);
    return this.ctx.sql.begin(async (tx) => {
      const [host] = await tx<HostRow[]>`select ${hostColumns(tx)} from hosts h where h.id = ${hostId} for update of h`;
      if (!host) throw notFound(`host ${hostId} not found`);
      if (host.current_job_ids.length > 0) {
        throw precondition(`host ${host.name} still has ${host.current_job_ids.length} job(s) not finalized; drain it first`);
      }
      await tx`delete from hosts where id = ${hostId}`;
      await audit(tx, { kind: "host.delete", actor: actorOf(caller), hostId, message: `host ${host.name} deleted`, details: { name: host.name } });
      await notifyHost(tx, hostId);
      return {};
    });
  }

  async *watchHosts(req: WatchHostsRequest, context: HandlerContext): AsyncGenerator<WatchHostsResponse> {
    requireUser(context);
    const conditions = hostConditions(req.filter);
    const subscription = await this.hub.subscribe(context.signal);
    try {
      const known = new Map<string, Host>();
      // Subscribed before the snapshot: a change during it is seen afterwards.
      for (const host of await this.query(conditions)) {
        known.set(host.id, host);
        yield create(WatchHostsResponseSchema, { kind: HostChangeKind.EXISTING, host });
      }
      yield create(WatchHostsResponseSchema, { kind: HostChangeKind.SYNCED });
      for await (const batch of subscription) {
        if (batch === "all") {
          // The listen connection was re-established: notifications may be lost, diff everything.
          const now = new Map((await this.query(conditions)).map((h) => [h.id, h]));
          for (const id of new Set([...known.keys(), ...now.keys()])) {
            const change = diff(known, id, now.get(id));
            if (change) yield change;
          }
          continue;
        }
        for (const id of batch) {
          const [host] = await this.query(conditions, id);
          const change = diff(known, id, host);
          if (change) yield change;
        }
      }
    } finally {
      subscription.close();
    }
  }

  private async query(c: HostConditions, id?: string): Promise<Host[]> {
    const sql = this.ctx.sql;
    const rows = await sql<HostRow[]>`
      select ${hostColumns(sql)} from hosts h
      where ${hostWhere(sql, c)} ${id !== undefined ? sql`and h.id = ${id}` : sql``}
      order by h.name limit ${WATCH_MAX_HOSTS}`;
    return rows.map(hostMessage);
  }

  /** The host a request names by id or by name; InvalidArgument, NotFound. */
  private async find(ref: GetHostRequest["host"]): Promise<HostRow> {
    const sql = this.ctx.sql;
    let where;
    if (ref.case === "hostId") where = sql`h.id = ${checkId("host_id", ref.value)}`;
    else if (ref.case === "name") where = sql`h.name = ${checkPattern("name", ref.value, HOST_NAME, HOST_NAME_SHAPE)}`;
    else throw invalid("host_id or name is required");
    const [row] = await sql<HostRow[]>`select ${hostColumns(sql)} from hosts h where ${where}`;
    if (!row) throw notFound(`host ${ref.value} not found`);
    return row;
  }

  private async load(tx: TransactionSql, id: string): Promise<Host> {
    const [row] = await tx<HostRow[]>`select ${hostColumns(tx)} from hosts h where h.id = ${id}`;
    return hostMessage(row);
  }
}

/** The WatchHosts message for host `id` now being `host` (undefined: gone or not matching); updates `known`. */
function diff(known: Map<string, Host>, id: string, host: Host | undefined): WatchHostsResponse | undefined {
  const before = known.get(id);
  if (host === undefined) {
    if (before === undefined) return undefined;
    known.delete(id);
    return create(WatchHostsResponseSchema, { kind: HostChangeKind.DELETED, host: before });
  }
  known.set(id, host);
  if (before === undefined) return create(WatchHostsResponseSchema, { kind: HostChangeKind.CREATED, host });
  // Changes of last_seen_time alone are not sent.
  const comparable = (h: Host) => create(HostSchema, { ...h, lastSeenTime: undefined });
  if (equals(HostSchema, comparable(before), comparable(host))) return undefined;
  return create(WatchHostsResponseSchema, { kind: HostChangeKind.UPDATED, host });
}

