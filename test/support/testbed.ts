import { chmod, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { Writable } from "node:stream";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import type { DescService } from "@bufbuild/protobuf";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { JobState, type Job } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { LogService } from "../../gen/treadmill/log/v1/log_service_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import type { ClientTls } from "../../lib/grpc/trust.js";
import { pushImage } from "../../lib/image/push.js";
import { createLogger } from "../../lib/logger.js";
import { loadTestbedConfig, type TestbedConfig } from "../../testbed/config.js";
import type { CoordinatorConfig } from "../../coordinator/config.js";
import { buildBusyboxImage, type FileSpec } from "../../testbed/images.js";
import { adminTransport, loadState } from "../../testbed/provision.js";
import { createTestbed, type Testbed } from "../../testbed/testbed.js";

/** The all-in-one testbed in the test process, with every log line kept. */
export interface RunningTestbed extends JobTools {
  testbed: Testbed;
  dir: string;
  coordinatorUrl: string;
  /** Every log line any component wrote (JSON), for secret-leak checks. */
  logLines: string[];
  /** A transport to the coordinator with the admin's token. */
  admin: Transport;
  stop(): Promise<void>;
}

/** What tests do with jobs on any coordinator, given a transport with an admin's token. */
export interface JobTools {
  client<S extends DescService>(service: S): Client<S>;
  /** Pushes a busybox image whose entrypoint runs the `script` parameter with sh (as `as`, default the admin). */
  pushShellImage(name: string, files?: Record<string, FileSpec>, as?: Transport): Promise<void>;
  /** Waits until the job is FINALIZED (WatchJob), with a deadline. */
  waitFinalized(jobId: string, timeoutMs?: number): Promise<Job>;
  /** Waits until the job reaches `state` (or later). */
  waitState(jobId: string, state: JobState, timeoutMs?: number): Promise<Job>;
  /** The whole text of one channel of a job's log, from the log servers it names. */
  readLog(jobId: string, channel: string): Promise<string>;
}

/** Job helpers over `admin`; images are built under `imagesDir`; https stores and log servers are verified with `tls`. */
export function jobTools(admin: Transport, imagesDir: string, tls?: ClientTls): JobTools {
  const client = <S extends DescService>(service: S) => createClient(service, admin);
  const jobs = client(JobService);

  const waitState = async (jobId: string, state: JobState, timeoutMs = 60000) => {
    const abort = AbortSignal.timeout(timeoutMs);
    for await (const change of jobs.watchJob({ jobId }, { signal: abort })) {
      if (change.job && change.job.state >= state) return change.job;
    }
    throw new Error(`watch of job ${jobId} ended before state ${JobState[state]}`);
  };

  return {
    client,
    async pushShellImage(name, files, as) {
      const image = await buildBusyboxImage({
        dir: imagesDir,
        title: name,
        entrypoint: ["/bin/sh", "-c", 'eval "$TREADMILL_PARAM_script"'],
        files,
      });
      const [repo, tag] = name.split(":");
      await pushImage(
        as ?? admin,
        {
          manifestDigest: image.manifestDigest,
          manifestJson: image.manifestJson,
          blobs: image.layers.map((l) => ({ digest: l.digest, size: l.size, path: l.path })),
          mediaTypes: image.layers.map((l) => l.mediaType),
        },
        { name: repo, tag: tag ?? "latest", tls },
      );
    },
    waitFinalized: (jobId, timeoutMs) => waitState(jobId, JobState.FINALIZED, timeoutMs),
    waitState,
    async readLog(jobId, channel) {
      const access = await jobs.getJobLogAccess({ jobId });
      let lastError: unknown;
      for (const url of access.logServerUrls) {
        try {
          const logs = createClient(LogService, coordinatorTransport(url, access.readToken?.token ?? "", tls));
          const parts: Buffer[] = [];
          for await (const r of logs.read({ jobId, channel, start: { case: "fromSeq", value: 1n } })) {
            if (r.payload.case === "frame") parts.push(Buffer.from(r.payload.value.data));
          }
          return Buffer.concat(parts).toString("utf8");
        } catch (err) {
          lastError = err;
        }
      }
      throw lastError;
    },
  };
}

export async function startTestbed(
  options: {
    supervisors?: number;
    /** Further testbed settings (e.g. `vms`). */
    config?: Partial<TestbedConfig>;
    /** A directory of an earlier testbed to start again (kept at stop); default a new one, removed at stop. */
    dir?: string;
    /** Coordinator settings over its defaults. */
    coordinatorConfig?: Partial<CoordinatorConfig>;
  } = {},
): Promise<RunningTestbed> {
  const dir = options.dir ?? (await mkdtemp(join(tmpdir(), "treadmill-testbed-")));
  await chmod(dir, 0o755); // job slot uids and the postgres user must reach it
  const logLines: string[] = [];
  const sink = new Writable({
    write(chunk, _enc, done) {
      logLines.push(...String(chunk).split("\n").filter((l) => l !== ""));
      done();
    },
  });
  const logger = createLogger({ level: "debug", destination: sink });
  const testbed = createTestbed({
    config: {
      ...loadTestbedConfig({ env: {}, argv: [] }),
      basePort: 0,
      // Relative, as npm start's default (.treadmill) is: every component
      // must cope with a data directory relative to the working directory.
      dataDir: relative(process.cwd(), join(dir, "data")),
      supervisors: options.supervisors ?? 2,
      logLevel: "debug",
      ...options.config,
    },
    logger,
    coordinatorConfig: options.coordinatorConfig,
  });
  await testbed.start();
  const coordinatorUrl = testbed.servers()[0].url;
  const admin = await adminTransport(coordinatorUrl, await loadState(join(dir, "data")));
  return {
    ...jobTools(admin, join(dir, "images")),
    testbed,
    dir,
    coordinatorUrl,
    logLines,
    admin,
    async stop() {
      await testbed.stop();
      if (options.dir === undefined) await rm(dir, { recursive: true, force: true });
    },
  };
}
