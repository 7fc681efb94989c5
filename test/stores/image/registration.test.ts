// Registration with the coordinator and the coordinator as the source of the
// token signing keys, against a small fake of the coordinator's
// RegistryService and AuthService on a real server (port 0).
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import type { HandlerContext } from "@connectrpc/connect";
import { AuthService } from "../../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import {
  RegistryService,
  ServiceKind,
  type HeartbeatRequest,
  type RegisterRequest,
} from "../../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { silentLogger } from "../../../lib/logger.js";
import { createServer, type Server } from "../../../lib/server.js";
import { makeSigner, makeTempDir, manifestFor, randomBlob, removeDir, startStore, type Signer } from "../../support/image-store.js";
import { uploadBlob } from "../../../lib/image/client.js";
import { waitUntil } from "../../support/wait.js";

interface Seen {
  registers: { request: RegisterRequest; authorization: string | null }[];
  heartbeats: HeartbeatRequest[];
  deregistered: string[];
  keyFetches: number;
}

describe("image store registration with the coordinator", () => {
  let dir: string;
  let signer: Signer;
  let coordinator: Server;
  const seen: Seen = { registers: [], heartbeats: [], deregistered: [], keyFetches: 0 };

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    coordinator = createServer({
      name: "fake-coordinator",
      logger: silentLogger(),
      routes(router) {
        router.service(RegistryService, {
          register(request: RegisterRequest, context: HandlerContext) {
            seen.registers.push({ request, authorization: context.requestHeader.get("authorization") });
            return { serviceId: `svc-${seen.registers.length}`, heartbeatInterval: { seconds: 0n, nanos: 50_000_000 } };
          },
          heartbeat(request: HeartbeatRequest) {
            seen.heartbeats.push(request);
            return { heartbeatInterval: { seconds: 0n, nanos: 50_000_000 } };
          },
          deregister(request) {
            seen.deregistered.push(request.serviceId);
            return {};
          },
        });
        router.service(AuthService, {
          getSigningKeys() {
            seen.keyFetches++;
            const jwks = signer.signer.publicJwks();
            return {
              issuer: "test-coordinator",
              keys: jwks.keys.map((k) => ({ kid: k.kid, kty: k.kty, crv: k.crv, x: k.x, alg: k.alg, use: k.use })),
            };
          },
        });
      },
    });
    await coordinator.start();
  });

  afterAll(async () => {
    await coordinator.stop();
    await removeDir(dir);
  });

  it("registers a cache with its kind, url, site and space, heartbeats, and deregisters on stop", async () => {
    const cache = await startStore(signer, {
      dir: `${dir}/cache`,
      config: {
        mode: "cache",
        coordinatorUrl: [coordinator.address().url],
        serviceCredential: "svc-credential-1",
        site: "lab-a",
        publicUrl: "http://cache.lab-a.example:7702",
        capBytes: 10 * 1024 * 1024 * 1024,
      },
    });
    try {
      await waitUntil(() => seen.registers.length >= 1 && seen.heartbeats.length >= 2, "a register and two heartbeats");
      const { request, authorization } = seen.registers[0];
      expect(authorization).toBe("Bearer svc-credential-1");
      expect(request.kind).toBe(ServiceKind.IMAGE_CACHE);
      expect(request.url).toBe("http://cache.lab-a.example:7702");
      expect(request.site).toBe("lab-a");
      expect(request.status?.capacityBytes).toBe(10n * 1024n * 1024n * 1024n);
      expect(request.status!.freeBytes > 0n).toBe(true);
      expect(seen.heartbeats[0].serviceId).toBe("svc-1");
    } finally {
      await cache.stop();
    }
    expect(seen.deregistered).toEqual(["svc-1"]);
  });

  it("registers a store under its listening address and verifies tokens with the coordinator's keys", async () => {
    const before = seen.registers.length;
    const store = await startStore(signer, {
      dir: `${dir}/store`,
      config: { coordinatorUrl: [coordinator.address().url], serviceCredential: "svc-credential-2", signingKeysFile: "" },
    });
    try {
      await waitUntil(() => seen.registers.length > before, "a register");
      expect(seen.registers[before].request.kind).toBe(ServiceKind.IMAGE_STORE);
      expect(seen.registers[before].request.url).toBe(store.url);
      const blob = randomBlob(100);
      await uploadBlob(store.client(await signer.token({ scope: "image:write" })), {
        digest: blob.digest,
        size: blob.size,
        source: async function* () {
          yield blob.data;
        },
      });
      const m = manifestFor([blob]);
      await store.client(await signer.token({ scope: "image:write" })).putManifest({ digest: m.digest, manifestJson: m.json });
      expect(seen.keyFetches).toBeGreaterThanOrEqual(1);
    } finally {
      await store.stop();
    }
  });
});
