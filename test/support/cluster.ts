/**
 * A site made of real processes, for crash tests: the coordinator and every
 * supervisor are child processes of the test (bin/treadmill-coordinator.js,
 * bin/treadmill-supervisor.js) that a test may SIGKILL and start again; the
 * coordinator keeps its state in the test run's PostgreSQL (a database of
 * its own, test/support/db.ts), which outlives it. The image store, the site
 * cache and the log server run in the test process (nothing here kills
 * them, but the log server can be stopped and started again on the same
 * port and data directory, for log-server outages). Each supervisor claims
 * free slot uids of its own (`--slot-uid-base auto`, the default: never
 * shared with another supervisor on the machine).
 */
import { randomBytes } from "node:crypto";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient, type Transport } from "@connectrpc/connect";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import type { ServingComponent } from "../../lib/component.js";
import { silentLogger } from "../../lib/logger.js";
import { loadImageStoreConfig } from "../../stores/image/config.js";
import { createImageStore } from "../../stores/image/image-store.js";
import { loadLogServerConfig } from "../../stores/log/config.js";
import { createLogServer } from "../../stores/log/log-server.js";
import { adminTransport, processHost } from "../../testbed/provision.js";
import { createTestDatabase, type TestDatabase } from "./db.js";
import { startProcess, type RunningProcess } from "./process.js";
import { jobTools, type JobTools } from "./testbed.js";

const noInput = { env: {}, argv: [] };
const SITE = "local";

/** One supervisor of the cluster: its host, and its current process. */
export interface ClusterSupervisor {
  name: string;
  hostId: string;
  workDir: string;
  /** The running process (the latest one after a restart). */
  proc: RunningProcess;
}

export interface Cluster extends JobTools {
  dir: string;
  db: TestDatabase;
  coordinatorUrl: string;
  /** A transport with the admin's token. */
  admin: Transport;
  /** The coordinator's current process. */
  coordinator(): RunningProcess;
  supervisors: Map<string, ClusterSupervisor>;
  /** The supervisor holding host `hostId`. */
  supervisorOf(hostId: string): ClusterSupervisor;
  /** SIGKILLs the coordinator and waits for it to be gone. */
  killCoordinator(): Promise<void>;
  /** Starts the coordinator again, on the same port and database; resolves once it serves. */
  startCoordinator(): Promise<void>;
  /** SIGKILLs a supervisor (its jobs die with it: their parent-death signal). */
  killSupervisor(name: string): Promise<void>;
  /** Starts a supervisor's process again (same host and work directory, whose slot uids it prefers); resolves once attached. */
  startSupervisor(name: string): Promise<void>;
  /** Waits for the supervisor's next attachment after its output line number `from`. */
  waitAttached(name: string, from: number): Promise<void>;
  /** The log server's URL (the same across its restarts). */
  logServerUrl: string;
  /** Stops the log server (an outage); its data stays. */
  stopLogServer(): Promise<void>;
  /** Starts the log server again on the same port and data directory. */
  startLogServer(): Promise<void>;
  /** The root file system of a job attempt on a supervisor, as the supervisor's host sees it. */
  jobRoot(name: string, jobId: string, attempt: number): string;
  stop(): Promise<void>;
}

/**
 * Starts a coordinator child on a fresh database, an image store, a cache and
 * a log server in this process, and `supervisors` supervisor children (hosts
 * `sup-1`...). `coordinatorArgs` adds flags (e.g. a short grace period).
 */
export async function startCluster(options: { supervisors: number; coordinatorArgs?: string[]; supervisorArgs?: string[] }): Promise<Cluster> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-cluster-"));
  await chmod(dir, 0o755); // job slot uids must reach their work directories
  const db = await createTestDatabase();
  const adminPassword = randomBytes(18).toString("base64url");
  const servers: ServingComponent[] = [];
  const supervisors = new Map<string, ClusterSupervisor>();
  const credentials = new Map<string, string>();
  let coordinator: RunningProcess | undefined;
  let port = 0;
  let logServer: ServingComponent | undefined;
  let logServerPort = 0;

  async function startCoordinator(): Promise<string> {
    const proc = startProcess(
      "bin/treadmill-coordinator.js",
      ["--port", String(port), "--data-dir", join(dir, "coordinator"), ...(options.coordinatorArgs ?? [])],
      { DATABASE_URL: db.url, TREADMILL_COORDINATOR_ADMIN_PASSWORD: adminPassword },
    );
    coordinator = proc;
    const url = (JSON.parse(await proc.waitForLine(/coordinator ready/, 60000)) as { url: string }).url;
    port = Number(new URL(url).port);
    return url;
  }

  function startSupervisor(sup: Omit<ClusterSupervisor, "proc">, coordinatorUrl: string): RunningProcess {
    return startProcess(
      "bin/treadmill-supervisor.js",
      [
        "--coordinator-url", coordinatorUrl,
        "--name", sup.name,
        "--host-id", sup.hostId,
        "--work-dir", sup.workDir,
        "--reconnect-max-ms", "1000",
        "--stop-grace-ms", "2000",
        ...(options.supervisorArgs ?? []),
      ],
      { TREADMILL_SUPERVISOR_HOST_CREDENTIAL: credentials.get(sup.name)! },
    );
  }

  const attached = /"attached to coordinator"/;
  const stopAll = async () => {
    for (const s of supervisors.values()) s.proc.child.kill("SIGTERM");
    await Promise.all([...supervisors.values()].map((s) => s.proc.exited));
    await Promise.all(servers.map((s) => s.stop()));
    await logServer?.stop();
    coordinator?.child.kill("SIGTERM");
    await coordinator?.exited;
    await db.drop();
    await rm(dir, { recursive: true, force: true });
  };

  try {
    const coordinatorUrl = await startCoordinator();
    const admin = await adminTransport(coordinatorUrl, { adminPassword, hosts: {} });
    const serviceCredential = (
      await createClient(AuthService, admin).createToken({ scope: TokenScope.SERVICE, description: "cluster services" })
    ).token;
    const registered = { coordinatorUrl: [coordinatorUrl], serviceCredential, port: 0, site: SITE };
    servers.push(
      createImageStore({
        config: { ...loadImageStoreConfig(noInput), ...registered, mode: "store", dataDir: join(dir, "image-store") },
        logger: silentLogger(),
      }),
      createImageStore({
        config: {
          ...loadImageStoreConfig(noInput),
          ...registered,
          mode: "cache",
          dataDir: join(dir, "image-cache"),
          // Supervisors run on this machine: they read blobs in place.
          sharedPath: join(dir, "image-cache"),
        },
        logger: silentLogger(),
      }),
    );
    await Promise.all(servers.map((s) => s.start()));
    const startLogServer = async () => {
      logServer = createLogServer({
        config: { ...loadLogServerConfig(noInput), ...registered, port: logServerPort, dataDir: join(dir, "log-server") },
        logger: silentLogger(),
      });
      await logServer.start();
      logServerPort = Number(new URL(logServer.address().url).port);
    };
    await startLogServer();
    const logServerUrl = logServer!.address().url;

    const hosts = createClient(HostService, admin);
    for (let i = 1; i <= options.supervisors; i++) {
      const name = `sup-${i}`;
      const created = await hosts.createHost({ ...processHost(name), site: SITE, capacity: 1 });
      credentials.set(name, created.credential);
      const sup = { name, hostId: created.host!.id, workDir: join(dir, "supervisors", name) };
      supervisors.set(name, { ...sup, proc: startSupervisor(sup, coordinatorUrl) });
    }
    await Promise.all([...supervisors.values()].map((s) => s.proc.waitForLine(attached, 60000)));

    const get = (name: string) => {
      const sup = supervisors.get(name);
      if (sup === undefined) throw new Error(`no supervisor ${name} in the cluster`);
      return sup;
    };
    return {
      ...jobTools(admin, join(dir, "images")),
      dir,
      db,
      coordinatorUrl,
      admin,
      coordinator: () => coordinator!,
      supervisors,
      supervisorOf(hostId) {
        const sup = [...supervisors.values()].find((s) => s.hostId === hostId);
        if (sup === undefined) throw new Error(`no supervisor holds host ${hostId}`);
        return sup;
      },
      async killCoordinator() {
        coordinator!.child.kill("SIGKILL");
        await coordinator!.exited;
      },
      async startCoordinator() {
        await startCoordinator();
      },
      async killSupervisor(name) {
        const sup = get(name);
        sup.proc.child.kill("SIGKILL");
        await sup.proc.exited;
      },
      async startSupervisor(name) {
        const sup = get(name);
        sup.proc = startSupervisor(sup, coordinatorUrl);
        await sup.proc.waitForLine(attached, 60000);
      },
      async waitAttached(name, from) {
        await get(name).proc.waitForLine(attached, 60000, from);
      },
      logServerUrl,
      async stopLogServer() {
        await logServer?.stop();
        logServer = undefined;
      },
      startLogServer,
      jobRoot: (name, jobId, attempt) => join(get(name).workDir, "process", "jobs", `${jobId}.${attempt}`, "rootfs"),
      stop: stopAll,
    };
  } catch (err) {
    await stopAll().catch(() => undefined);
    throw err;
  }
}

