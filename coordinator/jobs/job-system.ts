import type { ConnectRouter } from "@connectrpc/connect";
import { HealthService } from "../../gen/treadmill/coordinator/v1/health_service_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { SupervisorService } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { CoordinatorContext } from "../context.js";
import type { JobConfig } from "./config.js";
import { ArtifactKeeper } from "./artifact-keeper.js";
import { registerArtifactHandlers } from "./artifacts.js";
import { HealthKeeper } from "./health-keeper.js";
import { HealthServiceImpl } from "./health-service.js";
import { HostControls } from "./host-control.js";
import { JobServiceImpl } from "./job-service.js";
import { registerLogStatusHandlers } from "./log-status.js";
import { JobResults } from "./results.js";
import { JobMetrics } from "./metrics.js";
import { Scheduler } from "./scheduler.js";
import { Snapshots } from "./snapshots.js";
import { SupervisorHandlers } from "./stream-handlers.js";
import { SupervisorStreams } from "./supervisor-stream.js";
import { Sweeper } from "./sweeper.js";
import { JobWatchers } from "./watchers.js";
import { Watchdog } from "./watchdog.js";

/** Jobs, the scheduler and the supervisor stream: one unit with one life. */
export interface JobSystem {
  register(router: ConnectRouter): void;
  start(): Promise<void>;
  stop(): Promise<void>;
}

/** The parts, for tests that drive them directly (a pass, a sweep). */
export interface JobSystemParts extends JobSystem {
  scheduler: Scheduler;
  sweeper: Sweeper;
  health: HealthKeeper;
  artifactKeeper: ArtifactKeeper;
  streams: SupervisorStreams;
  /** Register with the server's registry to serve them on /metrics. */
  metrics: JobMetrics;
}

/**
 * JobService, SupervisorService.Attach, the scheduler and the sweep of this
 * replica, wired to the database's notifications (see store.ts for the
 * channels). Several replicas may run on one database.
 */
export function createJobSystem(ctx: CoordinatorContext): JobSystemParts {
  const config: JobConfig = ctx.config;
  const watchers = new JobWatchers();
  const watchdog = new Watchdog(ctx.logger.child({ subsystem: "watchdog" }), config.loopStallMs);
  const metrics = new JobMetrics(watchdog);
  // The supervisor's messages the stream does not own go to the part that
  // answers them: each part registers its payload cases here.
  const handlers = new SupervisorHandlers();
  const streams = new SupervisorStreams(ctx, config, handlers, metrics);
  const scheduler = new Scheduler(ctx, config, (hostId, starts) => streams.deliverStarts(hostId, starts), metrics);
  const sweeper = new Sweeper(ctx, config, metrics);
  const snapshots = new Snapshots(ctx, config, streams, watchers);
  snapshots.registerHandlers(handlers);
  const controls = new HostControls(ctx, config, streams, watchers);
  controls.registerHandlers(handlers);
  registerLogStatusHandlers(ctx, handlers);
  const results = new JobResults(ctx, config);
  results.registerHandlers(handlers);
  registerArtifactHandlers(ctx, handlers);
  const artifactKeeper = new ArtifactKeeper(ctx);
  const jobService = new JobServiceImpl(ctx, config, watchers, snapshots, controls, results);
  const health = new HealthKeeper(ctx, config);
  const healthService = new HealthServiceImpl(ctx, config);
  const unsubscribe: (() => void)[] = [];
  let started = false;
  let stopping: Promise<void> | undefined;

  return {
    scheduler,
    sweeper,
    health,
    artifactKeeper,
    streams,
    metrics,
    register(router) {
      router.service(JobService, jobService);
      router.service(HealthService, healthService);
      router.service(SupervisorService, { attach: (requests, hctx) => streams.attach(requests, hctx) });
    },
    async start() {
      started = true;
      const n = ctx.notifications;
      // After the LISTEN connection came back, anything may have been
      // missed: look again at everything.
      unsubscribe.push(
        n.onResync((downMs) => {
          scheduler.wake();
          health.wake();
          streams.syncAll(downMs);
          watchers.notifyAll();
        }),
        await n.subscribe("treadmill_schedule", () => scheduler.wake()),
        await n.subscribe("treadmill_commands", (hostId) => streams.onCommands(hostId)),
        await n.subscribe("treadmill_jobs", (jobId) => watchers.notify(jobId)),
        await n.subscribe("treadmill_health", () => health.wake()),
      );
      watchdog.start();
      streams.start();
      await snapshots.start();
      await controls.start();
      await sweeper.start();
      health.start();
      artifactKeeper.start();
      scheduler.wake();
    },
    stop() {
      stopping ??= (async () => {
        if (!started) return;
        for (const off of unsubscribe) off();
        await scheduler.stop();
        await snapshots.stop();
        controls.stop();
        await streams.stop();
        await sweeper.stop();
        await health.stop();
        await artifactKeeper.stop();
        watchdog.stop();
      })();
      return stopping;
    },
  };
}
