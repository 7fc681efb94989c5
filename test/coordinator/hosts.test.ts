import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { DriverKind, HostAdminState } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostChangeKind, HostService, type WatchHostsResponse } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { codeOf } from "../support/codes.js";
import { FIRMWARE_MEDIA_TYPE, ROOTFS_MEDIA_TYPE as ROOTFS } from "../../lib/image/media-types.js";

describe("HostService", () => {
  let c: TestCoordinator;
  let admin: { id: string; token: string };
  let user: { id: string; token: string };
  beforeAll(async () => {
    c = await startTestCoordinator();
    admin = await c.createUser({ role: "admin" });
    user = await c.createUser();
  });
  afterAll(async () => {
    await c?.stop();
  });

  it("creates a host, returns its credential once, and the credential authenticates the supervisor", async () => {
    const hosts = c.client(HostService, admin.token);
    const res = await hosts.createHost({
      name: "nrf-1",
      tags: { board: "nrf52840dk" },
      driverKind: DriverKind.BOARD,
      mediaTypes: [FIRMWARE_MEDIA_TYPE],
      site: "lab-a",
    });
    expect(res.credential).toMatch(/^tmh_/);
    expect(res.host).toMatchObject({ name: "nrf-1", capacity: 1, adminState: HostAdminState.ENABLED, online: false, site: "lab-a" });
    const [row] = await c.sql`select credential_hash from hosts where id = ${res.host!.id}`;
    expect(Buffer.from(row.credential_hash).toString("latin1")).not.toContain(res.credential);
    expect((await c.client(AuthService, res.credential).whoAmI({})).hostId).toBe(res.host!.id);
    // A retry is ALREADY_EXISTS; the reserved tag key and a bad capacity are refused.
    expect(await codeOf(hosts.createHost({ name: "nrf-1", driverKind: DriverKind.BOARD, mediaTypes: [ROOTFS] }))).toBe("AlreadyExists");
    expect(await codeOf(hosts.createHost({ name: "x1", tags: { site: "a" }, driverKind: DriverKind.BOARD, mediaTypes: [ROOTFS] }))).toBe(
      "InvalidArgument",
    );
    expect(await codeOf(hosts.createHost({ name: "x2", driverKind: DriverKind.BOARD, mediaTypes: [ROOTFS], capacity: 2000 }))).toBe(
      "InvalidArgument",
    );
    const [event] = await c.sql`select kind, actor from audit_events where host_id = ${res.host!.id}`;
    expect(event.kind).toBe("host.create");
  });

  it("lists hosts with filters and pages, and gets one by id or name", async () => {
    const hosts = c.client(HostService, admin.token);
    for (let i = 0; i < 5; i++) {
      await hosts.createHost({ name: `list-${i}`, tags: { pool: i % 2 ? "odd" : "even" }, driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS], site: "lab-b" });
    }
    const reader = c.client(HostService, user.token);
    const even = await reader.listHosts({ filter: { tags: { pool: "even" } } });
    expect(even.hosts.map((h) => h.name)).toEqual(["list-0", "list-2", "list-4"]);
    const bySiteTag = await reader.listHosts({ filter: { tags: { site: "lab-b", pool: "odd" } } });
    expect(bySiteTag.hosts.map((h) => h.name)).toEqual(["list-1", "list-3"]);
    const names: string[] = [];
    let token = "";
    do {
      const page = await reader.listHosts({ filter: { site: "lab-b" }, pageSize: 2, pageToken: token });
      names.push(...page.hosts.map((h) => h.name));
      token = page.nextPageToken;
    } while (token !== "");
    expect(names).toEqual(["list-0", "list-1", "list-2", "list-3", "list-4"]);
    const one = await reader.getHost({ host: { case: "name", value: "list-3" } });
    expect((await reader.getHost({ host: { case: "hostId", value: one.host!.id } })).host?.name).toBe("list-3");
    expect(await codeOf(reader.getHost({ host: { case: "name", value: "nope" } }))).toBe("NotFound");
  });

  it("updates fields by mask, drains, rotates the credential and deletes", async () => {
    const hosts = c.client(HostService, admin.token);
    const { host, credential } = await hosts.createHost({ name: "upd", driverKind: DriverKind.QEMU, mediaTypes: [ROOTFS] });
    const updated = await hosts.updateHost({
      hostId: host!.id,
      host: { tags: { arch: "x86_64" }, capacity: 4, adminState: HostAdminState.DRAINING, adminStateReason: "maintenance" },
      updateMask: { paths: ["tags", "capacity", "admin_state", "admin_state_reason"] },
    });
    expect(updated.host).toMatchObject({ tags: { arch: "x86_64" }, capacity: 4, adminState: HostAdminState.DRAINING, adminStateReason: "maintenance" });
    expect(updated.credential).toBeUndefined();
    expect(await codeOf(hosts.updateHost({ hostId: host!.id, host: {}, updateMask: { paths: ["id"] } }))).toBe("InvalidArgument");

    const rotated = await hosts.updateHost({ hostId: host!.id, rotateCredential: true });
    expect(rotated.credential).toMatch(/^tmh_/);
    expect(await codeOf(c.client(AuthService, credential).whoAmI({}))).toBe("Unauthenticated");
    expect((await c.client(AuthService, rotated.credential).whoAmI({})).hostId).toBe(host!.id);

    const audit = await c.sql`select kind, details from audit_events where host_id = ${host!.id} order by id`;
    expect(audit.map((a) => a.kind)).toEqual(["host.create", "host.update", "host.update"]);
    expect(audit[1].details.changes).toMatchObject({ capacity: 4, admin_state: "draining" });
    expect(JSON.stringify(audit)).not.toContain(rotated.credential!);

    await hosts.deleteHost({ hostId: host!.id });
    expect(await codeOf(hosts.deleteHost({ hostId: host!.id }))).toBe("NotFound");
    expect(await codeOf(c.client(AuthService, rotated.credential).whoAmI({}))).toBe("Unauthenticated");
  });

  it("refuses to delete a host with a job not finalized", async () => {
    const hosts = c.client(HostService, admin.token);
    const { host } = await hosts.createHost({ name: "busy", driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS] });
    const jobId = "01900000-0000-7000-8000-000000000001";
    await c.sql`insert into jobs (id, owner_id, spec, state) values (${jobId}, ${user.id}, '{}', 'running')`;
    await c.sql`insert into job_hosts (job_id, host_id, attempt) values (${jobId}, ${host!.id}, 1)`;
    expect((await hosts.getHost({ host: { case: "hostId", value: host!.id } })).host?.currentJobIds).toEqual([jobId]);
    expect(await codeOf(hosts.deleteHost({ hostId: host!.id }))).toBe("FailedPrecondition");
    await c.sql`update jobs set state = 'finalized', reason = 'canceled', finalized_at = now() where id = ${jobId}`;
    await hosts.deleteHost({ hostId: host!.id });
  });

  it("streams a snapshot, then creations, changes (not last-seen alone), online state and deletions", async () => {
    const hosts = c.client(HostService, admin.token);
    await hosts.createHost({ name: "w-existing", tags: { watch: "yes" }, driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS] });
    await hosts.createHost({ name: "w-other", tags: { watch: "no" }, driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS] });
    const abort = new AbortController();
    const stream = c.client(HostService, user.token).watchHosts({ filter: { tags: { watch: "yes" } } }, { signal: abort.signal });
    const it = stream[Symbol.asyncIterator]();
    const next = async (): Promise<WatchHostsResponse> => {
      const r = await it.next();
      if (r.done) throw new Error("stream ended");
      return r.value;
    };
    try {
      expect(await next()).toMatchObject({ kind: HostChangeKind.EXISTING, host: { name: "w-existing" } });
      expect((await next()).kind).toBe(HostChangeKind.SYNCED);

      const { host } = await hosts.createHost({ name: "w-new", tags: { watch: "yes" }, driverKind: DriverKind.PROCESS, mediaTypes: [ROOTFS] });
      expect(await next()).toMatchObject({ kind: HostChangeKind.CREATED, host: { name: "w-new" } });

      // last_seen alone: not sent; then the job system's attach (online) is.
      await c.sql.begin(async (tx) => {
        await tx`update hosts set last_seen_at = now() where id = ${host!.id}`;
        await tx`select pg_notify('treadmill_hosts', ${host!.id})`;
      });
      await c.sql.begin(async (tx) => {
        await tx`update hosts set attached_replica = 'r1', attached_at = now(), supervisor_version = '1.2.3' where id = ${host!.id}`;
        await tx`select pg_notify('treadmill_hosts', ${host!.id})`;
      });
      expect(await next()).toMatchObject({ kind: HostChangeKind.UPDATED, host: { name: "w-new", online: true, supervisorVersion: "1.2.3" } });

      await hosts.updateHost({ hostId: host!.id, host: { adminState: HostAdminState.DISABLED }, updateMask: { paths: ["admin_state"] } });
      expect(await next()).toMatchObject({ kind: HostChangeKind.UPDATED, host: { adminState: HostAdminState.DISABLED } });

      // Stops matching the filter: DELETED with its last record.
      await hosts.updateHost({ hostId: host!.id, host: { tags: { watch: "no" } }, updateMask: { paths: ["tags"] } });
      expect(await next()).toMatchObject({ kind: HostChangeKind.DELETED, host: { name: "w-new", tags: { watch: "yes" } } });

      const existing = await hosts.getHost({ host: { case: "name", value: "w-existing" } });
      await hosts.deleteHost({ hostId: existing.host!.id });
      expect(await next()).toMatchObject({ kind: HostChangeKind.DELETED, host: { name: "w-existing" } });
    } finally {
      abort.abort();
      await it.return?.().catch(() => undefined);
    }
  });
});
