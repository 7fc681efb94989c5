import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { RegistryService, ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { liveCondition } from "../../coordinator/services/registry-service.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { codeOf } from "../support/codes.js";


describe("RegistryService", () => {
  let c: TestCoordinator;
  let credential: string;
  beforeAll(async () => {
    c = await startTestCoordinator({ config: { serviceHeartbeatMs: 2000 } });
    const admin = await c.createUser({ role: "admin" });
    credential = await c.createServiceToken(admin.token, "logs");
  });
  afterAll(async () => {
    await c?.stop();
  });

  const live = async (id: string) => {
    const [row] = await c.sql`select ${liveCondition(c.sql, Date.now())} as live from services s where id = ${id}`;
    return row?.live as boolean | undefined;
  };

  it("registers with a stable id, heartbeats, expires and deregisters", async () => {
    const registry = c.client(RegistryService, credential);
    const first = await registry.register({ kind: ServiceKind.LOG_SERVER, url: "http://logs-1:7720/", site: "lab-a", version: "0.1.0", status: { capacityBytes: 10n, freeBytes: 5n } });
    expect(first.heartbeatInterval?.seconds).toBe(2n);
    const again = await registry.register({ kind: ServiceKind.LOG_SERVER, url: "http://logs-1:7720" });
    expect(again.serviceId).toBe(first.serviceId);
    expect(await live(first.serviceId)).toBe(true);

    await registry.heartbeat({ serviceId: first.serviceId, status: { activeStreams: 3, freeBytes: 4n } });
    const [row] = await c.sql`select active_streams, free_bytes::int as free, token_id is not null as has_token from services where id = ${first.serviceId}`;
    expect(row).toEqual({ active_streams: 3, free: 4, has_token: true });

    // A draining service is not live; three missed intervals expire it (Heartbeat: NotFound).
    await registry.heartbeat({ serviceId: first.serviceId, status: { draining: true } });
    expect(await live(first.serviceId)).toBe(false);
    await c.sql`update services set last_heartbeat_at = now() - interval '7 seconds' where id = ${first.serviceId}`;
    expect(await codeOf(registry.heartbeat({ serviceId: first.serviceId }))).toBe("NotFound");

    const re = await registry.register({ kind: ServiceKind.LOG_SERVER, url: "http://logs-1:7720" });
    expect(re.serviceId).toBe(first.serviceId);
    await registry.deregister({ serviceId: re.serviceId });
    await registry.deregister({ serviceId: re.serviceId });
    expect(await live(re.serviceId)).toBe(false);
    expect(await codeOf(registry.heartbeat({ serviceId: re.serviceId }))).toBe("NotFound");
    const kinds = await c.sql`select kind from audit_events where details->>'serviceId' = ${first.serviceId} order by id`;
    expect(kinds.map((k) => k.kind)).toEqual(["service.register", "service.reregister", "service.reregister", "service.deregister"]);
  });

  it("takes a proxy's tcp entrance as a port or a range of ports (the proxy's --tcp-port-range), and refuses a bad one", async () => {
    const registry = c.client(RegistryService, credential);
    const one = await registry.register({ kind: ServiceKind.PROXY, url: "http://proxy-1:7704", tcpAddress: "proxy-1.example.org:41000" });
    const range = await registry.register({ kind: ServiceKind.PROXY, url: "http://proxy-2:7704", tcpAddress: "proxy-2.example.org:41000-41009" });
    const rows = await c.sql`select id, tcp_address from services where id in (${one.serviceId}, ${range.serviceId}) order by url`;
    expect(rows.map((r) => r.tcp_address)).toEqual(["proxy-1.example.org:41000", "proxy-2.example.org:41000-41009"]);
    for (const bad of ["proxy:0", "proxy:41009-41000", "proxy:70000", "proxy:1-70000", "proxy", "pro xy:1"]) {
      expect(await codeOf(registry.register({ kind: ServiceKind.PROXY, url: "http://proxy-3:7704", tcpAddress: bad }))).toBe("InvalidArgument");
    }
  });

  it("refuses bad registrations and non-service credentials", async () => {
    const registry = c.client(RegistryService, credential);
    expect(await codeOf(registry.register({ kind: ServiceKind.UNSPECIFIED, url: "http://x:1" }))).toBe("InvalidArgument");
    expect(await codeOf(registry.register({ kind: ServiceKind.PROXY, url: "ftp://x" }))).toBe("InvalidArgument");
    expect(await codeOf(registry.register({ kind: ServiceKind.IMAGE_CACHE, url: "http://cache:1" }))).toBe("InvalidArgument");
    expect(await codeOf(registry.register({ kind: ServiceKind.PROXY, url: "http://p:1", status: { freeBytes: -1n } }))).toBe("InvalidArgument");
    const user = await c.createUser({ role: "admin" });
    expect(await codeOf(c.client(RegistryService, user.token).register({ kind: ServiceKind.PROXY, url: "http://p:1" }))).toBe("PermissionDenied");
    expect(await codeOf(c.client(RegistryService).register({ kind: ServiceKind.PROXY, url: "http://p:1" }))).toBe("Unauthenticated");
  });
});
