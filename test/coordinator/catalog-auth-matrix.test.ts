/**
 * The auth matrix of the catalog services: every RPC of AuthService,
 * UserService, HostService, ImageService and RegistryService, called with no
 * credential, an expired, a revoked, a user's, a host's and a service's
 * credential, and on another user's resources. Each refusal is
 * Unauthenticated or PermissionDenied and changes nothing. Table-driven over
 * the service descriptors: an RPC added without a row here fails the test.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { DriverKind, HostAdminState } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { ImageVisibility } from "../../gen/treadmill/coordinator/v1/image_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { RegistryService, ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { Role } from "../../gen/treadmill/coordinator/v1/user_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { ROOTFS_MEDIA_TYPE as ROOTFS } from "../../lib/image/media-types.js";

type Access = "public" | "whoami" | "user" | "admin" | "service" | "adminOrService";
interface Row {
  access: Access;
  request: () => Record<string, unknown>;
}

const SERVICES: DescService[] = [AuthService, UserService, HostService, ImageService, RegistryService];
const D1 = `sha256:${"a".repeat(64)}`;

describe("the catalog services' auth matrix", () => {
  let c: TestCoordinator;
  let admin: { id: string; token: string };
  let user: { id: string; token: string };
  let other: { id: string; token: string; tokenId: string };
  let host: { id: string; credential: string };
  let service: string;
  let expired: string;
  let revoked: string;
  let groupId: string;
  let storeId: string;
  let grantId: string;
  const table: Record<string, Row> = {};

  beforeAll(async () => {
    c = await startTestCoordinator();
    admin = await c.createUser({ role: "admin" });
    user = await c.createUser();
    const o = await c.createUser();
    const [t] = await c.sql`select id from api_tokens where user_id = ${o.id}`;
    other = { ...o, tokenId: t.id as string };
    host = await c.createHost({ name: "matrix-host" });
    service = await c.createServiceToken(admin.token);
    const e = await c.createUser();
    await c.sql`update api_tokens set expires_at = now() - interval '1 second' where user_id = ${e.id}`;
    expired = e.token;
    const r = await c.createUser({ role: "admin" });
    await c.sql`update api_tokens set revoked_at = now() where user_id = ${r.id}`;
    revoked = r.token;
    storeId = (await c.client(RegistryService, service).register({ kind: ServiceKind.IMAGE_STORE, url: "http://store:1" })).serviceId;
    const users = c.client(UserService, admin.token);
    groupId = (await users.createGroup({ name: "matrix" })).group!.id;
    grantId = (await users.grantHostAccess({ groupId, target: { case: "hostId", value: host.id } })).grant!.id;
    const images = c.client(ImageService, other.token);
    await images.createUploadGrant({ digests: [D1] });
    await images.registerImage({ name: "other/private", tag: "v1", manifestDigest: D1, storeIds: [storeId], mediaTypes: [ROOTFS] });
    await images.registerImage({ name: "other/public", tag: "v1", manifestDigest: D1, storeIds: [storeId], mediaTypes: [ROOTFS], visibility: ImageVisibility.PUBLIC });

    const rows: Record<string, Row> = {
      "AuthService.Login": { access: "public", request: () => ({ name: "nobody", password: "nothing-at-all" }) },
      "AuthService.CreateToken": { access: "user", request: () => ({ description: "m" }) },
      "AuthService.ListTokens": { access: "user", request: () => ({}) },
      "AuthService.RevokeToken": { access: "user", request: () => ({ tokenId: other.tokenId }) },
      "AuthService.WhoAmI": { access: "whoami", request: () => ({}) },
      "AuthService.GetSigningKeys": { access: "public", request: () => ({}) },
      "AuthService.CreateAdminCapability": { access: "admin", request: () => ({ scope: CapabilityScope.IMAGE_ADMIN }) },
      "UserService.CreateUser": { access: "admin", request: () => ({ name: "matrix-new", password: "matrix-password", role: Role.ADMIN }) },
      "UserService.GetUser": { access: "user", request: () => ({ user: { case: "userId", value: other.id } }) },
      "UserService.ListUsers": { access: "admin", request: () => ({}) },
      "UserService.UpdateUser": { access: "user", request: () => ({ userId: other.id, role: Role.ADMIN }) },
      "UserService.DeleteUser": { access: "admin", request: () => ({ userId: other.id }) },
      "UserService.CreateGroup": { access: "admin", request: () => ({ name: "matrix-group" }) },
      "UserService.ListGroups": { access: "user", request: () => ({}) },
      "UserService.DeleteGroup": { access: "admin", request: () => ({ groupId }) },
      "UserService.AddGroupMember": { access: "admin", request: () => ({ groupId, userId: user.id }) },
      "UserService.RemoveGroupMember": { access: "admin", request: () => ({ groupId, userId: other.id }) },
      "UserService.GrantHostAccess": { access: "admin", request: () => ({ groupId, target: { case: "hostTags", value: { tags: { a: "b" } } } }) },
      "UserService.RevokeHostAccess": { access: "admin", request: () => ({ groupId, grantId }) },
      "HostService.CreateHost": { access: "admin", request: () => ({ name: "matrix-new", driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS] }) },
      "HostService.ListHosts": { access: "user", request: () => ({}) },
      "HostService.GetHost": { access: "user", request: () => ({ host: { case: "hostId", value: host.id } }) },
      "HostService.UpdateHost": {
        access: "admin",
        request: () => ({ hostId: host.id, host: { adminState: HostAdminState.DISABLED }, updateMask: { paths: ["admin_state"] }, rotateCredential: true }),
      },
      "HostService.DeleteHost": { access: "admin", request: () => ({ hostId: host.id }) },
      "HostService.WatchHosts": { access: "user", request: () => ({}) },
      "HostService.GetHostStats": { access: "user", request: () => ({ host: { case: "hostId", value: host.id } }) },
      "ImageService.RegisterImage": {
        access: "user",
        request: () => ({ name: "other/public", tag: "v1", manifestDigest: `sha256:${"b".repeat(64)}`, storeIds: [storeId], mediaTypes: [ROOTFS], replace: true }),
      },
      "ImageService.ResolveImage": { access: "user", request: () => ({ reference: "other/private:v1" }) },
      "ImageService.ListImages": { access: "user", request: () => ({}) },
      "ImageService.GetImage": { access: "user", request: () => ({ reference: "other/private:v1" }) },
      "ImageService.DeleteImage": { access: "user", request: () => ({ reference: "other/public:v1" }) },
      "ImageService.CreateUploadGrant": { access: "user", request: () => ({}) },
      "RegistryService.Register": { access: "service", request: () => ({ kind: ServiceKind.PROXY, url: "http://matrix:1" }) },
      "RegistryService.Heartbeat": { access: "service", request: () => ({ serviceId: storeId, status: { draining: true } }) },
      "RegistryService.Deregister": { access: "service", request: () => ({ serviceId: storeId }) },
      "RegistryService.ListServices": { access: "adminOrService", request: () => ({}) },
    };
    Object.assign(table, rows);
  });
  afterAll(async () => {
    await c?.stop();
  });

  /** Calls `method` with `token`; the code it ends with ("OK" on success). */
  async function call(svc: DescService, method: DescMethod, token: string | undefined): Promise<string> {
    const client = createClient(svc, c.transport(token)) as unknown as Record<string, (req: unknown, opts?: unknown) => unknown>;
    const request = table[`${svc.name}.${method.name}`].request();
    const abort = new AbortController();
    try {
      const result = client[method.localName](request, { signal: abort.signal, timeoutMs: 20_000 });
      if (method.methodKind === "server_streaming") {
        const it = (result as AsyncIterable<unknown>)[Symbol.asyncIterator]();
        await it.next();
        abort.abort();
      } else {
        await result;
      }
      return "OK";
    } catch (err) {
      return Code[ConnectError.from(err).code];
    }
  }

  /** Everything a refused call must leave as it was (last use and heartbeat times aside). */
  async function state(): Promise<string> {
    const parts = await Promise.all([
      c.sql`select id, name, role, disabled, password_hash, display_name, deleted_at from users order by id`,
      c.sql`select id, user_id, revoked_at, expires_at, scope from api_tokens order by id`,
      c.sql`select * from groups order by id`,
      c.sql`select * from group_members order by group_id, user_id`,
      c.sql`select * from host_grants order by id`,
      c.sql`select id, name, tags, admin_state, capacity, credential_hash, updated_at from hosts order by id`,
      c.sql`select name, tag, digest, owner_id, visibility, locations from images order by name, tag`,
      c.sql`select id, kind, url, draining from services order by id`,
      c.sql`select count(*)::int from audit_events`,
    ]);
    return JSON.stringify(parts);
  }

  it("has a row for every RPC of the catalog services", () => {
    const missing = SERVICES.flatMap((s) => s.methods.map((m) => `${s.name}.${m.name}`)).filter((k) => !(k in table));
    expect(missing).toEqual([]);
  });

  it("refuses every RPC without, or with an expired or revoked, credential, changing nothing", async () => {
    const before = await state();
    const results: string[] = [];
    for (const svc of SERVICES) {
      for (const method of svc.methods) {
        const row = table[`${svc.name}.${method.name}`];
        const name = `${svc.name}.${method.name}`;
        if (row.access !== "public") results.push(`${name} none ${await call(svc, method, undefined)}`);
        results.push(`${name} expired ${await call(svc, method, expired)}`);
        results.push(`${name} revoked ${await call(svc, method, revoked)}`);
      }
    }
    expect(results.filter((r) => !r.endsWith(" Unauthenticated"))).toEqual([]);
    expect(await state()).toBe(before);
  });

  it("refuses users on admin and registry RPCs, and hosts and services on user RPCs, changing nothing", async () => {
    const before = await state();
    const wrong: string[] = [];
    for (const svc of SERVICES) {
      for (const method of svc.methods) {
        const name = `${svc.name}.${method.name}`;
        const { access } = table[name];
        const refusedFor: [string, string][] = [];
        if (access === "admin") refusedFor.push(["user", user.token]);
        if (access === "admin" || access === "user") refusedFor.push(["host", host.credential], ["service", service]);
        if (access === "service") refusedFor.push(["user", user.token], ["admin", admin.token], ["host", host.credential]);
        if (access === "adminOrService") refusedFor.push(["user", user.token], ["host", host.credential]);
        for (const [who, token] of refusedFor) {
          const code = await call(svc, method, token);
          if (code !== "PermissionDenied") wrong.push(`${name} as ${who}: ${code}`);
        }
      }
    }
    expect(wrong).toEqual([]);
    expect(await state()).toBe(before);
  });

  it("keeps a user away from another user's resources, changing nothing", async () => {
    const before = await state();
    const asUser = (svc: DescService, name: string) => call(svc, svc.methods.find((m) => m.name === name)!, user.token);
    expect(await asUser(AuthService, "RevokeToken")).toBe("PermissionDenied");
    expect(await asUser(UserService, "GetUser")).toBe("PermissionDenied");
    expect(await asUser(UserService, "UpdateUser")).toBe("PermissionDenied");
    expect(await asUser(ImageService, "RegisterImage")).toBe("PermissionDenied");
    expect(await asUser(ImageService, "DeleteImage")).toBe("PermissionDenied");
    // Images the user may not see do not exist for it.
    expect(await asUser(ImageService, "GetImage")).toBe("NotFound");
    expect(await asUser(ImageService, "ResolveImage")).toBe("NotFound");
    const auth = c.client(AuthService, user.token);
    const code = async (p: Promise<unknown>) => p.then(() => "OK", (e) => Code[ConnectError.from(e).code]);
    expect(await code(auth.createToken({ userId: other.id }))).toBe("PermissionDenied");
    expect(await code(auth.listTokens({ userId: other.id }))).toBe("PermissionDenied");
    expect(await code(auth.createToken({ scope: TokenScope.SERVICE }))).toBe("PermissionDenied");
    expect(await state()).toBe(before);
  });
});
