// The catalog's side of possession (issue #17 hole 3) and the registry's
// listing (issue #17 hole 4, issue #18 defect 6): who may register a digest,
// which holder an entry and its read tokens name, and ListServices.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { ImageVisibility } from "../../gen/treadmill/coordinator/v1/image_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { RegistryService, ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { coordinatorKeySource, coordinatorTransport } from "../../lib/coordinator-client.js";
import { TokenVerifier } from "../../lib/tokens.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { codeOf } from "../support/codes.js";
import { attach } from "../support/jobs.js";
import { ROOTFS_MEDIA_TYPE as ROOTFS } from "../../lib/image/media-types.js";

const digest = (c: string) => `sha256:${c.repeat(64)}`;

describe("image holders in the catalog", () => {
  let c: TestCoordinator;
  let admin: { id: string; token: string };
  let alice: { id: string; token: string };
  let mallory: { id: string; token: string };
  let storeId: string;
  let verifier: TokenVerifier;
  beforeAll(async () => {
    c = await startTestCoordinator();
    admin = await c.createUser({ role: "admin" });
    alice = await c.createUser();
    mallory = await c.createUser();
    const svc = await c.createServiceToken(admin.token);
    storeId = (await c.client(RegistryService, svc).register({ kind: ServiceKind.IMAGE_STORE, url: "http://store-h:7701" })).serviceId;
    verifier = new TokenVerifier({ keys: coordinatorKeySource(coordinatorTransport(c.url)), audience: "image" });
  });
  afterAll(async () => {
    await c?.stop();
  });

  const register = (token: string, name: string, d: string, extra: Record<string, unknown> = {}) =>
    c.client(ImageService, token).registerImage({ name, tag: "v1", manifestDigest: d, storeIds: [storeId], mediaTypes: [ROOTFS], ...extra });
  const holderOf = async (token: string, reference: string) => {
    const res = await c.client(ImageService, token).resolveImage({ reference });
    const v = await verifier.verify(res.readToken!.token, { scope: "image:read", digest: res.image!.manifestDigest });
    return v.capability.scope === "image:read" ? v.capability.holder : undefined;
  };

  it("registers a digest for its uploader only: a grant naming it, or an image the caller may read", async () => {
    const secret = digest("5");
    expect(await codeOf(register(alice.token, "alice/secret", secret))).toBe("PermissionDenied");
    await c.client(ImageService, alice.token).createUploadGrant({ digests: [secret] });
    const own = await register(alice.token, "alice/secret", secret);
    expect(own.image?.holderUserId).toBe(alice.id);
    expect(await holderOf(alice.token, "alice/secret:v1")).toBe(alice.id);
    // mallory knows the digest: that is not enough.
    const err = await register(mallory.token, "mallory/copy", secret).catch((e: unknown) => e as Error);
    expect(await codeOf(Promise.reject(err))).toBe("PermissionDenied");
    expect((err as Error).message).toContain("upload grant");
    // Nor is replacing her own tag with it.
    await c.client(ImageService, mallory.token).createUploadGrant({ digests: [digest("6")] });
    await register(mallory.token, "mallory/own", digest("6"));
    expect(await codeOf(register(mallory.token, "mallory/own", secret, { replace: true }))).toBe("PermissionDenied");
  });

  it("gives an entry registered from a readable image that image's holder", async () => {
    const shared = digest("7");
    await c.client(ImageService, alice.token).createUploadGrant({ digests: [shared] });
    await register(alice.token, "alice/base", shared, { visibility: ImageVisibility.PUBLIC });
    const copy = await register(mallory.token, "mallory/base", shared);
    expect(copy.image?.holderUserId).toBe(alice.id);
    expect(copy.image?.ownerUserId).toBe(mallory.id);
    expect(await holderOf(mallory.token, "mallory/base:v1")).toBe(alice.id);
    // With a grant of her own (she uploaded the bytes herself), she holds her entry.
    await c.client(ImageService, mallory.token).createUploadGrant({ digests: [shared] });
    await register(mallory.token, "mallory/base2", shared);
    expect(await holderOf(mallory.token, "mallory/base2:v1")).toBe(mallory.id);
  });

  it("stops honouring a grant once it expires, and names the grant's digests in the audit log", async () => {
    const late = digest("8");
    await c.client(ImageService, alice.token).createUploadGrant({ digests: [late] });
    const [audit] = await c.sql`select details from audit_events where kind = 'image.upload_grant' and user_id = ${alice.id} order by id desc limit 1`;
    expect((audit.details as { digests: string[] }).digests).toEqual([late]);
    await c.sql`update upload_grants set expires_at = now() - interval '1 second' where user_id = ${alice.id} and digest = ${late}`;
    expect(await codeOf(register(alice.token, "alice/late", late))).toBe("PermissionDenied");
  });

  it("mints a job's image token for the job's owner, naming the holder of the image it was submitted with", async () => {
    const tags = { t: randomUUID().slice(0, 8) };
    const host = await c.createHost({ tags });
    const supervisor = await attach(c, host);
    try {
      const { job } = await c.client(JobService, mallory.token).submitJob({ spec: { image: "mallory/base:v1", hosts: { tags } } });
      const start = await supervisor.startJob(job!.id);
      const v = await verifier.verify(start.image!.readToken!.token, { scope: "image:read", digest: digest("7"), holder: alice.id });
      expect(v.subject).toBe(mallory.id);
    } finally {
      await supervisor.close();
    }
  });
});

describe("RegistryService.ListServices", () => {
  let c: TestCoordinator;
  let admin: { id: string; token: string };
  let service: string;
  const ids: string[] = [];
  beforeAll(async () => {
    c = await startTestCoordinator({ config: { serviceHeartbeatMs: 2000 }, logServer: false });
    admin = await c.createUser({ role: "admin" });
    service = await c.createServiceToken(admin.token);
    const registry = c.client(RegistryService, service);
    for (const [kind, url, site] of [
      [ServiceKind.IMAGE_STORE, "http://store-1:7701", ""],
      [ServiceKind.IMAGE_CACHE, "http://cache-1:7701", "lab-a"],
      [ServiceKind.LOG_SERVER, "http://logs-1:7703", "lab-a"],
    ] as const) {
      ids.push((await registry.register({ kind, url, site, version: "0.1.0", status: { capacityBytes: 100n, freeBytes: 40n } })).serviceId);
    }
    await c.sql`update services set last_heartbeat_at = now() - interval '1 hour' where id = ${ids[2]}`;
  });
  afterAll(async () => {
    await c?.stop();
  });

  it("lists every registration with its kind, url, site, status and liveness, in pages", async () => {
    const registry = c.client(RegistryService, admin.token);
    const all = await registry.listServices({});
    expect(all.services.map((s) => [s.serviceId, s.kind, s.url, s.site, s.live])).toEqual([
      [ids[0], ServiceKind.IMAGE_STORE, "http://store-1:7701", "", true],
      [ids[1], ServiceKind.IMAGE_CACHE, "http://cache-1:7701", "lab-a", true],
      [ids[2], ServiceKind.LOG_SERVER, "http://logs-1:7703", "lab-a", false],
    ]);
    expect(all.services[0].status).toMatchObject({ capacityBytes: 100n, freeBytes: 40n });
    expect(all.services[0].version).toBe("0.1.0");
    expect(all.services[0].lastHeartbeatTime).toBeDefined();
    const first = await registry.listServices({ pageSize: 2 });
    expect(first.services).toHaveLength(2);
    const second = await registry.listServices({ pageSize: 2, pageToken: first.nextPageToken });
    expect(second.services.map((s) => s.serviceId)).toEqual([ids[2]]);
    expect(second.nextPageToken).toBe("");
    expect((await registry.listServices({ kind: ServiceKind.IMAGE_CACHE })).services.map((s) => s.serviceId)).toEqual([ids[1]]);
    expect((await registry.listServices({ liveOnly: true })).services.map((s) => s.serviceId)).toEqual([ids[0], ids[1]]);
    expect(await codeOf(registry.listServices({ kind: ServiceKind.IMAGE_CACHE, pageToken: first.nextPageToken }))).toBe("InvalidArgument");
  });

  it("answers a service credential as it answers an admin", async () => {
    const res = await c.client(RegistryService, service).listServices({ kind: ServiceKind.IMAGE_STORE });
    expect(res.services.map((s) => s.url)).toEqual(["http://store-1:7701"]);
  });

  it("refuses a call without a token, a user's token and a host's credential", async () => {
    const user = await c.createUser();
    const host = await c.createHost({ name: "list-host" });
    expect(await codeOf(c.client(RegistryService).listServices({}))).toBe("Unauthenticated");
    expect(await codeOf(c.client(RegistryService, user.token).listServices({}))).toBe("PermissionDenied");
    expect(await codeOf(c.client(RegistryService, host.credential).listServices({}))).toBe("PermissionDenied");
    expect(await codeOf(c.client(RegistryService, "tmu_nonsense").listServices({}))).toBe("Unauthenticated");
  });
});
