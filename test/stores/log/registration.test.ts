import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import type { ConnectRouter, HandlerContext } from "@connectrpc/connect";
import {
  type DeregisterRequest,
  type HeartbeatRequest,
  type RegisterRequest,
  RegistryService,
  ServiceKind,
} from "../../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { Notifier } from "../../../lib/async/notifier.js";
import { silentLogger } from "../../../lib/logger.js";
import { createServer, type Server } from "../../../lib/server.js";
import { makeKeys, startLogServer, tempDir, within } from "./helpers.js";

/** A stand-in for the coordinator's RegistryService that records what it is sent. */
class FakeRegistry {
  registers: { request: RegisterRequest; authorization: string | null }[] = [];
  heartbeats: HeartbeatRequest[] = [];
  deregisters: DeregisterRequest[] = [];
  private readonly changes = new Notifier();

  private changed() {
    this.changes.notify();
  }

  /** Resolves once `done()` holds. */
  async until(done: () => boolean): Promise<void> {
    while (!done()) await this.changes.wait();
  }

  routes = (router: ConnectRouter) => {
    router.service(RegistryService, {
      register: (request: RegisterRequest, ctx: HandlerContext) => {
        this.registers.push({ request, authorization: ctx.requestHeader.get("authorization") });
        this.changed();
        return { serviceId: "svc-1", heartbeatInterval: { seconds: 0n, nanos: 50_000_000 } };
      },
      heartbeat: (request: HeartbeatRequest) => {
        this.heartbeats.push(request);
        this.changed();
        return { heartbeatInterval: { seconds: 0n, nanos: 50_000_000 } };
      },
      deregister: (request: DeregisterRequest) => {
        this.deregisters.push(request);
        this.changed();
        return {};
      },
    });
  };
}

let registry: FakeRegistry;
let coordinator: Server;
let dir: { path: string; remove(): Promise<void> };

beforeAll(async () => {
  registry = new FakeRegistry();
  coordinator = createServer({ name: "fake-coordinator", logger: silentLogger(), routes: registry.routes });
  await coordinator.start();
  dir = await tempDir();
});

afterAll(async () => {
  await coordinator.stop();
  await dir.remove();
});

describe("registration with the coordinator", () => {
  it("registers as a log server with its url, site and free space, heartbeats, and deregisters on stop", async () => {
    const server = await startLogServer(dir.path, await makeKeys(), {
      coordinatorUrl: [coordinator.address().url],
      serviceCredential: "svc-credential",
      publicUrl: "https://logs.lab-a.example:7703",
      site: "lab-a",
    });
    try {
      await within(registry.until(() => registry.heartbeats.length >= 2), "two heartbeats");
    } finally {
      await server.stop();
    }
    expect(registry.registers).toHaveLength(1);
    const { request, authorization } = registry.registers[0];
    expect(authorization).toBe("Bearer svc-credential");
    expect(request.kind).toBe(ServiceKind.LOG_SERVER);
    expect(request.url).toBe("https://logs.lab-a.example:7703");
    expect(request.site).toBe("lab-a");
    expect(Number(request.status?.freeBytes)).toBeGreaterThan(0);
    expect(Number(request.status?.capacityBytes)).toBeGreaterThanOrEqual(Number(request.status?.freeBytes));
    expect(registry.heartbeats.every((h) => h.serviceId === "svc-1")).toBe(true);
    expect(registry.deregisters.map((d) => d.serviceId)).toEqual(["svc-1"]);
  });
});
