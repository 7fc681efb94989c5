import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import type { TransactionSql } from "postgres";
import { Role } from "../../gen/treadmill/coordinator/v1/user_pb.js";
import type {
  AddGroupMemberRequest,
  CreateGroupRequest,
  CreateUserRequest,
  DeleteGroupRequest,
  DeleteUserRequest,
  GetUserRequest,
  GrantHostAccessRequest,
  ListGroupsRequest,
  ListUsersRequest,
  RemoveGroupMemberRequest,
  RevokeHostAccessRequest,
  UpdateUserRequest,
  UserService,
} from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { actorOf } from "../audit.js";
import { audit } from "../db/queries/audit.js";
import { requireAdmin, requireUser } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import {
  checkId,
  checkPattern,
  checkTags,
  checkText,
  decodePageToken,
  denied,
  encodePageToken,
  exists,
  invalid,
  isUniqueViolation,
  notFound,
  pageSize,
  precondition,
  USER_NAME,
  uuidv7,
} from "../shared/common.js";
import { hashPassword, verifyPassword } from "./passwords.js";
import { groupColumns, groupMessage, type GroupRow, loadGroup, loadUser, userColumns, userMessage, type UserRow } from "./records.js";

const NAME_SHAPE = "[a-z][a-z0-9._-]{0,63}";

function checkPassword(field: string, password: string): string {
  if (password.length < 12) throw invalid(`${field} must be at least 12 characters`);
  if (Buffer.byteLength(password) > 1024) throw invalid(`${field} must be at most 1024 bytes`);
  return password;
}

function roleOf(field: string, role: Role, unspecified: "user" | undefined): "admin" | "user" {
  if (role === Role.ADMIN) return "admin";
  if (role === Role.USER) return "user";
  if (role === Role.UNSPECIFIED && unspecified) return unspecified;
  throw invalid(`${field} must be ROLE_USER or ROLE_ADMIN`);
}

/** Tells the scheduler that who may use which host changed. */
async function accessChanged(tx: TransactionSql) {
  await tx`select pg_notify('treadmill_schedule', 'access')`;
}

/**
 * UserService: users, groups and host grants. Admins only, except that a
 * user may read itself, change its own display name and password, and list
 * its own groups.
 */
export class UserServiceImpl implements ServiceImpl<typeof UserService> {
  constructor(private readonly ctx: CoordinatorContext) {}

  async createUser(req: CreateUserRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const name = checkPattern("name", req.name, USER_NAME, NAME_SHAPE);
    checkText("display_name", req.displayName, 128);
    checkPassword("password", req.password);
    const role = roleOf("role", req.role, "user");
    const hash = await hashPassword(req.password);
    const id = uuidv7(this.ctx.clock());
    try {
      return await this.ctx.sql.begin(async (tx) => {
        await tx`
          insert into users (id, name, display_name, password_hash, role, created_at)
          values (${id}, ${name}, ${req.displayName}, ${hash}, ${role}, ${new Date(this.ctx.clock())})`;
        await audit(tx, { kind: "user.create", actor: actorOf(caller), userId: id, message: `user ${name} created`, details: { name, role } });
        return { user: await loadUser(tx, id) };
      });
    } catch (err) {
      if (isUniqueViolation(err)) throw exists(`user ${name} already exists`);
      throw err;
    }
  }

  async getUser(req: GetUserRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const sql = this.ctx.sql;
    let where;
    if (req.user.case === "userId") where = sql`u.id = ${checkId("user_id", req.user.value)}`;
    else if (req.user.case === "name") where = sql`u.name = ${checkPattern("name", req.user.value, USER_NAME, NAME_SHAPE)}`;
    else throw invalid("user_id or name is required");
    const [row] = await sql<UserRow[]>`select ${userColumns(sql)} from users u where ${where} and u.deleted_at is null`;
    if (caller.role !== "admin" && row?.id !== caller.userId) throw denied("users may only read themselves");
    if (!row) throw notFound(`user ${req.user.value} not found`);
    return { user: userMessage(row) };
  }

  async listUsers(req: ListUsersRequest, context: HandlerContext) {
    requireAdmin(context);
    checkText("name_prefix", req.namePrefix, 64);
    const size = pageSize(req.pageSize);
    const filters = { prefix: req.namePrefix };
    const after = decodePageToken(req.pageToken, filters, 1);
    const sql = this.ctx.sql;
    const rows = await sql<UserRow[]>`
      select ${userColumns(sql)} from users u
      where u.deleted_at is null
        and left(u.name, ${req.namePrefix.length}) = ${req.namePrefix}
        ${after ? sql`and u.name > ${after[0]}` : sql``}
      order by u.name limit ${size + 1}`;
    const page = rows.slice(0, size);
    return {
      users: page.map(userMessage),
      nextPageToken: rows.length > size ? encodePageToken(filters, [page[page.length - 1].name]) : "",
    };
  }

  async updateUser(req: UpdateUserRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const userId = checkId("user_id", req.userId);
    const isAdmin = caller.role === "admin";
    if (!isAdmin && userId !== caller.userId) throw denied("users may only change themselves");
    if (!isAdmin && (req.role !== undefined || req.disabled !== undefined)) throw denied("only admins change role and disabled");
    if (req.displayName !== undefined) checkText("display_name", req.displayName, 128);
    const role = req.role === undefined ? undefined : roleOf("role", req.role, undefined);
    if (req.password !== undefined) checkPassword("password", req.password);
    if (Buffer.byteLength(req.currentPassword) > 1024) throw invalid("current_password must be at most 1024 bytes");
    const newHash = req.password === undefined ? undefined : await hashPassword(req.password);

    return this.ctx.sql.begin(async (tx) => {
      // Admin changes are serialised, so two demotions cannot both pass the last-admin check.
      await tx`select pg_advisory_xact_lock(7351004)`;
      const [user] = await tx<{ id: string; name: string; role: string; disabled: boolean; password_hash: string | null }[]>`
        select id, name, role, disabled, password_hash from users where id = ${userId} and deleted_at is null for update`;
      if (!user) throw notFound(`user ${userId} not found`);
      if (newHash !== undefined && !isAdmin) {
        if (req.currentPassword === "") throw invalid("current_password is required to change the password");
        if (user.password_hash === null || !(await verifyPassword(req.currentPassword, user.password_hash))) {
          throw denied("current_password is wrong");
        }
      }
      const losesAdmin =
        user.role === "admin" && !user.disabled && ((role !== undefined && role !== "admin") || req.disabled === true);
      if (losesAdmin) await this.checkNotLastAdmin(tx, userId, "demoting or disabling the last enabled admin is not allowed");
      await tx`
        update users set
          display_name = ${req.displayName ?? tx`display_name`},
          role = ${role ?? tx`role`},
          disabled = ${req.disabled ?? tx`disabled`},
          password_hash = ${newHash ?? tx`password_hash`}
        where id = ${userId}`;
      await audit(tx, {
        kind: "user.update",
        actor: actorOf(caller),
        userId,
        message: `user ${user.name} changed`,
        details: {
          ...(req.displayName !== undefined ? { displayName: req.displayName } : {}),
          ...(role !== undefined ? { role } : {}),
          ...(req.disabled !== undefined ? { disabled: req.disabled } : {}),
          ...(newHash !== undefined ? { passwordChanged: true } : {}),
        },
      });
      return { user: await loadUser(tx, userId) };
    });
  }

  async deleteUser(req: DeleteUserRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const userId = checkId("user_id", req.userId);
    if (userId === caller.userId) throw precondition("an admin cannot delete itself");
    return this.ctx.sql.begin(async (tx) => {
      await tx`select pg_advisory_xact_lock(7351004)`;
      const [user] = await tx<{ name: string; role: string; disabled: boolean }[]>`
        select name, role, disabled from users where id = ${userId} and deleted_at is null for update`;
      if (!user) throw notFound(`user ${userId} not found`);
      if (user.role === "admin" && !user.disabled) await this.checkNotLastAdmin(tx, userId, "deleting the last enabled admin is not allowed");
      const now = new Date(this.ctx.clock());
      // A tombstone: jobs keep referring to the user; the name is free again.
      await tx`
        update users set deleted_at = ${now}, disabled = true, password_hash = null, name = ${`deleted.${userId}`}
        where id = ${userId}`;
      await tx`update api_tokens set revoked_at = ${now} where user_id = ${userId} and revoked_at is null`;
      await tx`delete from group_members where user_id = ${userId}`;
      await audit(tx, { kind: "user.delete", actor: actorOf(caller), userId, message: `user ${user.name} deleted`, details: { name: user.name } });
      await accessChanged(tx);
      return {};
    });
  }

  async createGroup(req: CreateGroupRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const name = checkPattern("name", req.name, USER_NAME, NAME_SHAPE);
    checkText("description", req.description, 1024);
    const id = uuidv7(this.ctx.clock());
    try {
      return await this.ctx.sql.begin(async (tx) => {
        await tx`insert into groups (id, name, description, created_at) values (${id}, ${name}, ${req.description}, ${new Date(this.ctx.clock())})`;
        await audit(tx, { kind: "group.create", actor: actorOf(caller), message: `group ${name} created`, details: { groupId: id, name } });
        return { group: await loadGroup(tx, id) };
      });
    } catch (err) {
      if (isUniqueViolation(err)) throw exists(`group ${name} already exists`);
      throw err;
    }
  }

  async listGroups(req: ListGroupsRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const size = pageSize(req.pageSize);
    const filters = { member: caller.role === "admin" ? "" : caller.userId };
    const after = decodePageToken(req.pageToken, filters, 1);
    const sql = this.ctx.sql;
    const rows = await sql<(GroupRow & { name: string })[]>`
      select ${groupColumns(sql)} from groups g
      where true
        ${caller.role === "admin" ? sql`` : sql`and exists (select 1 from group_members m where m.group_id = g.id and m.user_id = ${caller.userId})`}
        ${after ? sql`and g.name > ${after[0]}` : sql``}
      order by g.name limit ${size + 1}`;
    const page = rows.slice(0, size);
    return {
      groups: page.map(groupMessage),
      nextPageToken: rows.length > size ? encodePageToken(filters, [page[page.length - 1].name]) : "",
    };
  }

  async deleteGroup(req: DeleteGroupRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const groupId = checkId("group_id", req.groupId);
    return this.ctx.sql.begin(async (tx) => {
      const [group] = await tx`delete from groups where id = ${groupId} returning name`;
      if (!group) throw notFound(`group ${groupId} not found`);
      await audit(tx, { kind: "group.delete", actor: actorOf(caller), message: `group ${group.name as string} deleted`, details: { groupId } });
      await accessChanged(tx);
      return {};
    });
  }

  async addGroupMember(req: AddGroupMemberRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const groupId = checkId("group_id", req.groupId);
    const userId = checkId("user_id", req.userId);
    return this.ctx.sql.begin(async (tx) => {
      const { group, user } = await this.groupAndUser(tx, groupId, userId);
      const added = await tx`
        insert into group_members (group_id, user_id, added_at) values (${groupId}, ${userId}, ${new Date(this.ctx.clock())})
        on conflict do nothing returning user_id`;
      if (added.length > 0) {
        await audit(tx, { kind: "group.add_member", actor: actorOf(caller), userId, message: `${user} added to group ${group}`, details: { groupId } });
        await accessChanged(tx);
      }
      return { group: await loadGroup(tx, groupId) };
    });
  }

  async removeGroupMember(req: RemoveGroupMemberRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const groupId = checkId("group_id", req.groupId);
    const userId = checkId("user_id", req.userId);
    return this.ctx.sql.begin(async (tx) => {
      const { group, user } = await this.groupAndUser(tx, groupId, userId);
      const removed = await tx`delete from group_members where group_id = ${groupId} and user_id = ${userId} returning user_id`;
      if (removed.length > 0) {
        await audit(tx, { kind: "group.remove_member", actor: actorOf(caller), userId, message: `${user} removed from group ${group}`, details: { groupId } });
        await accessChanged(tx);
      }
      return { group: await loadGroup(tx, groupId) };
    });
  }

  async grantHostAccess(req: GrantHostAccessRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const groupId = checkId("group_id", req.groupId);
    let hostId: string | null = null;
    let tags: Record<string, string> | null = null;
    if (req.target.case === "hostId") hostId = checkId("host_id", req.target.value);
    else if (req.target.case === "hostTags") {
      tags = checkTags("host_tags", req.target.value.tags, { allowSite: true });
      if (Object.keys(tags).length === 0) throw invalid("host_tags must have at least one tag");
    } else throw invalid("host_id or host_tags is required");
    return this.ctx.sql.begin(async (tx) => {
      const [group] = await tx`select name from groups where id = ${groupId} for update`;
      if (!group) throw notFound(`group ${groupId} not found`);
      if (hostId !== null) {
        const [host] = await tx`select id from hosts where id = ${hostId}`;
        if (!host) throw notFound(`host ${hostId} not found`);
      }
      const [existing] = await tx<{ id: string }[]>`
        select id from host_grants where group_id = ${groupId}
          and ${hostId !== null ? tx`host_id = ${hostId}` : tx`tags = ${tx.json(tags as never)}`}`;
      let grantId = existing?.id;
      if (grantId === undefined) {
        grantId = uuidv7(this.ctx.clock());
        await tx`
          insert into host_grants (id, group_id, host_id, tags, created_at)
          values (${grantId}, ${groupId}, ${hostId}, ${tags === null ? null : tx.json(tags as never)}, ${new Date(this.ctx.clock())})`;
        await audit(tx, {
          kind: "group.grant",
          actor: actorOf(caller),
          hostId: hostId ?? undefined,
          message: `group ${group.name as string} granted access to ${hostId !== null ? `host ${hostId}` : "hosts by tags"}`,
          details: { groupId, grantId, ...(tags ? { tags } : {}) },
        });
        await accessChanged(tx);
      }
      const result = await loadGroup(tx, groupId);
      return { grant: result?.hostGrants.find((g) => g.id === grantId), group: result };
    });
  }

  async revokeHostAccess(req: RevokeHostAccessRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    const groupId = checkId("group_id", req.groupId);
    const grantId = checkId("grant_id", req.grantId);
    return this.ctx.sql.begin(async (tx) => {
      const [grant] = await tx<{ host_id: string | null }[]>`
        delete from host_grants where id = ${grantId} and group_id = ${groupId} returning host_id`;
      if (!grant) throw notFound(`grant ${grantId} of group ${groupId} not found`);
      await audit(tx, {
        kind: "group.revoke",
        actor: actorOf(caller),
        hostId: grant.host_id ?? undefined,
        message: `grant ${grantId} revoked`,
        details: { groupId, grantId },
      });
      await accessChanged(tx);
      return { group: await loadGroup(tx, groupId) };
    });
  }

  private async groupAndUser(tx: TransactionSql, groupId: string, userId: string) {
    const [group] = await tx<{ name: string }[]>`select name from groups where id = ${groupId} for update`;
    if (!group) throw notFound(`group ${groupId} not found`);
    const [user] = await tx<{ name: string }[]>`select name from users where id = ${userId} and deleted_at is null`;
    if (!user) throw notFound(`user ${userId} not found`);
    return { group: group.name, user: user.name };
  }

  private async checkNotLastAdmin(tx: TransactionSql, userId: string, message: string) {
    const [{ count }] = await tx<{ count: number }[]>`
      select count(*)::int as count from users
      where role = 'admin' and not disabled and deleted_at is null and id <> ${userId}`;
    if (count === 0) throw precondition(message);
  }
}
