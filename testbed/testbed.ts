import { join, resolve } from "node:path";
import { loadCoordinatorConfig, type CoordinatorConfig } from "../coordinator/config.js";
import { createCoordinator } from "../coordinator/coordinator.js";
import type { ServingComponent } from "../lib/component.js";
import type { Logger } from "../lib/logger.js";
import { loadProxyConfig } from "../proxy/config.js";
import { createProxy } from "../proxy/proxy.js";
import { loadImageStoreConfig } from "../stores/image/config.js";
import { createImageStore } from "../stores/image/image-store.js";
import { loadLogServerConfig } from "../stores/log/config.js";
import { createLogServer } from "../stores/log/log-server.js";
import { loadSupervisorConfig, type SupervisorConfig } from "../supervisor/config.js";
import { createSupervisor, type Supervisor } from "../supervisor/supervisor.js";
import type { TestbedConfig } from "./config.js";
import { createBoardDriver } from "../supervisor/drivers/board-driver.js";
import type { Driver } from "../supervisor/drivers/driver.js";
import { startSimBoard, type SimBoard } from "../supervisor/sim-board/start.js";
import {
  ADMIN_NAME,
  boardHost,
  flakyBoardHost,
  processHost,
  vmHost,
  adminTransport,
  ensureExamples,
  ensureHosts,
  ensureServiceCredential,
  loadState,
  saveState,
} from "./provision.js";

/** One server of the testbed, for the start-up banner and for tests. */
export interface TestbedServer {
  role: "coordinator" | "image-store" | "image-cache" | "log-server" | "proxy";
  url: string;
}

export interface Testbed {
  start(): Promise<void>;
  stop(): Promise<void>;
  /** Every server with its address; valid after start(). */
  servers(): TestbedServer[];
  /** Names of the supervisors. */
  supervisors(): string[];
  /** Stops one supervisor (its host goes offline); the others keep running. */
  stopSupervisor(name: string): Promise<void>;
  /** The admin's name and the file holding its password. */
  admin(): { name: string; passwordFile: string; password: string };
  /** The example images pushed at the first start. */
  examples(): string[];
}

const noInput = { env: {}, argv: [] };

/** How often a `--flaky-boards` board fails per power-on (supervisor/sim-board/faults.ts). */
export const FLAKY_RATES = { bootFailure: 0.2, hang: 0.05, serialDrop: 0.1 };

/**
 * The all-in-one testbed: every component composed in one process, each with
 * its own folder under `dataDir` and its own child logger, wired as a real
 * site would be: the admin is created at the first start (its password kept
 * in `<dataDir>/admin-password`), the servers register with the
 * coordinator with a service credential, the supervisors attach with their
 * hosts' credentials, and an example image is pushed once. Start order
 * follows the dependencies; stop is the reverse.
 */
export function createTestbed({
  config,
  logger,
  coordinatorConfig = {},
}: {
  config: TestbedConfig;
  logger: Logger;
  /** Coordinator settings over its defaults (tests: a short lease grace period). */
  coordinatorConfig?: Partial<CoordinatorConfig>;
}): Testbed {
  const port = (offset: number) => (config.basePort === 0 ? 0 : config.basePort + offset);
  const common = {
    host: config.host,
    corsOrigins: config.corsOrigins,
    graceMs: config.graceMs,
    logLevel: config.logLevel,
  };
  const child = (component: string) => logger.child({ component });
  const supervisorNames = Array.from({ length: config.supervisors }, (_, i) => `sup-${i + 1}`);
  const boardNames = Array.from({ length: config.boards }, (_, i) => `board-${i + 1}`);
  const flakyNames = Array.from({ length: config.flakyBoards }, (_, i) => `flaky-${i + 1}`);
  const vmNames = Array.from({ length: config.vms }, (_, i) => `vm-${i + 1}`);
  let boards: SimBoard[] = [];
  const stopSignal = new AbortController();

  let coordinator: ServingComponent | undefined;
  let servers: [TestbedServer["role"], ServingComponent][] = [];
  let supervisors: Supervisor[] = [];
  let adminPassword = "";
  let examples: string[] = [];
  let started: Promise<void> | undefined;
  let stopping: Promise<void> | undefined;

  const stopAll = async () => {
    stopSignal.abort();
    await started?.catch(() => undefined);
    await Promise.all(supervisors.map((s) => s.stop()));
    await Promise.all(servers.map(([, s]) => s.stop()));
    await Promise.all(boards.map((b) => b.stop()));
    await coordinator?.stop();
  };

  async function startAll(): Promise<void> {
    const state = await loadState(config.dataDir);
    adminPassword = state.adminPassword;
    coordinator = createCoordinator({
      config: {
        ...loadCoordinatorConfig(noInput),
        ...coordinatorConfig,
        ...common,
        port: port(0),
        dataDir: join(config.dataDir, "coordinator"),
        databaseUrl: config.databaseUrl,
        adminName: ADMIN_NAME,
        adminPassword: state.adminPassword,
      },
      logger: child("coordinator"),
    });
    await coordinator.start();
    const coordinatorUrl = coordinator.address().url;
    const admin = await adminTransport(coordinatorUrl, state);
    const serviceCredential = await ensureServiceCredential(admin, state);
    await saveState(config.dataDir, state);

    // The web console is served by the coordinator and calls the log server,
    // the stores and the proxy from the coordinator's origin (docs/console.md).
    const registered = { ...common, corsOrigins: [...common.corsOrigins, ...consoleOrigins(coordinatorUrl)], coordinatorUrl: [coordinatorUrl], serviceCredential };
    servers = [
      [
        "image-store",
        createImageStore({
          config: {
            ...loadImageStoreConfig(noInput),
            ...registered,
            port: port(1),
            mode: "store",
            site: "local",
            dataDir: join(config.dataDir, "image-store"),
          },
          logger: child("image-store"),
        }),
      ],
      [
        "image-cache",
        createImageStore({
          config: {
            ...loadImageStoreConfig(noInput),
            ...registered,
            port: port(2),
            mode: "cache",
            site: "local",
            dataDir: join(config.dataDir, "image-cache"),
            // Supervisors run on this machine: they read blobs in place.
            sharedPath: resolve(config.dataDir, "image-cache"),
          },
          logger: child("image-cache"),
        }),
      ],
      [
        "log-server",
        createLogServer({
          config: {
            ...loadLogServerConfig(noInput),
            ...registered,
            port: port(3),
            site: "local",
            dataDir: join(config.dataDir, "log-server"),
          },
          logger: child("log-server"),
        }),
      ],
      [
        "proxy",
        createProxy({
          config: { ...loadProxyConfig(noInput), ...registered, port: port(4), site: "local" },
          logger: child("proxy"),
        }),
      ],
    ];
    await Promise.all(servers.map(([, s]) => s.start()));

    const hosts = await ensureHosts(admin, state, [
      ...supervisorNames.map(processHost),
      ...boardNames.map(boardHost),
      ...flakyNames.map(flakyBoardHost),
      ...vmNames.map(vmHost),
    ]);
    await saveState(config.dataDir, state);
    await ensureExamples(admin, state, {
      workDir: join(config.dataDir, "examples"),
      logger: child("testbed"),
      signal: stopSignal.signal,
    });
    examples = state.examples ?? [];
    await saveState(config.dataDir, state);

    // One supervisor per host: process and qemu hosts each claim free slot
    // uids (`auto`: no clash with another testbed or supervisor on this
    // machine), and a board-driver supervisor for each simulated board.
    const supervise = (name: string, extra: Partial<SupervisorConfig>, driver?: (logger: Logger) => Driver) => {
      const log = child("supervisor").child({ supervisor: name });
      return createSupervisor({
        config: {
          ...loadSupervisorConfig(noInput),
          name,
          logLevel: config.logLevel,
          coordinatorUrl: [coordinatorUrl],
          hostId: hosts[name].id,
          hostCredential: hosts[name].credential,
          workDir: join(config.dataDir, "supervisors", name),
          ...extra,
        },
        driver: driver?.(log.child({ subsystem: "driver" })),
        logger: log,
      });
    };
    // Flaky boards meet a fault at about a third of their power-ons (seeded
    // per board, so a run repeats), and come back after a serial drop.
    boards = await Promise.all([
      ...boardNames.map((name) => startSimBoard({ dir: join(config.dataDir, "boards", name), name, exitPattern: "TREADMILL_EXIT=(\\d+)" })),
      ...flakyNames.map((name, i) =>
        startSimBoard({
          dir: join(config.dataDir, "boards", name),
          name,
          exitPattern: "TREADMILL_EXIT=(\\d+)",
          bootTimeoutMs: 5000,
          faults: { ...FLAKY_RATES, seed: i + 1 },
          replug: true,
        }),
      ),
    ]);
    supervisors = [
      ...supervisorNames.map((name) => supervise(name, { driver: "process" })),
      ...[...boardNames, ...flakyNames].map((name, i) => supervise(name, { driver: "board" }, (log) => createBoardDriver(boards[i].config, log))),
      ...vmNames.map((name) =>
        supervise(name, {
          driver: "qemu",
          qemuAccel: config.vmAccel,
          qemuMemoryMb: config.vmMemoryMb,
          qemuReadyPattern: config.vmReadyPattern,
        }),
      ),
    ];
    await Promise.all(supervisors.map((s) => s.start()));
  }

  return {
    start() {
      started ??= startAll().catch(async (err: unknown) => {
        // Leave nothing running behind a failed start (a PostgreSQL above all).
        started = Promise.resolve();
        await stopAll();
        throw err;
      });
      return started;
    },
    stop() {
      stopping ??= stopAll();
      return stopping;
    },
    servers() {
      if (!coordinator) throw new Error("testbed not started");
      return [
        { role: "coordinator", url: coordinator.address().url },
        ...servers.map(([role, s]) => ({ role, url: s.address().url })),
      ];
    },
    supervisors: () => supervisors.map((s) => s.name),
    async stopSupervisor(name) {
      const supervisor = supervisors.find((s) => s.name === name);
      if (!supervisor) throw new Error(`no supervisor ${name}`);
      await supervisor.stop();
    },
    admin: () => ({ name: ADMIN_NAME, passwordFile: join(config.dataDir, "admin-password"), password: adminPassword }),
    examples: () => examples,
  };
}

/**
 * The origins a browser may show the coordinator's console under: its URL,
 * and for a loopback or wildcard address the loopback names too (a browser
 * opened at http://localhost:7700 reaches http://127.0.0.1:7700).
 */
export function consoleOrigins(coordinatorUrl: string): string[] {
  const url = new URL(coordinatorUrl);
  const origins = new Set([url.origin]);
  if (["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "[::]"].includes(url.hostname)) {
    for (const host of ["127.0.0.1", "localhost", "[::1]"]) origins.add(`${url.protocol}//${host}:${url.port}`);
  }
  return [...origins];
}
