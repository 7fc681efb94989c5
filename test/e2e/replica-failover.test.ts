/**
 * Clients that know several coordinator replicas (issue #20 item 4): two
 * coordinator replicas on one database, each a child process; a supervisor
 * and a log server (child processes too) given both with
 * `--coordinator-url A,B`, and `tml` with `TML_SERVER=A,B`. Replica A, which
 * every client uses first, is SIGKILLed while a job runs: the supervisor's
 * stream and the log server's registration move to B, the job finishes
 * succeeded with its whole log, and tml keeps working.
 */
import { spawn } from "node:child_process";
import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createClient, type Transport } from "@connectrpc/connect";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ExitStatus, FinalizeReason, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { RegistryService, ServiceKind } from "../../gen/treadmill/coordinator/v1/registry_service_pb.js";
import type { ServingComponent } from "../../lib/component.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { silentLogger } from "../../lib/logger.js";
import { loadImageStoreConfig } from "../../stores/image/config.js";
import { createImageStore } from "../../stores/image/image-store.js";
import { processHost } from "../../testbed/provision.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";
import { startProcess, type RunningProcess } from "../support/process.js";
import { jobTools, type JobTools } from "../support/testbed.js";
import { waitUntil } from "../support/wait.js";

const noInput = { env: {}, argv: [] };
const SITE = "local";
const TML = new URL("../../bin/tml.js", import.meta.url).pathname;

/** The workload: 50 lines, then waits for /go (created by the test in its root), then 50 more. */
const SCRIPT = 'for i in $(seq 1 50); do echo "before $i"; done; while [ ! -e /go ]; do sleep 0.1; done; for i in $(seq 1 50); do echo "after $i"; done';
const EXPECTED_LOG = [...Array.from({ length: 50 }, (_, i) => `before ${i + 1}`), ...Array.from({ length: 50 }, (_, i) => `after ${i + 1}`)]
  .map((line) => `${line}\n`)
  .join("");

describe("clients of two coordinator replicas when the one they use is killed", () => {
  let dir: string;
  let db: TestDatabase;
  const replicas: RunningProcess[] = [];
  let urls: string[];
  let token: string;
  let admin: Transport;
  let tools: JobTools;
  let servers: ServingComponent[] = [];
  let logServer: RunningProcess;
  let supervisor: RunningProcess;
  let workDir: string;
  let jobId: string;
  /** Output line numbers of the supervisor and the log server when replica A was killed. */
  let supervisorMark = 0;
  let logServerMark = 0;

  /** The job's console as lines end on a terminal's output: "\r\n" read as "\n". */
  const consoleText = async (id: string) => (await tools.readLog(id, "console")).replace(/\r\n/g, "\n");

  const startReplica = async (name: string, adminPassword: string) => {
    const proc = startProcess(
      "bin/treadmill-coordinator.js",
      ["--port", "0", "--data-dir", join(dir, name), "--service-heartbeat-ms", "500", "--supervisor-heartbeat-ms", "1000"],
      { DATABASE_URL: db.url, TREADMILL_COORDINATOR_ADMIN_PASSWORD: adminPassword },
    );
    replicas.push(proc);
    return (JSON.parse(await proc.waitForLine(/coordinator ready/, 60_000)) as { url: string }).url;
  };

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "treadmill-replicas-"));
    await chmod(dir, 0o755); // job slot uids must reach their work directories
    db = await createTestDatabase();
    const adminPassword = "replica failover admin";
    urls = [await startReplica("coordinator-a", adminPassword), await startReplica("coordinator-b", adminPassword)];
    token = (await createClient(AuthService, coordinatorTransport(urls)).login({ name: "admin", password: adminPassword, description: "replica test" }))
      .token;
    admin = coordinatorTransport(urls, token);
    tools = jobTools(admin, join(dir, "images"));
    const serviceCredential = (await createClient(AuthService, admin).createToken({ scope: TokenScope.SERVICE, description: "replica test" })).token;

    const registered = { coordinatorUrl: urls, serviceCredential, port: 0, site: SITE };
    servers = [
      createImageStore({ config: { ...loadImageStoreConfig(noInput), ...registered, mode: "store", dataDir: join(dir, "store") }, logger: silentLogger() }),
      createImageStore({
        config: { ...loadImageStoreConfig(noInput), ...registered, mode: "cache", dataDir: join(dir, "cache"), sharedPath: join(dir, "cache") },
        logger: silentLogger(),
      }),
    ];
    await Promise.all(servers.map((s) => s.start()));
    logServer = startProcess(
      "bin/treadmill-log-server.js",
      ["--port", "0", "--data-dir", join(dir, "logs"), "--site", SITE, "--coordinator-url", urls.join(",")],
      { TREADMILL_LOG_SERVER_SERVICE_CREDENTIAL: serviceCredential },
    );
    await logServer.waitForLine(/"registered with coordinator"/, 60_000);

    const created = await createClient(HostService, admin).createHost({ ...processHost("sup-1"), site: SITE, capacity: 1 });
    workDir = join(dir, "sup-1");
    supervisor = startProcess(
      "bin/treadmill-supervisor.js",
      ["--coordinator-url", urls.join(","), "--name", "sup-1", "--host-id", created.host!.id, "--work-dir", workDir, "--reconnect-max-ms", "1000"],
      { TREADMILL_SUPERVISOR_HOST_CREDENTIAL: created.credential },
    );
    await supervisor.waitForLine(/"attached to coordinator"/, 60_000);
    await tools.pushShellImage("test/sh:1");
  }, 180_000);

  afterAll(async () => {
    for (const proc of [supervisor, logServer, ...replicas]) {
      if (proc === undefined) continue;
      proc.child.kill("SIGTERM");
      await proc.exited;
    }
    await Promise.all(servers.map((s) => s.stop()));
    await db?.drop();
    if (dir) await rm(dir, { recursive: true, force: true });
  }, 60_000);

  it("moves the supervisor's stream to the surviving replica, and the job it runs finishes succeeded with its whole log", async () => {
    const attachedTo = (line: string) => (JSON.parse(line) as { coordinatorUrl: string }).coordinatorUrl;
    expect(attachedTo(await supervisor.waitForLine(/"attached to coordinator"/))).toBe(urls[0]);
    const { job } = await createClient(JobService, admin).submitJob({
      spec: { image: "test/sh:1", hosts: { hostCount: 1 }, parameters: [{ name: "script", value: SCRIPT }] },
    });
    jobId = job!.id;
    await tools.waitState(jobId, JobState.RUNNING);
    // The channel exists once the first frame landed.
    const log = () => consoleText(jobId).catch(() => "");
    await waitUntil(async () => (await log()).includes("before 50\n"), "the job's first 50 lines");

    supervisorMark = supervisor.lines.length;
    logServerMark = logServer.lines.length;
    replicas[0].child.kill("SIGKILL");
    await replicas[0].exited;

    const moved = JSON.parse(await supervisor.waitForLine(/moving to the next/, 30_000, supervisorMark)) as { from: string; to: string; level: number };
    expect([moved.from, moved.to, moved.level]).toEqual([urls[0], urls[1], 30]);
    expect(attachedTo(await supervisor.waitForLine(/"attached to coordinator"/, 30_000, supervisorMark))).toBe(urls[1]);

    await writeFile(join(workDir, "process", "jobs", `${jobId}.1`, "rootfs", "go"), "");
    const done = await tools.waitFinalized(jobId, 60_000);
    expect([done.finalizeReason, done.exitStatus, done.attempt]).toEqual([FinalizeReason.WORKLOAD_EXITED, ExitStatus.SUCCESS, 1]);
    expect(await consoleText(jobId)).toBe(EXPECTED_LOG);
    // The supervisor started it once: the surviving replica adopted the running job rather than starting it again.
    const starts = supervisor.lines.filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as { msg: string; subsystem?: string });
    expect(starts.filter((l) => l.msg === "job started" && !l.subsystem)).toHaveLength(1);
  }, 120_000);

  it("moves the log server's registration to the surviving replica, where its heartbeats go on", async () => {
    const moved = JSON.parse(await logServer.waitForLine(/moving to the next/, 30_000, logServerMark)) as { from: string; to: string; subsystem: string };
    expect([moved.from, moved.to]).toEqual([urls[0], urls[1]]);
    const using = JSON.parse(await logServer.waitForLine(/"using coordinator replica"/, 30_000, logServerMark)) as { url: string };
    expect(using.url).toBe(urls[1]);
    // Its heartbeat lands after the kill: the registry row's last heartbeat moves on.
    const seen = async () => {
      const [row] = await db.sql<{ at: Date }[]>`select last_heartbeat_at as at from services where kind = 'log_server'`;
      return row.at.getTime();
    };
    const first = await seen();
    await waitUntil(async () => (await seen()) > first, "a heartbeat from the log server through the surviving replica", 20_000);
    const services = await createClient(RegistryService, admin).listServices({});
    expect(services.services.filter((s) => s.kind === ServiceKind.LOG_SERVER)).toHaveLength(1);
  }, 60_000);

  it("runs `tml job list` with the first replica dead", async () => {
    const config = join(dir, "tml.json");
    const child = spawn(process.execPath, [TML, "job", "list", "-o", "json"], {
      env: { ...process.env, TML_CONFIG: config, TML_SERVER: urls.join(","), TML_TOKEN: token, NO_COLOR: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    const code = await new Promise<number | null>((resolve) => child.once("exit", resolve));
    expect({ code, stderr }).toEqual({ code: 0, stderr: "" });
    expect(stdout).toContain(jobId);
  }, 30_000);
});
