/**
 * What the CLI tests run against: a real coordinator (with a bootstrap admin
 * whose password is known), and on demand an image store, a log server and a
 * process supervisor registered with it, plus `tml(...)` to run bin/tml.js
 * as a child process with its own contexts file.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import type { ServingComponent } from "../../lib/component.js";
import { bearerInterceptor } from "../../lib/coordinator-client.js";
import { silentLogger } from "../../lib/logger.js";
import { watchLines } from "../support/process.js";
import { loadImageStoreConfig } from "../../stores/image/config.js";
import { createImageStore } from "../../stores/image/image-store.js";
import { loadLogServerConfig } from "../../stores/log/config.js";
import { createLogServer } from "../../stores/log/log-server.js";
import { loadSupervisorConfig } from "../../supervisor/config.js";
import { createSupervisor, type Supervisor } from "../../supervisor/supervisor.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";

export const TML = new URL("../../bin/tml.js", import.meta.url).pathname;
export const ADMIN_PASSWORD = "correct horse battery staple";
const noInput = { env: {}, argv: [] };

export interface TmlResult {
  code: number | string;
  stdout: string;
  stderr: string;
}

export interface TmlChild {
  child: ChildProcess;
  lines: string[];
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<string>;
  result: Promise<TmlResult>;
}

/** Starts `tml args...` with the test's contexts file; `input` is written to its stdin. */
export function startTml(configFile: string, args: string[], options: { input?: string; env?: Record<string, string> } = {}): TmlChild {
  const child = spawn(process.execPath, [TML, ...args], {
    env: { ...process.env, TML_CONFIG: configFile, NO_COLOR: "1", TML_SERVER: "", TML_TOKEN: "", ...options.env },
    stdio: ["pipe", "pipe", "pipe"],
  });
  child.stdin!.end(options.input ?? "");
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const result = new Promise<TmlResult>((resolve) =>
    child.once("close", (code, signal) => resolve({ code: code ?? signal ?? "unknown", stdout, stderr })),
  );
  const watcher = watchLines(child, result);
  return {
    child,
    lines: watcher.lines,
    result,
    waitForLine: (pattern, timeoutMs = 60_000) => watcher.waitForLine(pattern, timeoutMs),
  };
}

/** Runs `tml args...` to completion. */
export function tml(configFile: string, args: string[], options: { input?: string; env?: Record<string, string> } = {}): Promise<TmlResult> {
  return startTml(configFile, args, options).result;
}

/** Polls `check` until it returns true, failing after `timeoutMs`. */
export async function eventually(what: string, check: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check().catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`${what} did not happen within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

export interface CliWorld {
  coordinator: TestCoordinator;
  url: string;
  dir: string;
  /** A fresh contexts file path in the world's temp dir. */
  configFile(name?: string): string;
  /** An admin API token (from Login). */
  adminToken: string;
  /** Starts an image store and a log server registered with the coordinator. */
  startStores(): Promise<void>;
  /** Starts a process-driver supervisor for a new host named `name`. */
  startSupervisor(name: string, tags?: Record<string, string>): Promise<{ hostId: string }>;
  stop(): Promise<void>;
}

export async function startWorld(): Promise<CliWorld> {
  const dir = await mkdtemp(join(tmpdir(), "tml-test-"));
  await chmod(dir, 0o755);
  const coordinator = await startTestCoordinator({ config: { adminPassword: ADMIN_PASSWORD, host: "127.0.0.1" }, logServer: false });
  const url = coordinator.url;
  const auth = createClient(AuthService, createGrpcTransport({ baseUrl: url }));
  const { token: adminToken } = await auth.login({ name: "admin", password: ADMIN_PASSWORD });
  const adminTransport = createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => adminToken)] });
  const servers: ServingComponent[] = [];
  const supervisors: Supervisor[] = [];
  let configs = 0;
  return {
    coordinator,
    url,
    dir,
    adminToken,
    configFile: (name) => join(dir, `${name ?? `config-${++configs}`}.json`),
    async startStores() {
      const admin = createClient(AuthService, adminTransport);
      const credential = async (description: string) =>
        (await admin.createToken({ scope: TokenScope.SERVICE, description })).token;
      const store = createImageStore({
        config: {
          ...loadImageStoreConfig(noInput),
          port: 0,
          mode: "store",
          dataDir: join(dir, "image-store"),
          coordinatorUrl: url,
          serviceCredential: await credential("image store"),
        },
        logger: silentLogger(),
      });
      const logs = createLogServer({
        config: {
          ...loadLogServerConfig(noInput),
          port: 0,
          dataDir: join(dir, "log-server"),
          coordinatorUrl: url,
          serviceCredential: await credential("log server"),
        },
        logger: silentLogger(),
      });
      for (const s of [store, logs]) {
        await s.start();
        servers.push(s);
      }
      await eventually("store and log server registration", async () => {
        const rows = await coordinator.sql<{ kind: string }[]>`select kind from services`;
        const kinds = new Set(rows.map((r) => r.kind));
        return kinds.has("image_store") && kinds.has("log_server");
      });
    },
    async startSupervisor(name, tags = {}) {
      const hosts = createClient(HostService, adminTransport);
      const { host, credential } = await hosts.createHost({
        name,
        driverKind: DriverKind.PROCESS,
        tags,
        mediaTypes: ["application/vnd.treadmill.rootfs.tar+gzip"],
      });
      const workDir = join(dir, `supervisor-${name}`);
      const supervisor = createSupervisor({
        config: {
          ...loadSupervisorConfig(noInput),
          name,
          coordinatorUrl: url,
          hostCredential: credential,
          driver: "process",
          workDir,
          reconnectMaxMs: 1000,
        },
        logger: silentLogger(),
      });
      await supervisor.start();
      supervisors.push(supervisor);
      await eventually(`host ${name} online`, async () => (await hosts.getHost({ host: { case: "hostId", value: host!.id } })).host?.online === true);
      return { hostId: host!.id };
    },
    async stop() {
      await Promise.all(supervisors.map((s) => s.stop()));
      await Promise.all(servers.map((s) => s.stop()));
      await coordinator.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
