import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { ImageVisibility } from "../../gen/treadmill/coordinator/v1/image_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { RegistryService, ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { coordinatorKeySource, coordinatorTransport } from "../../lib/coordinator-client.js";
import { TokenVerifier } from "../../lib/tokens.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { codeOf } from "../support/codes.js";
import { ROOTFS_MEDIA_TYPE as ROOTFS } from "../../lib/image/media-types.js";

const D1 = `sha256:${"1".repeat(64)}`;
const D2 = `sha256:${"2".repeat(64)}`;

describe("ImageService", () => {
  let c: TestCoordinator;
  let admin: { id: string; token: string };
  let alice: { id: string; token: string };
  let bob: { id: string; token: string };
  let storeA: string;
  let storeB: string;
  let cacheA: string;
  beforeAll(async () => {
    c = await startTestCoordinator();
    admin = await c.createUser({ role: "admin" });
    alice = await c.createUser();
    bob = await c.createUser();
    const svc = await c.createServiceToken(admin.token);
    const registry = c.client(RegistryService, svc);
    storeA = (await registry.register({ kind: ServiceKind.IMAGE_STORE, url: "http://store-a:7710", status: { capacityBytes: 1000n, freeBytes: 100n } })).serviceId;
    storeB = (await registry.register({ kind: ServiceKind.IMAGE_STORE, url: "http://store-b:7710", site: "lab-b", status: { capacityBytes: 1000n, freeBytes: 900n } })).serviceId;
    cacheA = (await registry.register({ kind: ServiceKind.IMAGE_CACHE, url: "http://cache-a:7710", site: "lab-a" })).serviceId;
    // alice uploads D1 and D2 (as far as the catalog knows: it never asks the stores).
    await c.client(ImageService, alice.token).createUploadGrant({ digests: [D1, D2] });
  });
  afterAll(async () => {
    await c?.stop();
  });

  it("registers name:tag, merges locations on a repeat, and replaces only when asked", async () => {
    const images = c.client(ImageService, alice.token);
    const first = await images.registerImage({ name: "zephyr/hello", tag: "v1", manifestDigest: D1, storeIds: [storeA], mediaTypes: [ROOTFS], sizeBytes: 42n });
    expect(first.image).toMatchObject({ name: "zephyr/hello", tag: "v1", manifestDigest: D1, ownerUserId: alice.id, visibility: ImageVisibility.PRIVATE });
    const merged = await images.registerImage({ name: "zephyr/hello", tag: "v1", manifestDigest: D1, storeIds: [cacheA, storeA], mediaTypes: [ROOTFS] });
    expect(merged.image?.locations.map((l) => l.storeId)).toEqual([storeA, cacheA]);
    expect(await codeOf(images.registerImage({ name: "zephyr/hello", tag: "v1", manifestDigest: D2, storeIds: [storeA], mediaTypes: [ROOTFS] }))).toBe(
      "AlreadyExists",
    );
    expect(
      await codeOf(c.client(ImageService, bob.token).registerImage({ name: "zephyr/hello", tag: "v1", manifestDigest: D2, storeIds: [storeA], mediaTypes: [ROOTFS], replace: true })),
    ).toBe("PermissionDenied");
    const replaced = await images.registerImage({ name: "zephyr/hello", tag: "v1", manifestDigest: D2, storeIds: [storeB], mediaTypes: [ROOTFS], replace: true });
    expect(replaced.image?.manifestDigest).toBe(D2);
    expect(await codeOf(images.registerImage({ name: "x", tag: "v1", manifestDigest: D1, storeIds: ["01900000-0000-7000-8000-00000000dead"], mediaTypes: [ROOTFS] }))).toBe(
      "InvalidArgument",
    );
    const kinds = await c.sql`select kind from audit_events where kind like 'image.%' and details->>'name' = 'zephyr/hello' order by id`;
    expect(kinds.map((k) => k.kind)).toEqual(["image.register", "image.merge_locations", "image.replace"]);
  });

  it("shows private images to the owner and admins, group images to members, public to all; NotFound otherwise", async () => {
    const { group } = await c.client(UserService, admin.token).createGroup({ name: "imgteam" });
    await c.client(UserService, admin.token).addGroupMember({ groupId: group!.id, userId: bob.id });
    const images = c.client(ImageService, alice.token);
    await images.registerImage({ name: "vis/private", tag: "a", manifestDigest: D1, storeIds: [storeA], mediaTypes: [ROOTFS] });
    await images.registerImage({ name: "vis/group", tag: "a", manifestDigest: D1, storeIds: [storeA], mediaTypes: [ROOTFS], visibility: ImageVisibility.GROUP, groupIds: [group!.id] });
    await images.registerImage({ name: "vis/public", tag: "a", manifestDigest: D1, storeIds: [storeA], mediaTypes: [ROOTFS], visibility: ImageVisibility.PUBLIC });
    const names = async (token: string) => (await c.client(ImageService, token).listImages({ namePrefix: "vis/" })).images.map((i) => i.name);
    expect(await names(alice.token)).toEqual(["vis/group", "vis/private", "vis/public"]);
    expect(await names(admin.token)).toEqual(["vis/group", "vis/private", "vis/public"]);
    expect(await names(bob.token)).toEqual(["vis/group", "vis/public"]);
    const carol = await c.createUser();
    expect(await names(carol.token)).toEqual(["vis/public"]);
    expect(await codeOf(c.client(ImageService, carol.token).getImage({ reference: "vis/private:a" }))).toBe("NotFound");
    expect(await codeOf(c.client(ImageService, carol.token).resolveImage({ reference: "vis/group:a" }))).toBe("NotFound");
    expect(await codeOf(c.client(ImageService, bob.token).deleteImage({ reference: "vis/public:a" }))).toBe("PermissionDenied");
    expect(await codeOf(c.client(ImageService, carol.token).deleteImage({ reference: "vis/private:a" }))).toBe("NotFound");
    // The SQL rule the job system uses agrees.
    const [row] = await c.sql`select treadmill_user_may_use_image(${carol.id}, 'vis/private', 'a') as p, treadmill_user_may_use_image(${carol.id}, 'vis/public', 'a') as q`;
    expect(row).toEqual({ p: false, q: true });
  });

  it("pages through images by name then tag", async () => {
    const images = c.client(ImageService, alice.token);
    for (const tag of ["t1", "t2", "t3"]) {
      for (const name of ["page/a", "page/b"]) await images.registerImage({ name, tag, manifestDigest: D1, storeIds: [storeA], mediaTypes: [ROOTFS] });
    }
    const seen: string[] = [];
    let token = "";
    do {
      const page = await images.listImages({ namePrefix: "page/", pageSize: 4, pageToken: token });
      seen.push(...page.images.map((i) => `${i.name}:${i.tag}`));
      token = page.nextPageToken;
    } while (token !== "");
    expect(seen).toEqual(["page/a:t1", "page/a:t2", "page/a:t3", "page/b:t1", "page/b:t2", "page/b:t3"]);
  });

  it("resolves a reference with the caller's site first and an image:read token that a store accepts", async () => {
    const images = c.client(ImageService, alice.token);
    await images.registerImage({ name: "resolve/me", tag: "v1", manifestDigest: D1, storeIds: [storeB, storeA, cacheA], mediaTypes: [ROOTFS], visibility: ImageVisibility.PUBLIC });
    const res = await c.client(ImageService, bob.token).resolveImage({ reference: "resolve/me:v1", site: "lab-a" });
    expect(res.image?.locations.map((l) => l.storeId)).toEqual([cacheA, storeA, storeB]);
    const verifier = new TokenVerifier({ keys: coordinatorKeySource(coordinatorTransport(c.url)), audience: "image" });
    const verified = await verifier.verify(res.readToken!.token, { scope: "image:read", digest: D1 });
    expect(verified.subject).toBe(bob.id);
    // The token names alice, whose upload backs the image at the stores.
    expect(verified.capability).toEqual({ scope: "image:read", digest: D1, holder: alice.id });
    expect(res.image?.holderUserId).toBe(alice.id);
    await expect(verifier.verify(res.readToken!.token, { scope: "image:read", digest: D2 })).rejects.toThrow();
    const byDigest = await c.client(ImageService, bob.token).resolveImage({ reference: D1 });
    expect(byDigest.image?.manifestDigest).toBe(D1);
  });

  it("deletes a tag (owner or admin)", async () => {
    const images = c.client(ImageService, alice.token);
    await images.registerImage({ name: "del/me", tag: "v1", manifestDigest: D1, storeIds: [storeA], mediaTypes: [ROOTFS] });
    await images.deleteImage({ reference: "del/me:v1" });
    expect(await codeOf(images.deleteImage({ reference: "del/me:v1" }))).toBe("NotFound");
  });

  it("grants an upload to a live store with room, preferring the site", async () => {
    const images = c.client(ImageService, alice.token);
    const grant = await images.createUploadGrant({ sizeBytes: 500n });
    expect(grant.storeId).toBe(storeB);
    expect(grant.storeUrl).toBe("http://store-b:7710");
    const verifier = new TokenVerifier({ keys: coordinatorKeySource(coordinatorTransport(c.url)), audience: "image" });
    await verifier.verify(grant.writeToken!.token, { scope: "image:write" });
    expect(await codeOf(images.createUploadGrant({ sizeBytes: 5000n }))).toBe("ResourceExhausted");
    expect((await images.createUploadGrant({ storeId: storeA })).storeUrl).toBe("http://store-a:7710");
    expect(await codeOf(images.createUploadGrant({ storeId: "01900000-0000-7000-8000-00000000dead" }))).toBe("NotFound");
    // Expired registrations are not offered.
    await c.sql`update services set last_heartbeat_at = now() - interval '1 hour' where kind = 'image_store'`;
    expect(await codeOf(images.createUploadGrant({}))).toBe("Unavailable");
    await c.sql`update services set last_heartbeat_at = now() where kind = 'image_store'`;
  });
});
