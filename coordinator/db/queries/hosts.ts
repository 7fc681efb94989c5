/** Hosts as stored (migrations 0001, 0003) and as protobuf messages: shared by HostService and the job system. */
import { create } from "@bufbuild/protobuf";
import type { Fragment, Sql, TransactionSql } from "postgres";
import { DriverKind, type Host, HostAdminState, HostSchema } from "../../../gen/treadmill/coordinator/v1/host_pb.js";
import type { HostFilter } from "../../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { checkPattern, checkTags, HOST_NAME, invalid, ts } from "../../shared/common.js";

type Db = Sql | TransactionSql;

export const DRIVER_KINDS: Record<string, DriverKind> = {
  process: DriverKind.PROCESS,
  board: DriverKind.BOARD,
  qemu: DriverKind.QEMU,
};
export const ADMIN_STATES: Record<string, HostAdminState> = {
  enabled: HostAdminState.ENABLED,
  draining: HostAdminState.DRAINING,
  disabled: HostAdminState.DISABLED,
};

export function driverKindName(field: string, kind: DriverKind): string {
  const name = Object.keys(DRIVER_KINDS).find((k) => DRIVER_KINDS[k] === kind);
  if (name === undefined) throw invalid(`${field} must be DRIVER_KIND_PROCESS, DRIVER_KIND_BOARD or DRIVER_KIND_QEMU`);
  return name;
}

export function adminStateName(field: string, state: HostAdminState): string {
  const name = Object.keys(ADMIN_STATES).find((k) => ADMIN_STATES[k] === state);
  if (name === undefined) throw invalid(`${field} must be ENABLED, DRAINING or DISABLED`);
  return name;
}

export interface HostRow {
  id: string;
  name: string;
  tags: Record<string, string>;
  driver_kind: string;
  media_types: string[];
  site: string;
  capacity: number;
  admin_state: string;
  admin_state_reason: string;
  attached_replica: string | null;
  last_seen_at: Date | null;
  supervisor_version: string;
  created_at: Date;
  updated_at: Date;
  current_job_ids: string[];
}

export const hostColumns = (sql: Db) => sql`
  h.id, h.name, h.tags, h.driver_kind, h.media_types, h.site, h.capacity, h.admin_state, h.admin_state_reason,
  h.attached_replica, h.last_seen_at, h.supervisor_version, h.created_at, h.updated_at,
  coalesce((select array_agg(distinct jh.job_id::text) from job_hosts jh join jobs j on j.id = jh.job_id and j.attempt = jh.attempt
            where jh.host_id = h.id and j.state <> 'finalized'), '{}') as current_job_ids`;

export function hostMessage(row: HostRow): Host {
  return create(HostSchema, {
    id: row.id,
    name: row.name,
    tags: row.tags,
    driverKind: DRIVER_KINDS[row.driver_kind] ?? DriverKind.UNSPECIFIED,
    mediaTypes: row.media_types,
    site: row.site,
    capacity: row.capacity,
    adminState: ADMIN_STATES[row.admin_state] ?? HostAdminState.UNSPECIFIED,
    adminStateReason: row.admin_state_reason,
    online: row.attached_replica !== null,
    lastSeenTime: ts(row.last_seen_at),
    currentJobIds: [...row.current_job_ids].sort(),
    supervisorVersion: row.supervisor_version,
    createTime: ts(row.created_at),
    updateTime: ts(row.updated_at),
  });
}

/** Validated filter of ListHosts and WatchHosts. */
export interface HostConditions {
  tags: Record<string, string>;
  site?: string;
  adminState?: string;
  online?: boolean;
  driverKind?: string;
}

export function hostConditions(filter: HostFilter | undefined): HostConditions {
  if (!filter) return { tags: {} };
  const out: HostConditions = { tags: checkTags("filter.tags", filter.tags, { allowSite: true }) };
  if (filter.site !== undefined && filter.site !== "") out.site = checkPattern("filter.site", filter.site, HOST_NAME, "[a-z0-9][a-z0-9._-]{0,62}");
  else if (filter.site === "") out.site = "";
  if (filter.adminState !== HostAdminState.UNSPECIFIED) out.adminState = adminStateName("filter.admin_state", filter.adminState);
  if (filter.online !== undefined) out.online = filter.online;
  if (filter.driverKind !== DriverKind.UNSPECIFIED) out.driverKind = driverKindName("filter.driver_kind", filter.driverKind);
  return out;
}

/** The conditions as a WHERE fragment over `h` (the tag `site` matches the host's site). */
export function hostWhere(sql: Db, c: HostConditions): Fragment {
  const { site: siteTag, ...tags } = c.tags;
  return sql`
    h.tags @> ${sql.json(tags)}
    ${siteTag !== undefined ? sql`and h.site = ${siteTag}` : sql``}
    ${c.site !== undefined ? sql`and h.site = ${c.site}` : sql``}
    ${c.adminState !== undefined ? sql`and h.admin_state = ${c.adminState}` : sql``}
    ${c.online === true ? sql`and h.attached_replica is not null` : c.online === false ? sql`and h.attached_replica is null` : sql``}
    ${c.driverKind !== undefined ? sql`and h.driver_kind = ${c.driverKind}` : sql``}`;
}

/** Tells WatchHosts watchers (every replica) that a host changed; call in the changing transaction. */
export async function notifyHost(tx: Db, hostId: string): Promise<void> {
  await tx`select pg_notify('treadmill_hosts', ${hostId})`;
}
