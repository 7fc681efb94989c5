/** Reading users, tokens and groups from the database as protobuf messages. */
import { create } from "@bufbuild/protobuf";
import type { Sql, TransactionSql } from "postgres";
import { type ApiToken, ApiTokenSchema, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { TagsSchema } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { type Group, GroupSchema, HostGrantSchema, Role, type User, UserSchema } from "../../gen/treadmill/coordinator/v1/user_pb.js";
import { ts } from "../shared/common.js";

type Db = Sql | TransactionSql;

export interface UserRow {
  id: string;
  name: string;
  display_name: string;
  role: "admin" | "user";
  disabled: boolean;
  created_at: Date;
  last_login_at: Date | null;
  group_ids: string[];
}

/** Selects users with their group ids; `where` is a fragment over `u`. */
export const userColumns = (sql: Db) => sql`
  u.id, u.name, u.display_name, u.role, u.disabled, u.created_at, u.last_login_at,
  coalesce((select array_agg(m.group_id::text order by m.group_id) from group_members m where m.user_id = u.id), '{}') as group_ids`;

export function userMessage(row: UserRow): User {
  return create(UserSchema, {
    id: row.id,
    name: row.name,
    displayName: row.display_name,
    role: row.role === "admin" ? Role.ADMIN : Role.USER,
    disabled: row.disabled,
    groupIds: row.group_ids,
    createTime: ts(row.created_at),
    lastLoginTime: ts(row.last_login_at),
  });
}

export async function loadUser(sql: Db, id: string): Promise<User | undefined> {
  const [row] = await sql<UserRow[]>`select ${userColumns(sql)} from users u where u.id = ${id}`;
  return row ? userMessage(row) : undefined;
}

export interface TokenRow {
  id: string;
  user_id: string;
  scope: "user" | "service";
  name: string;
  prefix: string;
  created_at: Date;
  expires_at: Date | null;
  last_used_at: Date | null;
  revoked_at: Date | null;
}

export function tokenMessage(row: TokenRow): ApiToken {
  return create(ApiTokenSchema, {
    id: row.id,
    userId: row.user_id,
    scope: row.scope === "service" ? TokenScope.SERVICE : TokenScope.USER,
    description: row.name,
    prefix: row.prefix,
    createTime: ts(row.created_at),
    expireTime: ts(row.expires_at),
    lastUseTime: ts(row.last_used_at),
    revokeTime: ts(row.revoked_at),
  });
}

export async function loadToken(sql: Db, id: string): Promise<TokenRow | undefined> {
  const [row] = await sql<TokenRow[]>`
    select id, user_id, scope, name, prefix, created_at, expires_at, last_used_at, revoked_at
    from api_tokens where id = ${id}`;
  return row;
}

interface GroupRow {
  id: string;
  name: string;
  description: string;
  created_at: Date;
  member_user_ids: string[];
  grants: { id: string; host_id: string | null; tags: Record<string, string> | null }[];
}

export const groupColumns = (sql: Db) => sql`
  g.id, g.name, g.description, g.created_at,
  coalesce((select array_agg(m.user_id::text order by m.user_id) from group_members m where m.group_id = g.id), '{}') as member_user_ids,
  coalesce((select jsonb_agg(jsonb_build_object('id', h.id, 'host_id', h.host_id, 'tags', h.tags) order by h.created_at, h.id)
            from host_grants h where h.group_id = g.id), '[]') as grants`;

export function groupMessage(row: GroupRow): Group {
  return create(GroupSchema, {
    id: row.id,
    name: row.name,
    description: row.description,
    memberUserIds: row.member_user_ids,
    hostGrants: row.grants.map((g) =>
      create(HostGrantSchema, {
        id: g.id,
        target:
          g.host_id !== null
            ? { case: "hostId", value: g.host_id }
            : { case: "hostTags", value: create(TagsSchema, { tags: g.tags ?? {} }) },
      }),
    ),
    createTime: ts(row.created_at),
  });
}

export async function loadGroup(sql: Db, id: string): Promise<Group | undefined> {
  const [row] = await sql<GroupRow[]>`select ${groupColumns(sql)} from groups g where g.id = ${id}`;
  return row ? groupMessage(row) : undefined;
}

export type { GroupRow };
