/**
 * Bad input to every RPC of the catalog services: malformed requests answer
 * InvalidArgument with a message naming the field; oversized ones
 * ResourceExhausted; nothing crashes and the coordinator keeps serving.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { create, type DescMethod, type DescService } from "@bufbuild/protobuf";
import { WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { RegistryService, ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { ROOTFS_MEDIA_TYPE as ROOTFS } from "../../lib/image/media-types.js";

const SERVICES: DescService[] = [AuthService, UserService, HostService, ImageService, RegistryService];
const BIG = "x".repeat(100_000);
const NOT_UUID = "not-a-uuid";
const UUID = "01900000-0000-7000-8000-000000000042";

/** Malformed requests per RPC, each with a word its error message must contain. */
const MALFORMED: Record<string, [Record<string, unknown>, string][]> = {
  "AuthService.Login": [
    [{ name: "", password: "x" }, "name"],
    [{ name: "a", password: "" }, "password"],
    [{ name: "a", password: "x".repeat(2000) }, "password"],
    [{ name: "a", password: "long-enough-pw", ttl: { seconds: -5n, nanos: 0 } }, "ttl"],
    [{ name: BIG, password: "x" }, "name"],
  ],
  "AuthService.CreateToken": [
    [{ userId: NOT_UUID }, "user_id"],
    [{ description: BIG }, "description"],
    [{ scope: 77 }, "scope"],
    [{ ttl: { seconds: 0n, nanos: 0 } }, "ttl"],
  ],
  "AuthService.ListTokens": [
    [{ pageToken: "%%%" }, "page_token"],
    [{ pageSize: -1 }, "page_size"],
    [{ pageToken: Buffer.from(JSON.stringify({ f: "x", k: ["a", "b"] })).toString("base64url") }, "page_token"],
  ],
  "AuthService.RevokeToken": [
    [{ tokenId: "" }, "token_id"],
    [{ tokenId: NOT_UUID }, "token_id"],
  ],
  "AuthService.WhoAmI": [],
  "AuthService.GetSigningKeys": [],
  "AuthService.CreateAdminCapability": [
    [{ scope: CapabilityScope.LOG_READ }, "scope"],
    [{ scope: CapabilityScope.IMAGE_ADMIN, ttl: { seconds: 999_999n, nanos: 0 } }, "ttl"],
    [{ scope: CapabilityScope.IMAGE_ADMIN, jobId: UUID }, "job_id"],
  ],
  "UserService.CreateUser": [
    [{ name: "UPPER", password: "long-enough-pw" }, "name"],
    [{ name: BIG, password: "long-enough-pw" }, "name"],
    [{ name: "ok", password: "short" }, "password"],
    [{ name: "ok", password: "long-enough-pw", displayName: BIG }, "display_name"],
    [{ name: "ok", password: "long-enough-pw", role: 9 }, "role"],
  ],
  "UserService.GetUser": [
    [{}, "user_id"],
    [{ user: { case: "userId", value: NOT_UUID } }, "user_id"],
    [{ user: { case: "name", value: "Bad Name" } }, "name"],
  ],
  "UserService.ListUsers": [
    [{ pageToken: "garbage" }, "page_token"],
    [{ namePrefix: BIG }, "name_prefix"],
  ],
  "UserService.UpdateUser": [
    [{ userId: NOT_UUID }, "user_id"],
    [{ userId: UUID, displayName: BIG }, "display_name"],
    [{ userId: UUID, password: "short" }, "password"],
    [{ userId: UUID, role: 0 }, "role"],
  ],
  "UserService.DeleteUser": [[{ userId: NOT_UUID }, "user_id"]],
  "UserService.CreateGroup": [
    [{ name: "" }, "name"],
    [{ name: "ok", description: BIG }, "description"],
  ],
  "UserService.ListGroups": [[{ pageToken: "garbage" }, "page_token"]],
  "UserService.DeleteGroup": [[{ groupId: NOT_UUID }, "group_id"]],
  "UserService.AddGroupMember": [
    [{ groupId: UUID, userId: NOT_UUID }, "user_id"],
    [{ groupId: "", userId: UUID }, "group_id"],
  ],
  "UserService.RemoveGroupMember": [[{ groupId: NOT_UUID, userId: UUID }, "group_id"]],
  "UserService.GrantHostAccess": [
    [{ groupId: UUID }, "host_id"],
    [{ groupId: UUID, target: { case: "hostTags", value: { tags: {} } } }, "host_tags"],
    [{ groupId: UUID, target: { case: "hostTags", value: { tags: { "Bad Key": "v" } } } }, "host_tags"],
    [{ groupId: UUID, target: { case: "hostId", value: NOT_UUID } }, "host_id"],
  ],
  "UserService.RevokeHostAccess": [[{ groupId: UUID, grantId: NOT_UUID }, "grant_id"]],
  "HostService.CreateHost": [
    [{ name: "-bad", driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS] }, "name"],
    [{ name: "ok", driverKind: DriverKind.UNSPECIFIED, mediaTypes: [ROOTFS] }, "driver_kind"],
    [{ name: "ok", driverKind: DriverKind.PROCESS, mediaTypes: [] }, "media_types"],
    [{ name: "ok", driverKind: DriverKind.PROCESS, mediaTypes: ["not a media type"] }, "media_types"],
    [{ name: "ok", driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS], tags: { k: "spaces are bad" } }, "tags"],
    [{ name: "ok", driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS], tags: Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, "v"])) }, "tags"],
    [{ name: "ok", driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS], capacity: -1 }, "capacity"],
    [{ name: "ok", driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS], site: "Bad Site" }, "site"],
  ],
  "HostService.ListHosts": [
    [{ pageToken: "garbage" }, "page_token"],
    [{ filter: { tags: { "": "x" } } }, "filter.tags"],
    [{ filter: { adminState: 42 } }, "filter.admin_state"],
    [{ filter: { health: 42 } }, "filter.health"],
  ],
  "HostService.GetHost": [
    [{}, "host_id"],
    [{ host: { case: "hostId", value: NOT_UUID } }, "host_id"],
  ],
  "HostService.UpdateHost": [
    [{ hostId: NOT_UUID }, "host_id"],
    [{ hostId: UUID }, "update_mask"],
    [{ hostId: UUID, updateMask: { paths: ["credential_hash"] } }, "update_mask"],
    [{ hostId: UUID, host: { capacity: 0 }, updateMask: { paths: ["capacity"] } }, "capacity"],
    [{ hostId: UUID, host: { tags: { site: "x" } }, updateMask: { paths: ["tags"] } }, "tags"],
  ],
  "HostService.DeleteHost": [[{ hostId: "" }, "host_id"]],
  "HostService.WatchHosts": [[{ filter: { site: "Bad Site" } }, "filter.site"]],
  "HostService.GetHostStats": [
    [{}, "host_id"],
    [{ host: { case: "hostId", value: NOT_UUID } }, "host_id"],
    [{ host: { case: "name", value: "-bad" } }, "name"],
  ],
  "ImageService.RegisterImage": [
    [{ name: "Bad", tag: "v1", manifestDigest: `sha256:${"a".repeat(64)}`, storeIds: [UUID], mediaTypes: [ROOTFS] }, "name"],
    [{ name: "ok", tag: ".bad", manifestDigest: `sha256:${"a".repeat(64)}`, storeIds: [UUID], mediaTypes: [ROOTFS] }, "tag"],
    [{ name: "ok", tag: "v1", manifestDigest: "md5:abc", storeIds: [UUID], mediaTypes: [ROOTFS] }, "manifest_digest"],
    [{ name: "ok", tag: "v1", manifestDigest: `sha256:${"a".repeat(64)}`, storeIds: [], mediaTypes: [ROOTFS] }, "store_ids"],
    [{ name: "ok", tag: "v1", manifestDigest: `sha256:${"a".repeat(64)}`, storeIds: [UUID], mediaTypes: [ROOTFS], sizeBytes: -1n }, "size_bytes"],
    [{ name: "ok", tag: "v1", manifestDigest: `sha256:${"a".repeat(64)}`, storeIds: [UUID], mediaTypes: [ROOTFS], visibility: 2 }, "group_ids"],
  ],
  "ImageService.ResolveImage": [
    [{ reference: "" }, "reference"],
    [{ reference: "no-tag" }, "reference"],
    [{ reference: "sha256:zz" }, "reference"],
  ],
  "ImageService.ListImages": [
    [{ pageToken: "garbage" }, "page_token"],
    [{ ownerUserId: NOT_UUID }, "owner_user_id"],
    [{ visibility: 9 }, "visibility"],
  ],
  "ImageService.GetImage": [[{ reference: "UPPER:v1" }, "reference"]],
  "ImageService.DeleteImage": [[{ reference: BIG }, "reference"]],
  "ImageService.CreateUploadGrant": [
    [{ storeId: NOT_UUID }, "store_id"],
    [{ sizeBytes: -1n }, "size_bytes"],
    [{ digests: ["sha256:short"] }, "digests[0]"],
    [{ digests: Array.from({ length: 65 }, (_, i) => `sha256:${i.toString(16).padStart(64, "0")}`) }, "digests"],
  ],
  "RegistryService.Register": [
    [{ kind: ServiceKind.PROXY, url: "" }, "url"],
    [{ kind: ServiceKind.PROXY, url: "not a url" }, "url"],
    [{ kind: ServiceKind.PROXY, url: "http://u:p@x:1" }, "url"],
    [{ kind: ServiceKind.PROXY, url: "http://x:1", site: "Bad" }, "site"],
    [{ kind: ServiceKind.PROXY, url: "http://x:1", tcpAddress: "nonsense" }, "tcp_address"],
  ],
  "RegistryService.Heartbeat": [
    [{ serviceId: NOT_UUID }, "service_id"],
    [{ serviceId: UUID, status: { activeStreams: -1 } }, "status.active_streams"],
  ],
  "RegistryService.Deregister": [[{ serviceId: "" }, "service_id"]],
  "RegistryService.ListServices": [
    [{ kind: 99 }, "kind"],
    [{ pageSize: -1 }, "page_size"],
    [{ pageToken: "garbage" }, "page_token"],
  ],
};

describe("bad input to the catalog services", () => {
  let c: TestCoordinator;
  let admin: string;
  let service: string;
  beforeAll(async () => {
    c = await startTestCoordinator();
    admin = (await c.createUser({ role: "admin" })).token;
    service = await c.createServiceToken(admin);
  });
  afterAll(async () => {
    await c?.stop();
  });

  async function call(svc: DescService, method: DescMethod, request: Record<string, unknown>): Promise<ConnectError | undefined> {
    const token = svc === RegistryService ? service : admin;
    const client = createClient(svc, c.transport(token)) as unknown as Record<string, (req: unknown, opts?: unknown) => unknown>;
    const abort = new AbortController();
    try {
      const result = client[method.localName](request, { signal: abort.signal, timeoutMs: 30_000 });
      if (method.methodKind === "server_streaming") await (result as AsyncIterable<unknown>)[Symbol.asyncIterator]().next();
      else await result;
      return undefined;
    } catch (err) {
      return ConnectError.from(err);
    } finally {
      abort.abort();
    }
  }

  it("has malformed cases for every RPC that takes input", () => {
    const missing = SERVICES.flatMap((s) => s.methods.map((m) => `${s.name}.${m.name}`)).filter((k) => !(k in MALFORMED));
    expect(missing).toEqual([]);
  });

  it("answers InvalidArgument naming the field", async () => {
    const wrong: string[] = [];
    for (const svc of SERVICES) {
      for (const method of svc.methods) {
        for (const [request, field] of MALFORMED[`${svc.name}.${method.name}`]) {
          const err = await call(svc, method, request);
          if (err?.code !== Code.InvalidArgument || !err.rawMessage.includes(field)) {
            wrong.push(`${method.name} ${JSON.stringify(request, (_k, v) => (typeof v === "bigint" ? v.toString() : v)).slice(0, 80)}: ${err ? `${Code[err.code]} ${err.rawMessage}` : "OK"}`);
          }
          if (err && err.rawMessage.length > 400) wrong.push(`${method.name}: error message of ${err.rawMessage.length} characters`);
        }
      }
    }
    expect(wrong).toEqual([]);
  });

  it("answers ResourceExhausted to an oversized request of every RPC, and keeps serving", async () => {
    const huge = new Uint8Array(5 * 1024 * 1024).fill(120);
    const wrong: string[] = [];
    for (const svc of SERVICES) {
      for (const method of svc.methods) {
        // An unknown field makes any message oversized, even an empty one.
        const request = create(method.input);
        request.$unknown = [{ no: 999, wireType: WireType.LengthDelimited, data: huge }];
        const err = await call(svc, method, request as unknown as Record<string, unknown>);
        if (err?.code !== Code.ResourceExhausted) wrong.push(`${method.name}: ${err ? Code[err.code] : "OK"}`);
      }
    }
    expect(wrong).toEqual([]);
    expect((await c.client(AuthService, admin).whoAmI({})).user?.role).toBeDefined();
  });
});
