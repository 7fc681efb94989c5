/**
 * What the CLI tests run against: a real coordinator (with a bootstrap admin
 * whose password is known), and on demand an image store, a log server and a
 * process supervisor registered with it, plus `tml(...)` to run the CLI.
 *
 * `tml` and `startTml` run `runCli` in this process with an io of their own
 * (a contexts file, an environment that holds only what the test gives, stdin
 * from `input`, captured output): starting the bin costs about a second of
 * tsx each time. `spawnTml` runs bin/tml.js as a child, for what only a real
 * process shows (signals, a hard kill, the exit once output is flushed) and
 * for network failures: under jest's module sandbox Node's own errors are not
 * `instanceof Error`, so Connect reads ECONNREFUSED as an internal error.
 * Each in-process run checks that it left the process as it found it.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { chmod, copyFile, mkdir, mkdtemp, rm, symlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PassThrough, Readable } from "node:stream";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { runCli } from "../../cli/cli.js";
import type { CoordinatorConfig } from "../../coordinator/config.js";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import type { ServingComponent } from "../../lib/component.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { ROOTFS_MEDIA_TYPE } from "../../lib/image/media-types.js";
import { silentLogger } from "../../lib/logger.js";
import { runBash, type ShellResult } from "../support/doc-blocks.js";
import { watchLines } from "../support/process.js";
import { loadImageStoreConfig } from "../../stores/image/config.js";
import { createImageStore } from "../../stores/image/image-store.js";
import { loadLogServerConfig } from "../../stores/log/config.js";
import { createLogServer } from "../../stores/log/log-server.js";
import { loadSupervisorConfig, type SupervisorConfig } from "../../supervisor/config.js";
import { createSupervisor, type Supervisor } from "../../supervisor/supervisor.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { waitUntil } from "../support/wait.js";

export const TML = new URL("../../bin/tml.js", import.meta.url).pathname;
export const ADMIN_PASSWORD = "correct horse battery staple";
const noInput = { env: {}, argv: [] };

export interface TmlResult {
  code: number | string;
  stdout: string;
  stderr: string;
}

export interface TmlOptions {
  /** Written to standard input, which then ends. */
  input?: string;
  /** The run's environment besides TML_CONFIG and NO_COLOR=1. */
  env?: Record<string, string>;
}

/** A run of tml under way. */
export interface TmlRun {
  /** Every line printed so far, stdout and stderr together. */
  lines: string[];
  waitForLine(pattern: RegExp, timeoutMs?: number): Promise<string>;
  result: Promise<TmlResult>;
}

/** An in-process run: Ctrl-C is `interrupt()`, a SIGTERM `interrupt("SIGTERM")`. */
export interface InProcessTml extends TmlRun {
  interrupt(signal?: NodeJS.Signals): void;
}

/** A run of the real bin as a child process. */
export interface TmlChild extends TmlRun {
  child: ChildProcess;
}

/** What an in-process run could leave changed in the process it shares. */
function processState(): string {
  return JSON.stringify({
    exitCode: process.exitCode,
    cwd: process.cwd(),
    env: process.env,
    sigint: process.listenerCount("SIGINT"),
  });
}

/** Starts `tml args...` in this process with the test's contexts file. */
export function startTml(configFile: string, args: string[], options: TmlOptions = {}): InProcessTml {
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  const captured = { stdout: [] as Buffer[], stderr: [] as Buffer[], open: true };
  // Once runCli has returned the process would have exited: later writes are not output.
  stdout.on("data", (d: Buffer) => captured.open && captured.stdout.push(d));
  stderr.on("data", (d: Buffer) => captured.open && captured.stderr.push(d));
  const interrupts = new Set<(signal: NodeJS.Signals) => void>();
  const before = processState();
  const code = runCli(args, {
    stdin: Readable.from(options.input === undefined ? [] : [Buffer.from(options.input)]),
    stdout,
    stderr,
    env: { TML_CONFIG: configFile, NO_COLOR: "1", ...options.env },
    onInterrupt(handler) {
      interrupts.add(handler);
      return () => interrupts.delete(handler);
    },
  });
  const result = code.then((exitCode) => {
    captured.open = false;
    stdout.end();
    stderr.end();
    const after = processState();
    if (after !== before) throw new Error(`tml ${args.join(" ")} changed the process it ran in:\nbefore ${before}\nafter  ${after}`);
    if (interrupts.size > 0) throw new Error(`tml ${args.join(" ")} left ${interrupts.size} Ctrl-C handlers behind`);
    return { code: exitCode, stdout: Buffer.concat(captured.stdout).toString(), stderr: Buffer.concat(captured.stderr).toString() };
  });
  const watcher = watchLines({ stdout, stderr }, result.catch(() => undefined));
  return {
    lines: watcher.lines,
    result,
    waitForLine: (pattern, timeoutMs = 60_000) => watcher.waitForLine(pattern, timeoutMs),
    interrupt: (signal = "SIGINT") => [...interrupts].forEach((handler) => handler(signal)),
  };
}

/** Runs `tml args...` to completion, in this process. */
export function tml(configFile: string, args: string[], options: TmlOptions = {}): Promise<TmlResult> {
  return startTml(configFile, args, options).result;
}

/** Starts bin/tml.js as a child process with the test's contexts file; `input` is written to its stdin. */
export function spawnTml(configFile: string, args: string[], options: TmlOptions = {}): TmlChild {
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

/** Polls `check` until it returns true (a check that throws counts as not yet), failing after `timeoutMs`. */
export async function eventually(what: string, check: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  await waitUntil(() => check().catch(() => false), what, timeoutMs);
}

/** A directory at `root` to push as a rootfs image: /bin/busybox, `applets` linked to it, and the empty `dirs`. */
export async function busyboxRootfs(root: string, applets: string[], dirs: string[] = ["tmp"]): Promise<string> {
  await mkdir(join(root, "bin"), { recursive: true });
  await copyFile("/bin/busybox", join(root, "bin", "busybox"));
  for (const applet of applets) await symlink("busybox", join(root, "bin", applet));
  for (const d of dirs) await mkdir(join(root, d), { recursive: true });
  return root;
}

export interface CliWorld {
  coordinator: TestCoordinator;
  url: string;
  dir: string;
  /** A fresh contexts file path in the world's temp dir. */
  configFile(name?: string): string;
  /** A contexts file (`configFile(name)`) logged in as the admin; throws when the login fails. */
  adminConfig(name?: string): Promise<string>;
  /** An admin API token (from Login). */
  adminToken: string;
  /** Starts an image store and a log server registered with the coordinator. */
  startStores(): Promise<void>;
  /** Starts a process-driver supervisor for a new host named `name`. */
  startSupervisor(name: string, tags?: Record<string, string>, config?: Partial<SupervisorConfig>): Promise<{ hostId: string; supervisor: Supervisor }>;
  stop(): Promise<void>;
}

/** `coordinatorConfig`: settings over the test coordinator's (a lease policy, say). */
export async function startWorld(options: { coordinatorConfig?: Partial<CoordinatorConfig> } = {}): Promise<CliWorld> {
  const dir = await mkdtemp(join(tmpdir(), "tml-test-"));
  await chmod(dir, 0o755);
  const coordinator = await startTestCoordinator({ config: { ...options.coordinatorConfig, adminPassword: ADMIN_PASSWORD, host: "127.0.0.1" }, logServer: false });
  const url = coordinator.url;
  const auth = createClient(AuthService, createGrpcTransport({ baseUrl: url }));
  const { token: adminToken } = await auth.login({ name: "admin", password: ADMIN_PASSWORD });
  const adminTransport = createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => adminToken)] });
  const servers: ServingComponent[] = [];
  const supervisors: Supervisor[] = [];
  let configs = 0;
  const configFile = (name?: string) => join(dir, `${name ?? `config-${++configs}`}.json`);
  return {
    coordinator,
    url,
    dir,
    adminToken,
    configFile,
    async adminConfig(name) {
      const config = configFile(name);
      const login = await tml(config, ["login", url, "--user", "admin", "--password-stdin"], { input: `${ADMIN_PASSWORD}\n` });
      if (login.code !== 0) throw new Error(`tml login as admin exited ${login.code}: ${login.stderr}`);
      return config;
    },
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
          coordinatorUrl: [url],
          serviceCredential: await credential("image store"),
        },
        logger: silentLogger(),
      });
      const logs = createLogServer({
        config: {
          ...loadLogServerConfig(noInput),
          port: 0,
          dataDir: join(dir, "log-server"),
          coordinatorUrl: [url],
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
    async startSupervisor(name, tags = {}, extra = {}) {
      const hosts = createClient(HostService, adminTransport);
      const { host, credential } = await hosts.createHost({
        name,
        driverKind: DriverKind.PROCESS,
        tags,
        mediaTypes: [ROOTFS_MEDIA_TYPE],
      });
      const workDir = join(dir, `supervisor-${name}`);
      const supervisor = createSupervisor({
        config: {
          ...loadSupervisorConfig(noInput),
          name,
          coordinatorUrl: [url],
          hostCredential: credential,
          driver: "process",
          workDir,
          reconnectMaxMs: 1000,
          ...extra,
        },
        logger: silentLogger(),
      });
      await supervisor.start();
      supervisors.push(supervisor);
      await eventually(`host ${name} online`, async () => (await hosts.getHost({ host: { case: "hostId", value: host!.id } })).host?.online === true);
      return { hostId: host!.id, supervisor };
    },
    async stop() {
      await Promise.all(supervisors.map((s) => s.stop()));
      await Promise.all(servers.map((s) => s.stop()));
      await coordinator.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** A testbed's directory as a guide's reader has it: `tml` on PATH, logged in as the admin. */
export interface GuideShell {
  /** The tml config file logged in. */
  config: string;
  /** Runs `script` in bash (`set -eo pipefail`) in the testbed's directory; `env` adds variables. */
  run(script: string, env?: NodeJS.ProcessEnv): Promise<ShellResult>;
}

/** Logs `tml` in to `tb` as its admin and puts it on PATH (a `bin` in the testbed's directory). */
export async function guideShell(tb: { dir: string; coordinatorUrl: string; testbed: { admin(): { password: string } } }): Promise<GuideShell> {
  const config = join(tb.dir, "tml.json");
  const login = await tml(config, ["login", tb.coordinatorUrl, "--user", "admin", "--password-stdin"], { input: `${tb.testbed.admin().password}\n` });
  if (login.code !== 0) throw new Error(`login failed: ${login.stderr}`);
  const bins = join(tb.dir, "bin");
  await mkdir(bins);
  await symlink(TML, join(bins, "tml"));
  return {
    config,
    run: (script, env = {}) =>
      runBash(`set -eo pipefail\n${script}`, {
        cwd: tb.dir,
        env: { ...process.env, PATH: `${bins}:${process.env.PATH}`, TML_CONFIG: config, NO_COLOR: "1", TML_SERVER: "", TML_TOKEN: "", ...env },
      }),
  };
}
