import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { Role } from "../../gen/treadmill/coordinator/v1/user_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { hostAccessCondition } from "../../coordinator/services/access.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { codeOf } from "../support/codes.js";


describe("UserService", () => {
  let c: TestCoordinator;
  let admin: { id: string; token: string };
  beforeAll(async () => {
    c = await startTestCoordinator();
    admin = await c.createUser({ role: "admin" });
  });
  afterAll(async () => {
    await c?.stop();
  });

  it("creates, reads, lists, updates and deletes users", async () => {
    const users = c.client(UserService, admin.token);
    const { user } = await users.createUser({ name: "alice", displayName: "Alice", password: "alice-password-1" });
    expect(user).toMatchObject({ name: "alice", displayName: "Alice", role: Role.USER, disabled: false });
    expect(await codeOf(users.createUser({ name: "alice", password: "alice-password-1" }))).toBe("AlreadyExists");
    expect(await codeOf(users.createUser({ name: "Bad Name", password: "alice-password-1" }))).toBe("InvalidArgument");
    expect(await codeOf(users.createUser({ name: "short", password: "short" }))).toBe("InvalidArgument");
    await users.createUser({ name: "alfred", password: "alfred-password" });
    const listed = await users.listUsers({ namePrefix: "al" });
    expect(listed.users.map((u) => u.name)).toEqual(["alfred", "alice"]);

    // Alice changes her own display name and password (with the current one), not her role.
    const { token } = await c.client(AuthService).login({ name: "alice", password: "alice-password-1" });
    const self = c.client(UserService, token);
    expect((await self.getUser({ user: { case: "userId", value: user!.id } })).user?.name).toBe("alice");
    expect(await codeOf(self.getUser({ user: { case: "name", value: "alfred" } }))).toBe("PermissionDenied");
    expect(await codeOf(self.updateUser({ userId: user!.id, role: Role.ADMIN }))).toBe("PermissionDenied");
    expect(await codeOf(self.updateUser({ userId: user!.id, password: "new-password-22", currentPassword: "wrong-password" }))).toBe(
      "PermissionDenied",
    );
    await self.updateUser({ userId: user!.id, displayName: "Alice L.", password: "new-password-22", currentPassword: "alice-password-1" });
    expect(await codeOf(c.client(AuthService).login({ name: "alice", password: "new-password-22" }))).toBe("OK");

    // Disabling refuses her tokens; deleting revokes them and frees the name.
    await users.updateUser({ userId: user!.id, disabled: true });
    expect(await codeOf(c.client(AuthService, token).whoAmI({}))).toBe("Unauthenticated");
    await users.updateUser({ userId: user!.id, disabled: false });
    await users.deleteUser({ userId: user!.id });
    expect(await codeOf(users.deleteUser({ userId: user!.id }))).toBe("NotFound");
    expect(await codeOf(c.client(AuthService, token).whoAmI({}))).toBe("Unauthenticated");
    expect((await users.listUsers({ namePrefix: "al" })).users.map((u) => u.name)).toEqual(["alfred"]);
    const kinds = await c.sql`select kind from audit_events where user_id = ${user!.id} order by id`;
    expect(kinds.map((k) => k.kind)).toEqual(["user.create", "auth.login", "user.update", "auth.login", "user.update", "user.update", "user.delete"]);
  });

  it("never demotes, disables or deletes the last enabled admin", async () => {
    const c2 = await startTestCoordinator();
    try {
      const only = await c2.createUser({ role: "admin" });
      await c2.sql`delete from users where id <> ${only.id}`;
      const users = c2.client(UserService, only.token);
      expect(await codeOf(users.updateUser({ userId: only.id, role: Role.USER }))).toBe("FailedPrecondition");
      expect(await codeOf(users.updateUser({ userId: only.id, disabled: true }))).toBe("FailedPrecondition");
      expect(await codeOf(users.deleteUser({ userId: only.id }))).toBe("FailedPrecondition");
      const [row] = await c2.sql`select role, disabled from users where id = ${only.id}`;
      expect(row).toEqual({ role: "admin", disabled: false });
    } finally {
      await c2.stop();
    }
  });

  it("manages groups, members and host grants, and the access rule follows them", async () => {
    const users = c.client(UserService, admin.token);
    const member = await c.createUser();
    const outsider = await c.createUser();
    const lab = await c.createHost({ tags: { board: "nrf" }, site: "lab-a" });
    const open = await c.createHost({ tags: { board: "rpi" } });
    const { group } = await users.createGroup({ name: "firmware", description: "firmware team" });
    expect(await codeOf(users.createGroup({ name: "firmware" }))).toBe("AlreadyExists");
    await users.addGroupMember({ groupId: group!.id, userId: member.id });
    await users.addGroupMember({ groupId: group!.id, userId: member.id });
    const granted = await users.grantHostAccess({ groupId: group!.id, target: { case: "hostTags", value: { tags: { site: "lab-a" } } } });
    const again = await users.grantHostAccess({ groupId: group!.id, target: { case: "hostTags", value: { tags: { site: "lab-a" } } } });
    expect(again.grant?.id).toBe(granted.grant?.id);
    expect(again.group?.hostGrants).toHaveLength(1);
    expect(again.group?.memberUserIds).toEqual([member.id]);

    const mayUse = async (userId: string, hostId: string) => {
      const [row] = await c.sql`select ${hostAccessCondition(c.sql, userId, "h.id")} as ok from hosts h where h.id = ${hostId}`;
      return row.ok as boolean;
    };
    expect(await mayUse(member.id, lab.id)).toBe(true);
    expect(await mayUse(outsider.id, lab.id)).toBe(false);
    expect(await mayUse(admin.id, lab.id)).toBe(true);
    expect(await mayUse(outsider.id, open.id)).toBe(true);

    // The member lists its group; the outsider sees none.
    expect((await c.client(UserService, member.token).listGroups({})).groups.map((g) => g.name)).toEqual(["firmware"]);
    expect((await c.client(UserService, outsider.token).listGroups({})).groups).toEqual([]);

    await users.revokeHostAccess({ groupId: group!.id, grantId: granted.grant!.id });
    expect(await mayUse(outsider.id, lab.id)).toBe(true);
    await users.grantHostAccess({ groupId: group!.id, target: { case: "hostId", value: open.id } });
    expect(await mayUse(outsider.id, open.id)).toBe(false);
    await users.removeGroupMember({ groupId: group!.id, userId: member.id });
    expect(await mayUse(member.id, open.id)).toBe(false);
    await users.deleteGroup({ groupId: group!.id });
    expect(await mayUse(outsider.id, open.id)).toBe(true);
    expect(await codeOf(users.deleteGroup({ groupId: group!.id }))).toBe("NotFound");
  });
});
