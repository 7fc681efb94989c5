import { randomUUID } from "node:crypto";
import { readFile, mkdir } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationMs, timestampFromDate, timestampNow } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { DriverKind } from "../gen/treadmill/coordinator/v1/host_pb.js";
import { FinalizeReason, JobState } from "../gen/treadmill/coordinator/v1/job_pb.js";
import {
  type AttachRequest,
  AttachRequestSchema,
  type AttachResponse,
  type StartJob,
  type StopJob,
  SupervisorService,
} from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { Notifier } from "../lib/async/notifier.js";
import { AsyncQueue } from "../lib/async/queue.js";
import { coordinatorTransport } from "../lib/coordinator-client.js";
import { loadClientTls } from "../lib/grpc/trust.js";
import type { Logger } from "../lib/logger.js";
import { displayUrl, ReplicaSet, replicaTransport } from "../lib/replicas.js";
import { keepStreaming } from "../lib/retry.js";
import { PROTOCOL_VERSION } from "../lib/protocol.js";
import type { SupervisorConfig } from "./config.js";
import { createBoardDriver, parseBoardConfig } from "./drivers/board-driver.js";
import type { Driver } from "./drivers/driver.js";
import { createProcessDriver } from "./drivers/process-driver.js";
import { createQemuDriver } from "./drivers/qemu-driver.js";
import { ImageProvisioner } from "./images.js";
import { JobLogs } from "./job-logs.js";
import { JobResults } from "./job-results.js";
import { JobRunner, type RunnerReport, type Termination } from "./job-runner.js";
import { Snapshotter } from "./snapshot.js";
import type { ArtifactsReport } from "./artifacts.js";
import { HostControls } from "./host-control.js";

const SUPERVISOR_VERSION = "0.1.0";

/**
 * Where the supervisor is in its life. `refused` is final: the coordinator
 * said this supervisor may not attach (bad credential, incompatible protocol),
 * and retrying would only repeat that.
 */
export type SupervisorState = "idle" | "connecting" | "attached" | "backing-off" | "refused" | "stopped";

export interface Supervisor {
  readonly name: string;
  /** The coordinator's replicas, in the order tried. */
  readonly coordinatorUrls: readonly string[];
  start(): Promise<void>;
  /**
   * Idempotent. Takes no new jobs; stops running ones (or, with
   * `drainOnStop`, lets them finish), reports their ends, then closes the
   * stream. Resolves once everything is done.
   */
  stop(): Promise<void>;
  state(): SupervisorState;
  /** Job attempts held (running, or terminated and not yet acknowledged). */
  jobs(): { jobId: string; attempt: number; state: JobState; terminated: boolean }[];
}

const driverKinds = {
  process: DriverKind.PROCESS,
  board: DriverKind.BOARD,
  qemu: DriverKind.QEMU,
} as const;

/** Codes after which attaching again cannot succeed without an operator. */
const FINAL_CODES = new Set([Code.Unauthenticated, Code.PermissionDenied, Code.FailedPrecondition]);

/** How long a stopping supervisor waits for the coordinator to acknowledge its last reports. */
const FINAL_ACK_WAIT_MS = 5000;

/**
 * The supervisor core (DESIGN.md §4, §9): holds the `Attach` stream to the
 * coordinator forever, reconnecting with exponential backoff and jitter while
 * jobs keep running (to the next of the coordinator's replicas when the one it
 * used cannot be reached: lib/replicas.ts); opens every stream with the full state (`Hello`); turns
 * commands into JobRunners, idempotently by job and attempt; reports every
 * change and retains each terminal report until the coordinator acknowledges
 * it. The driver does the host-specific work and knows nothing of gRPC.
 */
export function createSupervisor({
  config,
  logger,
  transport,
  driver: givenDriver,
}: {
  config: SupervisorConfig;
  logger: Logger;
  /** For tests; by default gRPC over HTTP/2 to the replicas of `coordinatorUrl` with the host credential. */
  transport?: Transport;
  /** For tests; by default made from the config. */
  driver?: Driver;
}): Supervisor {
  const name = config.name === "" ? hostname() : config.name;
  const instanceId = randomUUID();
  const abort = new AbortController();
  const runners = new Map<string, JobRunner>();
  // Every https server it dials (coordinator, caches, stores, log servers, proxies) is verified with it.
  const tls = loadClientTls(config.caFile);
  const images = new ImageProvisioner({ blobDir: join(config.workDir, "blobs"), logger, fetchBudgetMs: config.imageFetchBudgetMs, tls });
  let driver: Driver | undefined = givenDriver;
  let state: SupervisorState = "idle";
  let loop: Promise<void> | undefined;
  let stopping: Promise<void> | undefined;
  let draining = false;
  /** This host's id: configured, or learned from the coordinator's welcome. */
  let hostId = config.hostId;
  let outbox: AsyncQueue<AttachRequest> | undefined;
  /** Wakes waiters at every change of the supervisor's state. */
  const changed = new Notifier();
  const snapshots = new Snapshotter({
    driver: () => driver!,
    logger: logger.child({ subsystem: "snapshot" }),
    dir: join(config.workDir, "snapshots"),
    send: (value) => send({ case: "snapshotResult", value }),
    signal: abort.signal,
    tls,
  });

  const controls = new HostControls({
    logger: logger.child({ subsystem: "host-control" }),
    send: (value) => send({ case: "hostControlResult", value }),
  });

  const replicas = new ReplicaSet({ urls: config.coordinatorUrl, logger });
  const client = createClient(
    SupervisorService,
    transport ?? replicaTransport(replicas, (url) => coordinatorTransport(url, config.hostCredential, tls)),
  );
  const key = (jobId: string, attempt: number) => `${jobId}/${attempt}`;
  /** Artifact reports sent and not yet acknowledged, by report id: sent again after every attach. */
  const artifactReports = new Map<string, ArtifactsReport>();
  type Payload = MessageInitShape<typeof AttachRequestSchema>["payload"];
  const send = (payload: Payload) => outbox?.push(create(AttachRequestSchema, { payload }));
  // Job logs outlive their runners (a log server was down) and this process (resumed at start).
  const logs = new JobLogs({
    spillDir: join(config.workDir, "spill"),
    capBytes: config.logSpillCapBytes,
    logger,
    send,
    changed: () => changed.notify(),
    tls,
  });

  // Results reports, retained until acknowledged like the log reports.
  const results = new JobResults({
    logger,
    send,
    changed: () => changed.notify(),
    limits: { maxCases: config.resultsMaxCases, maxBytes: config.resultsMaxBytes, collectMs: config.resultsCollectMs },
  });

  function termination(t: Termination) {
    return {
      reason: t.reason,
      exitStatus: t.exitStatus,
      exitCode: t.exitCode,
      message: t.message,
      time: timestampFromDate(t.at),
      held: t.held === true,
    };
  }

  function reportOf(runner: JobRunner, report: RunnerReport): void {
    send({
      case: "jobStateReport",
      value: {
        reportId: randomUUID(),
        jobId: runner.jobId,
        attempt: runner.attempt,
        state: report.state,
        stage: report.stage,
        message: report.message,
        termination: report.termination ? termination(report.termination) : undefined,
        time: timestampNow(),
      },
    });
    changed.notify();
  }

  function hello(): Payload {
    return {
      case: "hello",
      value: {
        protocolVersion: PROTOCOL_VERSION,
        hostId: config.hostId,
        supervisorVersion: SUPERVISOR_VERSION,
        instanceId,
        driverKind: driverKinds[config.driver],
        capacity: config.capacity,
        draining,
        jobs: [...runners.values()].map((r) => {
          const held = r.held();
          return {
            jobId: r.jobId,
            attempt: r.attempt,
            state: held.state,
            stage: held.stage,
            termination: held.termination ? termination(held.termination) : undefined,
          };
        }),
      },
    };
  }

  function ack(requestId: string, error?: ConnectError): void {
    send({
      case: "commandAck",
      value: error
        ? { requestId, ok: false, errorCode: error.code, errorMessage: error.rawMessage }
        : { requestId, ok: true },
    });
  }

  function onStartJob(cmd: StartJob): void {
    const existing = runners.get(key(cmd.jobId, cmd.attempt));
    if (existing) {
      existing.renew(cmd);
      ack(cmd.requestId);
      return;
    }
    const active = [...runners.values()].filter((r) => !r.terminated()).length;
    if (draining) return ack(cmd.requestId, new ConnectError("supervisor is draining", Code.FailedPrecondition));
    if (active >= config.capacity) {
      return ack(cmd.requestId, new ConnectError(`host runs ${active} jobs, its capacity`, Code.ResourceExhausted));
    }
    if (!cmd.spec || !cmd.image) {
      return ack(cmd.requestId, new ConnectError("start_job needs spec and image", Code.InvalidArgument));
    }
    if (logs.holds(cmd.jobId, cmd.attempt)) {
      // It ran here already (its log is still being shipped, maybe by an earlier process): never twice.
      const message = `job ${cmd.jobId} attempt ${cmd.attempt} already ran on this host`;
      return ack(cmd.requestId, new ConnectError(message, Code.FailedPrecondition));
    }
    if ((cmd.logs?.serverUrls ?? []).length === 0) {
      return ack(cmd.requestId, new ConnectError("start_job names no log server: the job's output would have nowhere to go", Code.FailedPrecondition));
    }
    // A command this supervisor cannot carry out is refused on the stream, never by ending it.
    let runner: JobRunner;
    try {
      runner = new JobRunner(cmd, {
        driver: driver!,
        images,
        logger,
        logs,
        results,
        report: (report) => reportOf(runner, report),
        hostId: () => hostId,
        tls,
        reportArtifacts: (report) => {
          artifactReports.set(report.reportId!, report);
          send({ case: "jobArtifactsReport", value: report });
        },
        artifactDeadlineMs: config.artifactDeadlineMs,
        spoolDir: join(config.workDir, "console-artifacts"),
      });
    } catch (err) {
      logger.error({ err, jobId: cmd.jobId, attempt: cmd.attempt }, "cannot start job");
      const message = err instanceof Error ? err.message : String(err);
      return ack(cmd.requestId, new ConnectError(`cannot start the job: ${message}`, Code.FailedPrecondition));
    }
    runners.set(key(cmd.jobId, cmd.attempt), runner);
    logger.info({ jobId: cmd.jobId, attempt: cmd.attempt }, "job started");
    ack(cmd.requestId);
  }

  function onStopJob(cmd: StopJob): void {
    const runner = runners.get(key(cmd.jobId, cmd.attempt));
    runner?.stop(cmd.reason, cmd.gracePeriod ? durationMs(cmd.gracePeriod) : config.stopGraceMs);
    ack(cmd.requestId);
  }

  /** One stream's life: resolves when the coordinator ends it, throws on error. */
  async function attachOnce(onAttached: () => void): Promise<void> {
    const stream = new AsyncQueue<AttachRequest>();
    const endStream = () => stream.end();
    abort.signal.addEventListener("abort", endStream, { once: true });
    outbox = stream;
    let heartbeat: NodeJS.Timeout | undefined;
    try {
      send(hello());
      for await (const message of client.attach(stream, { signal: abort.signal })) {
        try {
          handle(message.payload);
        } catch (err) {
          // A message this supervisor cannot handle is answered (when it is a command), never the stream's end.
          logger.error({ err, message: message.payload.case }, "cannot handle a message from the coordinator");
          const requestId = (message.payload.value as { requestId?: string } | undefined)?.requestId;
          if (requestId) ack(requestId, new ConnectError("the supervisor could not handle the command", Code.Internal));
        }
      }
    } finally {
      clearInterval(heartbeat);
      abort.signal.removeEventListener("abort", endStream);
      stream.end();
      if (outbox === stream) outbox = undefined;
    }

    function handle(payload: AttachResponse["payload"]): void {
      switch (payload.case) {
        case "welcome": {
          state = "attached";
          onAttached();
          const everyMs = payload.value.heartbeatInterval ? durationMs(payload.value.heartbeatInterval) : 10000;
          clearInterval(heartbeat);
          heartbeat = setInterval(
            () => send({ case: "heartbeat", value: { time: timestampNow(), draining } }),
            Math.max(100, everyMs),
          );
          hostId = payload.value.host?.id ?? hostId;
          logger.info({ hostId, coordinatorUrl: displayUrl(replicas.current) }, "attached to coordinator");
          logs.attached();
          results.attached();
          for (const report of artifactReports.values()) send({ case: "jobArtifactsReport", value: report });
          changed.notify();
          break;
        }
        case "startJob":
          onStartJob(payload.value);
          break;
        case "stopJob":
          onStopJob(payload.value);
          break;
        case "ackReport":
          logs.acknowledged(payload.value.reportId);
          results.acknowledged(payload.value.reportId);
          artifactReports.delete(payload.value.reportId);
          if (payload.value.terminal) {
            const k = key(payload.value.jobId, payload.value.attempt);
            if (runners.get(k)?.terminated()) {
              runners.delete(k);
              changed.notify();
            }
          }
          break;
        case "logTokenGrant":
          logs.granted(payload.value);
          break;
        case "controlHost":
          controls.handle(payload.value, runners.get(key(payload.value.jobId, payload.value.attempt)));
          break;
        case "takeSnapshot":
          snapshots.take(payload.value, runners.get(key(payload.value.jobId, payload.value.attempt)));
          ack(payload.value.requestId);
          break;
        default:
          break;
      }
    }
  }

  async function run(): Promise<void> {
    await keepStreaming({
      // A stream that got as far as a welcome starts the backoff afresh.
      open(attempt) {
        state = "connecting";
        return attachOnce(() => attempt.healthy());
      },
      backoff: { initialMs: Math.min(250, config.reconnectMaxMs), maxMs: config.reconnectMaxMs, jitter: "full" },
      signal: abort.signal,
      onEnd: () => void logger.info("coordinator closed the stream"),
      onError(err, { repeated }) {
        const error = ConnectError.from(err);
        if (FINAL_CODES.has(error.code)) {
          state = "refused";
          logger.error(
            { code: Code[error.code], reason: error.rawMessage },
            "coordinator refused this supervisor; not retrying (check the host credential and version)",
          );
          return "stop";
        }
        // The same failure again (the coordinator is still down) is logged at
        // debug: an operator needs the first line and the change, not one a minute.
        logger[repeated ? "debug" : "warn"]({ code: Code[error.code], reason: error.rawMessage }, "cannot attach to coordinator");
        return "retry";
      },
      onBackoff() {
        state = "backing-off";
        changed.notify();
      },
    }).catch(() => undefined); // stopped by a refusal, logged above
  }

  async function createDriver(): Promise<Driver> {
    switch (config.driver) {
      case "process":
        return createProcessDriver({
          workDir: join(config.workDir, "process"),
          slots: config.capacity,
          slotUidBase: config.slotUidBase,
          sandbox: config.sandbox,
          network: config.jobNetwork,
          name,
          graceMs: config.stopGraceMs,
          logger: logger.child({ subsystem: "driver" }),
        });
      case "board": {
        if (config.boardConfigFile === "") throw new Error("the board driver needs --board-config-file");
        const board = parseBoardConfig(JSON.parse(await readFile(config.boardConfigFile, "utf8")));
        return createBoardDriver(board, logger.child({ subsystem: "driver" }));
      }
      case "qemu":
        return createQemuDriver({
          workDir: join(config.workDir, "qemu"),
          slots: config.capacity,
          slotUidBase: config.slotUidBase,
          network: config.jobNetwork,
          name,
          binary: config.qemuBinary,
          machine: config.qemuMachine,
          accel: config.qemuAccel,
          cpu: config.qemuCpu,
          cpus: config.qemuCpus,
          memoryMb: config.qemuMemoryMb,
          extraArgs: config.qemuExtraArgs,
          readyPattern: config.qemuReadyPattern,
          exitPattern: config.qemuExitPattern,
          sshPort: config.qemuSshPort,
          bootTimeoutMs: config.qemuBootTimeoutMs,
          graceMs: config.stopGraceMs,
          debugExit: config.qemuDebugExit,
          sandbox: config.qemuSandbox,
          logger: logger.child({ subsystem: "driver" }),
        });
    }
  }

  async function shutdown(): Promise<void> {
    draining = true;
    send({ case: "heartbeat", value: { time: timestampNow(), draining } });
    const active = () => [...runners.values()].filter((r) => !r.terminated());
    if (!config.drainOnStop) {
      for (const runner of active()) runner.stop(FinalizeReason.INTERNAL_ERROR, config.stopGraceMs);
    } else if (active().length > 0) {
      logger.info({ jobs: active().length }, "draining: waiting for running jobs to finish");
    }
    await Promise.all([...runners.values()].map((r) => r.done));
    // Give the coordinator a moment to acknowledge the last reports; what it
    // does not acknowledge now, it learns from the next supervisor's hello.
    const deadline = Date.now() + FINAL_ACK_WAIT_MS;
    while ((runners.size > 0 || logs.unacknowledged() > 0 || results.unacknowledged() > 0) && state === "attached" && Date.now() < deadline) {
      await changed.wait({ timeoutMs: deadline - Date.now() });
    }
    abort.abort(new ConnectError("supervisor stopping", Code.Canceled));
    await loop;
    // Logs still shipping stay in the spill; the next start resumes them.
    await logs.stop();
    await driver?.close();
    state = state === "refused" ? state : "stopped";
  }

  return {
    name,
    coordinatorUrls: config.coordinatorUrl,
    async start() {
      await mkdir(config.workDir, { recursive: true });
      driver ??= await createDriver();
      await logs.start();
      if (config.hostCredential === "" && transport === undefined) {
        logger.warn("no host credential configured: the coordinator will refuse to attach this supervisor");
      }
      loop ??= run().finally(() => {
        if (state !== "refused") state = "stopped";
      });
    },
    stop() {
      stopping ??= shutdown();
      return stopping;
    },
    state: () => state,
    jobs: () =>
      [...runners.values()].map((r) => ({
        jobId: r.jobId,
        attempt: r.attempt,
        state: r.held().state,
        terminated: r.terminated(),
      })),
  };
}

