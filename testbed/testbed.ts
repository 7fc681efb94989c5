import { join } from "node:path";
import { loadCoordinatorConfig } from "../coordinator/config.js";
import { createCoordinator } from "../coordinator/coordinator.js";
import type { ServingComponent } from "../lib/component.js";
import type { Logger } from "../lib/logger.js";
import { loadProxyConfig } from "../proxy/config.js";
import { createProxy } from "../proxy/proxy.js";
import { loadImageStoreConfig } from "../stores/image/config.js";
import { createImageStore } from "../stores/image/image-store.js";
import { loadLogServerConfig } from "../stores/log/config.js";
import { createLogServer } from "../stores/log/log-server.js";
import { loadSupervisorConfig } from "../supervisor/config.js";
import { createSupervisor, type Supervisor } from "../supervisor/supervisor.js";
import type { TestbedConfig } from "./config.js";

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
}

const noInput = { env: {}, argv: [] };

/**
 * The all-in-one testbed: every component composed in one process, each with
 * its own folder under `dataDir` and its own child logger. Start order follows
 * the dependencies (coordinator first, supervisors last); stop is the reverse,
 * so supervisors leave before the servers they talk to.
 */
export function createTestbed({ config, logger }: { config: TestbedConfig; logger: Logger }): Testbed {
  const port = (offset: number) => (config.basePort === 0 ? 0 : config.basePort + offset);
  const common = {
    host: config.host,
    corsOrigins: config.corsOrigins,
    graceMs: config.graceMs,
    logLevel: config.logLevel,
  };
  const child = (component: string) => logger.child({ component });

  const coordinator = createCoordinator({
    config: {
      ...loadCoordinatorConfig(noInput),
      ...common,
      port: port(0),
      dataDir: join(config.dataDir, "coordinator"),
      databaseUrl: config.databaseUrl,
    },
    logger: child("coordinator"),
  });
  const servers: [TestbedServer["role"], ServingComponent][] = [
    [
      "image-store",
      createImageStore({
        config: { ...loadImageStoreConfig(noInput), ...common, port: port(1), mode: "store", dataDir: join(config.dataDir, "image-store") },
        logger: child("image-store"),
      }),
    ],
    [
      "image-cache",
      createImageStore({
        config: { ...loadImageStoreConfig(noInput), ...common, port: port(2), mode: "cache", dataDir: join(config.dataDir, "image-cache") },
        logger: child("image-cache"),
      }),
    ],
    [
      "log-server",
      createLogServer({
        config: { ...loadLogServerConfig(noInput), ...common, port: port(3), dataDir: join(config.dataDir, "log-server") },
        logger: child("log-server"),
      }),
    ],
    ["proxy", createProxy({ config: { ...loadProxyConfig(noInput), ...common, port: port(4) }, logger: child("proxy") })],
  ];
  let supervisors: Supervisor[] = [];
  let started: Promise<void> | undefined;
  let stopping: Promise<void> | undefined;

  const stopAll = async () => {
    await started?.catch(() => undefined);
    await Promise.all(supervisors.map((s) => s.stop()));
    await Promise.all(servers.map(([, s]) => s.stop()));
    await coordinator.stop();
  };

  return {
    start() {
      started ??= (async () => {
        try {
          await coordinator.start();
          await Promise.all(servers.map(([, s]) => s.start()));
          supervisors = Array.from({ length: config.supervisors }, (_, i) => {
            const name = `sup-${i + 1}`;
            return createSupervisor({
              config: {
                ...loadSupervisorConfig(noInput),
                name,
                logLevel: config.logLevel,
                coordinatorUrl: coordinator.address().url,
                driver: "process",
                workDir: join(config.dataDir, "supervisors", name),
                // Each supervisor's job slots get their own uids.
                slotUidBase: 61000 + i * 100,
              },
              logger: child("supervisor").child({ supervisor: name }),
            });
          });
          await Promise.all(supervisors.map((s) => s.start()));
        } catch (err) {
          // Leave nothing running behind a failed start (a PostgreSQL above all).
          started = Promise.resolve();
          await stopAll();
          throw err;
        }
      })();
      return started;
    },
    stop() {
      stopping ??= stopAll();
      return stopping;
    },
    servers() {
      return [
        { role: "coordinator", url: coordinator.address().url },
        ...servers.map(([role, s]) => ({ role, url: s.address().url })),
      ];
    },
    supervisors() {
      return supervisors.map((s) => s.name);
    },
  };
}
