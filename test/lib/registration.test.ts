/**
 * A server's registration with the coordinator (lib/coordinator-client.ts
 * runRegistration) as its health reports it: `treadmill.registration` is
 * SERVING exactly while the registration is live. The chaos run of issue #18
 * found it NOT_SERVING for good after one heartbeat failed while the
 * coordinator's database restarted, though every heartbeat since succeeded.
 */
import { describe, expect, it } from "@jest/globals";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import { RegistryService, ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { REGISTRATION_HEALTH, runRegistration } from "../../lib/coordinator-client.js";
import { silentLogger } from "../../lib/logger.js";
import { HealthStatus, ServingStatus } from "../../lib/server/health.js";

describe("a server's registration health", () => {
  it("is SERVING again once a heartbeat succeeds after failed ones", async () => {
    const health = new HealthStatus();
    const statuses: (ServingStatus | undefined)[] = [];
    let beats = 0;
    let afterFailure: () => void = () => undefined;
    const recovered = new Promise<void>((resolve) => (afterFailure = resolve));
    const transport = createRouterTransport(({ service }) => {
      service(RegistryService, {
        register: () => ({ serviceId: "s1", heartbeatInterval: { seconds: 0n, nanos: 20_000_000 } }),
        heartbeat: () => {
          beats++;
          statuses.push(health.get(REGISTRATION_HEALTH));
          // The second and third fail as while the coordinator's database is away.
          if (beats === 2 || beats === 3) throw new ConnectError("the coordinator's database is unavailable; retry shortly", Code.Unavailable);
          if (beats === 5) afterFailure();
          return { heartbeatInterval: { seconds: 0n, nanos: 20_000_000 } };
        },
        deregister: () => ({}),
      });
    });
    const abort = new AbortController();
    const running = runRegistration({
      transport,
      kind: ServiceKind.LOG_SERVER,
      url: "http://127.0.0.1:1",
      status: () => ({}),
      logger: silentLogger(),
      signal: abort.signal,
      health,
    });
    await recovered;
    abort.abort();
    await running;
    // SERVING when the first heartbeat went, NOT_SERVING while they failed, SERVING after the fourth succeeded.
    expect(statuses.slice(0, 5)).toEqual([ServingStatus.SERVING, ServingStatus.SERVING, ServingStatus.NOT_SERVING, ServingStatus.NOT_SERVING, ServingStatus.SERVING]);
  });
});
