import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError, type ConnectRouter, type HandlerContext } from "@connectrpc/connect";
import {
  type DeregisterRequest,
  type HeartbeatRequest,
  type RegisterRequest,
  RegistryService,
  ServiceKind,
} from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { CloseReason } from "../../gen/treadmill/proxy/v1/tunnel_pb.js";
import { silentLogger } from "../../lib/logger.js";
import { createServer, type Server } from "../../lib/server.js";
import { dialTunnel, type TunnelStream } from "../../lib/tunnel/client.js";
import { spawn, type ChildProcess } from "node:child_process";
import { dialToken, exposeJob, makeKeys, readAll, startEchoServer, startProxy, within, type Keys } from "./helpers.js";
import { waitUntil } from "../support/wait.js";

const CHILD = join(fileURLToPath(new URL(".", import.meta.url)), "exposer-child.ts");

let keys: Keys;
let echo: Awaited<ReturnType<typeof startEchoServer>>;

beforeAll(async () => {
  keys = await makeKeys();
  echo = await startEchoServer();
});

afterAll(async () => {
  await echo.close();
});

/** The exposer in a child process (through tsx), as a supervisor that can be killed. */
function startChild(args: string[]): { child: ChildProcess; connected: Promise<void>; exited: Promise<unknown> } {
  const child = spawn(process.execPath, ["--import", "tsx", CHILD, ...args], { stdio: ["ignore", "pipe", "inherit"] });
  const connected = new Promise<void>((resolve, reject) => {
    child.stdout!.on("data", (d: Buffer) => {
      if (d.toString().includes("exposer connected")) resolve();
    });
    child.once("exit", () => reject(new Error("exposer child exited")));
  });
  connected.catch(() => undefined);
  const exited = new Promise((resolve) => child.once("exit", resolve));
  return { child, connected, exited };
}

async function dial(url: string, job: string, exposure: string): Promise<TunnelStream> {
  const token = await dialToken(keys, job, exposure);
  for (let attempt = 0; ; attempt++) {
    try {
      return await dialTunnel({ proxyUrl: url, token, jobId: job, port: exposure });
    } catch (err) {
      const code = ConnectError.from(err).code;
      if ((code !== Code.NotFound && code !== Code.Unavailable) || attempt > 200) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

async function echoes(tunnel: TunnelStream, bytes = 64 * 1024): Promise<boolean> {
  const data = randomBytes(bytes);
  const received = readAll(tunnel);
  tunnel.end(data);
  return (await within(received, "echo")).equals(data);
}

describe("supervisors coming and going", () => {
  it("closes a killed supervisor's tunnels with supervisor-gone and keeps serving the others", async () => {
    const proxy = await startProxy(keys);
    const url = proxy.address().url;
    const other = await exposeJob(url, keys, "job-stays", [{ name: "echo", host: "127.0.0.1", port: echo.port, kind: "tcp" }]);
    const token = await keys.token({ scope: "tunnel:expose", job: "job-dies" });
    const supervisor = startChild([url, "job-dies", token, `echo=${echo.port}`]);
    try {
      await within(supervisor.connected, "the child's exposer connected", 30_000);
      const doomed = await dial(url, "job-dies", "echo");
      doomed.resume();
      const survivor = await dial(url, "job-stays", "echo");
      supervisor.child.kill("SIGKILL");
      const closed = await within(doomed.closeReason, "supervisor-gone close");
      expect(closed.reason).toBe(CloseReason.SUPERVISOR_GONE);
      expect(await echoes(survivor, 1024 * 1024)).toBe(true);
      expect(await echoes(await dial(url, "job-stays", "echo"))).toBe(true);
      const err = await dialTunnel({ proxyUrl: url, token: await dialToken(keys, "job-dies", "echo"), jobId: "job-dies", port: "echo" }).catch(
        (e: unknown) => ConnectError.from(e),
      );
      expect((err as ConnectError).code).toBe(Code.Unavailable);
    } finally {
      supervisor.child.kill("SIGKILL");
      await supervisor.exited;
      await other.stop();
      await proxy.stop();
    }
  }, 60_000);

  it("lets supervisors expose again after a proxy restart, and new sessions work", async () => {
    const first = await startProxy(keys);
    const port = first.address().port;
    const exposer = await exposeJob(first.address().url, keys, "job-r", [{ name: "echo", host: "127.0.0.1", port: echo.port, kind: "tcp" }]);
    try {
      const before = await dial(first.address().url, "job-r", "echo");
      expect(await echoes(before)).toBe(true);
      const open = await dial(first.address().url, "job-r", "echo");
      open.resume();
      await first.stop();
      expect((await within(open.closeReason, "shutdown close")).reason).toBe(CloseReason.SHUTDOWN);
      await waitUntil(() => !exposer.connected(), "exposer noticed the restart");
      const second = await startProxy(keys, { port });
      try {
        await waitUntil(() => exposer.connected() && second.sessionCount() === 1, "exposer reconnected");
        expect(await echoes(await dial(second.address().url, "job-r", "echo"))).toBe(true);
      } finally {
        await exposer.stop();
        await second.stop();
      }
    } finally {
      await exposer.stop();
      await first.stop();
    }
  }, 60_000);
});

/** A stand-in for the coordinator's RegistryService that records what it is sent. */
class FakeRegistry {
  registers: { request: RegisterRequest; authorization: string | null }[] = [];
  heartbeats: HeartbeatRequest[] = [];
  deregisters: DeregisterRequest[] = [];

  routes = (router: ConnectRouter) => {
    router.service(RegistryService, {
      register: (request: RegisterRequest, ctx: HandlerContext) => {
        this.registers.push({ request, authorization: ctx.requestHeader.get("authorization") });
        return { serviceId: "svc-proxy", heartbeatInterval: { seconds: 0n, nanos: 50_000_000 } };
      },
      heartbeat: (request: HeartbeatRequest) => {
        this.heartbeats.push(request);
        return { heartbeatInterval: { seconds: 0n, nanos: 50_000_000 } };
      },
      deregister: (request: DeregisterRequest) => {
        this.deregisters.push(request);
        return {};
      },
    });
  };
}

describe("registration with the coordinator", () => {
  let coordinator: Server;
  const registry = new FakeRegistry();

  beforeAll(async () => {
    coordinator = createServer({ name: "fake-coordinator", logger: silentLogger(), routes: registry.routes });
    await coordinator.start();
  });

  afterAll(async () => {
    await coordinator.stop();
  });

  it("registers as a proxy with its url and tcp range, heartbeats, and deregisters on stop", async () => {
    const proxy = await startProxy(keys, {
      coordinatorUrl: [coordinator.address().url],
      serviceCredential: "tms_proxy-credential",
      publicUrl: "https://proxy.example.org:7704",
      site: "lab-a",
      tcpPortRange: "41000-41009",
    });
    try {
      await waitUntil(() => registry.heartbeats.length >= 2, "two heartbeats");
    } finally {
      await proxy.stop();
    }
    expect(registry.registers).toHaveLength(1);
    const { request, authorization } = registry.registers[0];
    expect(authorization).toBe("Bearer tms_proxy-credential");
    expect(request.kind).toBe(ServiceKind.PROXY);
    expect(request.url).toBe("https://proxy.example.org:7704");
    expect(request.site).toBe("lab-a");
    expect(request.tcpAddress).toBe("proxy.example.org:41000-41009");
    expect(registry.heartbeats.every((h) => h.serviceId === "svc-proxy")).toBe(true);
    expect(registry.deregisters.map((d) => d.serviceId)).toEqual(["svc-proxy"]);
  });
});
