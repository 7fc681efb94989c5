// A job's image fetch through outages (issue #18, defect 2): the supervisor
// falls back from its cache to the stores, retries unreachable sources with
// backoff within its fetch budget, and tells the image's fault (missing,
// corrupt: IMAGE_ERROR) from the infrastructure's (unreachable beyond the
// budget: HOST_START_FAILURE, restarted by policy). Real stores and caches on
// loopback, real ports that nothing listens on.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { FinalizeReason } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { ImageSourceSchema, StartJobSchema, type ImageSource } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { uploadBlob } from "../../lib/image/client.js";
import { silentLogger } from "../../lib/logger.js";
import { loadLogServerConfig } from "../../stores/log/config.js";
import { createLogServer } from "../../stores/log/log-server.js";
import { createBoardDriver } from "../../supervisor/drivers/board-driver.js";
import { ImageError, ImageProvisioner, ImageUnavailableError } from "../../supervisor/images.js";
import { JobResults } from "../../supervisor/job-results.js";
import { JobLogs } from "../../supervisor/job-logs.js";
import { JobRunner, type RunnerReport } from "../../supervisor/job-runner.js";
import {
  bufferSource,
  collect,
  makeSigner,
  makeTempDir,
  manifestFor,
  randomBlob,
  removeDir,
  startStore,
  type RunningStore,
  type Signer,
} from "../support/image-store.js";
import { freePort } from "../support/net.js";


describe("a job's image fetch through outages", () => {
  let dir: string;
  let signer: Signer;
  let origin: RunningStore;
  let token: string;
  const layer = randomBlob(50_000);
  const manifest = manifestFor([layer]);
  const provisioner = (budgetMs: number) =>
    new ImageProvisioner({
      blobDir: join(dir, "blobs"),
      logger: silentLogger(),
      fetchBudgetMs: budgetMs,
      retryDelays: function* () {
        for (;;) yield 50;
      },
    });
  const source = (init: Partial<ImageSource>) =>
    create(ImageSourceSchema, { manifestDigest: manifest.digest, cacheUrl: "", locationUrls: [], ...init });

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    origin = await startStore(signer, { dir: join(dir, "origin") });
    const alice = origin.client(await signer.signer.sign({ scope: "image:write" }, 600_000, { subject: "alice" }));
    await uploadBlob(alice, { digest: layer.digest, size: layer.size, source: bufferSource(layer.data) });
    await alice.putManifest({ digest: manifest.digest, manifestJson: manifest.json });
    token = await signer.signer.sign({ scope: "image:read", digest: manifest.digest, holder: "alice" }, 600_000, { subject: "alice" });
  });

  afterAll(async () => {
    await origin.stop();
    await removeDir(dir);
  });

  it("gets the image through a cache that was down, once it is back", async () => {
    const dead = `http://127.0.0.1:${await freePort()}`;
    const port = await freePort();
    const cacheDir = join(dir, "cache-1");
    const config = { mode: "cache", port, upstreamUrls: [origin.url, dead] } as const;
    // The cache holds the image (fetched for alice earlier), then goes down.
    const before = await startStore(signer, { dir: cacheDir, config });
    await collect(before.cacheClient(token).fetch({ manifestDigest: manifest.digest, locations: [origin.url] }));
    await before.stop();
    let cache: RunningStore | undefined;
    const notices: string[] = [];
    try {
      const provisioned = await provisioner(60_000).provision(source({ cacheUrl: `http://127.0.0.1:${port}`, locationUrls: [dead] }), {
        signal: new AbortController().signal,
        token: () => token,
        onNotice: (text) => {
          notices.push(text);
          // The cache comes back while the supervisor waits to retry.
          if (text.includes("retrying") && !cache) void startStore(signer, { dir: cacheDir, config }).then((c) => (cache = c));
        },
      });
      expect(provisioned.image.layers.map((l) => l.digest)).toEqual([layer.digest]);
      await provisioned.release();
      expect(notices[0]).toMatch(/^image cache http:\/\/127\.0\.0\.1:\d+ failed \(unavailable: .*ECONNREFUSED.*\); trying image store/);
      expect(notices.some((n) => /unreachable or failing, retrying in 50 ms \(attempt 2\)/.test(n))).toBe(true);
    } finally {
      await cache?.stop();
    }
  });

  it("falls back from a cache that is down to the stores", async () => {
    const notices: string[] = [];
    const provisioned = await provisioner(60_000).provision(
      source({ cacheUrl: `http://127.0.0.1:${await freePort()}`, locationUrls: [origin.url] }),
      { signal: new AbortController().signal, token: () => token, onNotice: (t) => notices.push(t) },
    );
    expect(provisioned.image.layers[0].digest).toBe(layer.digest);
    await provisioned.release();
    expect(notices).toHaveLength(1);
    expect(notices[0]).toContain(`trying image store ${origin.url}`);
  });

  it("ends with an image error when every place says the image is missing", async () => {
    const missing = manifestFor([randomBlob(10)]).digest;
    const missingToken = await signer.signer.sign({ scope: "image:read", digest: missing, holder: "alice" }, 600_000, { subject: "alice" });
    const err = await provisioner(60_000)
      .provision(source({ manifestDigest: missing, locationUrls: [origin.url] }), {
        signal: new AbortController().signal,
        token: () => missingToken,
      })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ImageError);
    expect((err as Error).message).toContain("not_found");
  });

  it("ends with an infrastructure failure when its sources stay unreachable beyond the budget", async () => {
    const notices: string[] = [];
    const started = Date.now();
    const err = await provisioner(400)
      .provision(source({ cacheUrl: `http://127.0.0.1:${await freePort()}`, locationUrls: [`http://127.0.0.1:${await freePort()}`] }), {
        signal: new AbortController().signal,
        token: () => token,
        onNotice: (t) => notices.push(t),
      })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ImageUnavailableError);
    expect((err as Error).message).toMatch(/within the fetch budget of 0 s \(\d+ attempts\)/);
    expect(Date.now() - started).toBeGreaterThanOrEqual(350);
    expect(notices.filter((n) => n.includes("retrying")).length).toBeGreaterThanOrEqual(2);
  });

  it("ends the attempt HOST_START_FAILURE (restartable) when the image cannot be had in time, IMAGE_ERROR when no place serves it to the job", async () => {
    const driver = createBoardDriver(
      { name: "unused", serial: { device: "/dev/null", baud: 115200 }, commands: { powerOn: "true", powerOff: "true", flash: "true" }, bootTimeoutMs: 1000 },
      silentLogger(),
    );
    const logs = createLogServer({
      config: { ...loadLogServerConfig({ env: {}, argv: [] }), port: 0, dataDir: join(dir, "logs"), signingKeysFile: signer.jwksFile, logLevel: "silent" },
      logger: silentLogger(),
    });
    await logs.start();
    const jobLogs = new JobLogs({ spillDir: join(dir, "spill"), capBytes: 1 << 30, logger: silentLogger(), send: () => undefined, changed: () => undefined });
    const limits = { maxCases: 1000, maxBytes: 1 << 20, collectMs: 1000 };
    const results = new JobResults({ logger: silentLogger(), send: () => undefined, changed: () => undefined, limits });
    const run = async (jobId: string, image: ImageSource) => {
      const reports: RunnerReport[] = [];
      const logToken = await signer.signer.sign({ scope: "log:write", job: jobId }, 600_000, { subject: "h1" });
      const runner = new JobRunner(
        create(StartJobSchema, {
          jobId,
          attempt: 1,
          spec: {},
          image: { manifestDigest: image.manifestDigest, cacheUrl: image.cacheUrl, locationUrls: image.locationUrls, readToken: { token } },
          logs: { serverUrls: [logs.address().url], writeToken: { token: logToken } },
        }),
        { driver, images: provisioner(200), logger: silentLogger(), logs: jobLogs, results, report: (r) => reports.push(r), hostId: () => "h1" },
      );
      await runner.done;
      return reports.find((r) => r.termination)!.termination!;
    };
    try {
      const down = await run("job-down", source({ locationUrls: [`http://127.0.0.1:${await freePort()}`] }));
      expect(down.reason).toBe(FinalizeReason.HOST_START_FAILURE);
      expect(down.message).toContain("fetch budget");
      const missing = await run("job-missing", source({ manifestDigest: manifestFor([randomBlob(10)]).digest, locationUrls: [origin.url] }));
      expect(missing.reason).toBe(FinalizeReason.IMAGE_ERROR);
    } finally {
      await logs.stop();
    }
  });
});
