import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import type { Fragment, Sql, TransactionSql } from "postgres";
import {
  type DeregisterRequest,
  type HeartbeatRequest,
  type ListServicesRequest,
  RegisteredServiceSchema,
  type RegisterRequest,
  type RegistryService,
  ServiceKind,
  type ServiceStatus,
} from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { actorOf } from "../audit.js";
import { audit } from "../db/queries/audit.js";
import { callerKey, requireService } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import {
  checkId,
  checkPattern,
  checkText,
  decodePageToken,
  durationOf,
  encodePageToken,
  HOST_NAME,
  invalid,
  notFound,
  pageSize,
  ts,
  uuidv7,
} from "../shared/common.js";

const KINDS: Record<number, string> = {
  [ServiceKind.IMAGE_STORE]: "image_store",
  [ServiceKind.IMAGE_CACHE]: "image_cache",
  [ServiceKind.LOG_SERVER]: "log_server",
  [ServiceKind.PROXY]: "proxy",
};

/**
 * A registration `s` (a `services` row) is live: heard from within three of
 * its heartbeat intervals and not draining. The job system assigns only live
 * registrations; a store, cache, log server or proxy that stops heartbeating
 * drops out by itself.
 */
export function liveCondition(sql: Sql | TransactionSql, nowMs: number, alias = "s"): Fragment {
  if (!/^[a-z_][a-z0-9_]*$/.test(alias)) throw new Error(`bad alias ${alias}`);
  return sql`(${sql.unsafe(alias)}.last_heartbeat_at > ${new Date(nowMs)}::timestamptz - make_interval(secs => 3 * ${sql.unsafe(alias)}.heartbeat_interval_ms / 1000.0)
    and not ${sql.unsafe(alias)}.draining)`;
}

function checkUrl(field: string, value: string): string {
  if (value === "") throw invalid(`${field} is required`);
  if (value.length > 2048) throw invalid(`${field} must be at most 2048 characters`);
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw invalid(`${field} must be an absolute http or https url`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") throw invalid(`${field} must be an http or https url`);
  if (url.username !== "" || url.password !== "") throw invalid(`${field} must not contain credentials`);
  if (url.search !== "" || url.hash !== "") throw invalid(`${field} must not have a query or fragment`);
  return value.replace(/\/+$/, "");
}

/** A proxy's TCP entrance: `host:port`, or `host:low-high` for a range of ports handed out per session. */
function checkTcpAddress(value: string): void {
  if (value === "") return;
  const m = /^([A-Za-z0-9.:[\]-]+):(\d{1,5})(?:-(\d{1,5}))?$/.exec(value);
  const low = Number(m?.[2]);
  const high = m?.[3] === undefined ? low : Number(m[3]);
  if (!m || low < 1 || high > 65535 || low > high) throw invalid("tcp_address must be host:port or host:low-high with ports 1-65535, low <= high");
}

function checkStatus(status: ServiceStatus | undefined) {
  const s = status ?? { capacityBytes: 0n, freeBytes: 0n, activeStreams: 0, draining: false };
  if (s.capacityBytes < 0n) throw invalid("status.capacity_bytes must not be negative");
  if (s.freeBytes < 0n) throw invalid("status.free_bytes must not be negative");
  if (s.activeStreams < 0) throw invalid("status.active_streams must not be negative");
  return { capacity: s.capacityBytes.toString(), free: s.freeBytes.toString(), streams: s.activeStreams, draining: s.draining };
}

/** The calling admin or service (ListServices); Unauthenticated without a credential, PermissionDenied for anyone else. */
function requireAdminOrService(ctx: HandlerContext): void {
  const caller = ctx.values.get(callerKey);
  if (caller === undefined) throw new ConnectError("this call needs an admin's api token or a service credential", Code.Unauthenticated);
  if (caller.kind === "service" || (caller.kind === "user" && caller.role === "admin")) return;
  throw new ConnectError("this call is for admins and services only", Code.PermissionDenied);
}

interface ServiceRow {
  id: string;
  kind: string;
  url: string;
  site: string;
  version: string;
  tcp_address: string;
  capacity: string;
  free_bytes: string;
  active_streams: number;
  draining: boolean;
  live: boolean;
  last_heartbeat_at: Date;
  created_at: Date;
}

/**
 * RegistryService: stores, caches, log servers and proxies register with a
 * service credential (an API token of scope service) and heartbeat; admins
 * and services list the registrations.
 */
export class RegistryServiceImpl implements ServiceImpl<typeof RegistryService> {
  constructor(private readonly ctx: CoordinatorContext) {}

  async register(req: RegisterRequest, context: HandlerContext) {
    const caller = requireService(context);
    const kind = KINDS[req.kind];
    if (kind === undefined) throw invalid("kind must be a known SERVICE_KIND");
    const url = checkUrl("url", req.url);
    const site = req.site === "" ? "" : checkPattern("site", req.site, HOST_NAME, "[a-z0-9][a-z0-9._-]{0,62} or be empty");
    if (kind === "image_cache" && site === "") throw invalid("site is required for an image cache");
    checkText("version", req.version, 128);
    checkText("tcp_address", req.tcpAddress, 256);
    checkTcpAddress(req.tcpAddress);
    const status = checkStatus(req.status);
    const intervalMs = this.ctx.config.serviceHeartbeatMs;
    const now = new Date(this.ctx.clock());
    return this.ctx.sql.begin(async (tx) => {
      const [row] = await tx<{ id: string; created: boolean }[]>`
        insert into services (id, kind, url, site, capacity, version, tcp_address, free_bytes, active_streams, draining,
                              heartbeat_interval_ms, token_id, created_at, last_heartbeat_at)
        values (${uuidv7(this.ctx.clock())}, ${kind}, ${url}, ${site}, ${status.capacity}::bigint, ${req.version}, ${req.tcpAddress},
                ${status.free}::bigint, ${status.streams}, ${status.draining}, ${intervalMs}, ${caller.tokenId}, ${now}, ${now})
        on conflict (kind, url) do update set
          site = excluded.site, capacity = excluded.capacity, version = excluded.version, tcp_address = excluded.tcp_address,
          free_bytes = excluded.free_bytes, active_streams = excluded.active_streams, draining = excluded.draining,
          heartbeat_interval_ms = excluded.heartbeat_interval_ms, token_id = excluded.token_id,
          last_heartbeat_at = excluded.last_heartbeat_at
        returning id, (xmax = 0) as created`;
      // A log server or proxy coming (back) may let waiting jobs be assigned.
      if (kind === "log_server" || kind === "proxy") await tx`select pg_notify('treadmill_schedule', '')`;
      await audit(tx, {
        kind: row.created ? "service.register" : "service.reregister",
        actor: actorOf(caller),
        message: `${kind} ${url} registered`,
        details: { serviceId: row.id, kind, url, site, version: req.version },
      });
      return { serviceId: row.id, heartbeatInterval: durationOf(intervalMs) };
    });
  }

  async heartbeat(req: HeartbeatRequest, context: HandlerContext) {
    requireService(context);
    const id = checkId("service_id", req.serviceId);
    const status = checkStatus(req.status);
    const sql = this.ctx.sql;
    const now = this.ctx.clock();
    const intervalMs = this.ctx.config.serviceHeartbeatMs;
    // An expired registration is refused (NotFound) so the service registers anew.
    const [row] = await sql`
      update services s set
        capacity = ${status.capacity}::bigint, free_bytes = ${status.free}::bigint, active_streams = ${status.streams},
        draining = ${status.draining}, heartbeat_interval_ms = ${intervalMs}, last_heartbeat_at = ${new Date(now)}
      where id = ${id}
        and s.last_heartbeat_at > ${new Date(now)}::timestamptz - make_interval(secs => 3 * s.heartbeat_interval_ms / 1000.0)
      returning id`;
    if (!row) throw notFound(`registration ${id} not found or expired; register again`);
    return { heartbeatInterval: durationOf(intervalMs) };
  }

  async deregister(req: DeregisterRequest, context: HandlerContext) {
    const caller = requireService(context);
    const id = checkId("service_id", req.serviceId);
    await this.ctx.sql.begin(async (tx) => {
      // The row stays (expired), so a later Register of the same kind and url
      // gets the same id back and the catalog's locations stay valid.
      const [row] = await tx<{ kind: string; url: string }[]>`
        update services set last_heartbeat_at = to_timestamp(0), draining = true
        where id = ${id} and last_heartbeat_at > to_timestamp(0) returning kind, url`;
      if (row) {
        await audit(tx, {
          kind: "service.deregister",
          actor: actorOf(caller),
          message: `${row.kind} ${row.url} deregistered`,
          details: { serviceId: id },
        });
      }
    });
    return {};
  }

  async listServices(req: ListServicesRequest, context: HandlerContext) {
    requireAdminOrService(context);
    const kind = req.kind === ServiceKind.UNSPECIFIED ? undefined : KINDS[req.kind];
    if (req.kind !== ServiceKind.UNSPECIFIED && kind === undefined) throw invalid("kind must be a known SERVICE_KIND or unspecified");
    const size = pageSize(req.pageSize);
    const filters = { kind: kind ?? "", liveOnly: req.liveOnly };
    const after = decodePageToken(req.pageToken, filters, 1);
    if (after) checkId("page_token", after[0]);
    const sql = this.ctx.sql;
    const now = this.ctx.clock();
    const rows = await sql<ServiceRow[]>`
      select s.id, s.kind, s.url, s.site, s.version, s.tcp_address, s.capacity::text as capacity, s.free_bytes::text as free_bytes,
        s.active_streams, s.draining, ${liveCondition(sql, now)} as live, s.last_heartbeat_at, s.created_at
      from services s
      where true
        ${kind ? sql`and s.kind = ${kind}` : sql``}
        ${req.liveOnly ? sql`and ${liveCondition(sql, now)}` : sql``}
        ${after ? sql`and s.id > ${after[0]}::uuid` : sql``}
      order by s.id limit ${size + 1}`;
    const page = rows.slice(0, size);
    const last = page.at(-1);
    const kindOf = Object.fromEntries(Object.entries(KINDS).map(([k, v]) => [v, Number(k) as ServiceKind]));
    return {
      services: page.map((r) =>
        create(RegisteredServiceSchema, {
          serviceId: r.id,
          kind: kindOf[r.kind] ?? ServiceKind.UNSPECIFIED,
          url: r.url,
          site: r.site,
          version: r.version,
          tcpAddress: r.tcp_address,
          status: { capacityBytes: BigInt(r.capacity), freeBytes: BigInt(r.free_bytes), activeStreams: r.active_streams, draining: r.draining },
          live: r.live,
          lastHeartbeatTime: ts(r.last_heartbeat_at),
          createTime: ts(r.created_at),
        }),
      ),
      nextPageToken: rows.length > size && last ? encodePageToken(filters, [last.id]) : "",
    };
  }
}
