import { randomUUID } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code } from "@connectrpc/connect";
import { JobEventKind, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { SigningKeys } from "../../coordinator/signing.js";
import { buildManifest } from "../../lib/image/manifest.js";
import { uploadImage } from "../../lib/image/push.js";
import { silentLogger } from "../../lib/logger.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { makeSigner, makeTempDir, randomBlob, sha256, startStore, type RunningStore } from "../support/image-store.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, attach, finishedJob as ranJob, insertImage } from "../support/jobs.js";
import { waitUntil } from "../support/wait.js";

/**
 * Artifacts on the coordinator (coordinator/jobs/artifacts.ts,
 * artifact-keeper.ts) with scripted supervisors and a real image store
 * that verifies the coordinator's tokens: a host's JobArtifactsReport
 * recorded once per attempt and host, listed, refused when malformed; and
 * retention by age deleting the store manifest of old artifacts only.
 */
describe("job artifacts on the coordinator", () => {
  let c: TestCoordinator;
  let store: RunningStore;
  let keys: SigningKeys;
  let user: { id: string; token: string };
  let image: { ref: string; digest: string };
  const open: ScriptedSupervisor[] = [];
  const HOUR = 3_600_000;

  beforeAll(async () => {
    c = await startTestCoordinator({ config: { ...FAST, artifactSweepIntervalMs: 50, artifactMaxAgeMs: HOUR }, logServer: false });
    const dir = await makeTempDir();
    store = await startStore(await makeSigner(dir), { dir, config: { coordinatorUrl: [c.url], signingKeysFile: "" } });
    keys = await SigningKeys.load(c.sql, { issuer: "treadmill-coordinator", logger: silentLogger() });
    user = await c.createUser();
    image = await insertImage(c.sql);
    await c.sql`insert into services (id, kind, url, site) values (${randomUUID()}, 'log_server', 'http://log-a.invalid', '')`;
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await store?.stop();
    await c?.stop();
  });

  const finishedJob = () => ranJob(c, user.token, image.ref, open);

  /** Uploads one file as the job owner's artifact manifest, as a supervisor does; its report's body. */
  async function upload(jobId: string, name: string, text: string) {
    const data = Buffer.concat([Buffer.from(text), randomBlob(1000).data]);
    const path = join(store.dir, `${randomUUID()}.bin`);
    await writeFile(path, data);
    const digest = sha256(data);
    const { manifestJson, manifestDigest } = buildManifest(
      [{ mediaType: "text/plain", digest, size: data.length, annotations: { "org.opencontainers.image.title": name } }],
      { "treadmill.artifacts.job": jobId },
    );
    const token = await keys.sign({ scope: "image:write" }, HOUR, { subject: user.id, audience: "image" });
    await uploadImage(store.url, token, { manifestDigest, manifestJson, blobs: [{ digest, size: data.length, path }], mediaTypes: [] });
    return { manifestDigest, uploadUrl: store.url, files: [{ name, sizeBytes: BigInt(data.length), digest, mediaType: "text/plain" }] };
  }

  function report(s: ScriptedSupervisor, value: Record<string, unknown> & { jobId: string }) {
    const reportId = randomUUID();
    const ack = s.waitFor((m) => m.payload.case === "ackReport" && m.payload.value.reportId === reportId);
    s.send({ case: "jobArtifactsReport", value: { reportId, attempt: 1, ...value } });
    return ack;
  }

  const jobs = () => c.client(JobService, user.token);

  it("records a host's artifact report once, with a timeline event, and takes none from a host the attempt did not run on", async () => {
    const { host, s, jobId } = await finishedJob();
    const body = await upload(jobId, "out/report.txt", "report");
    const skipped = [{ name: "core", sizeBytes: 5n * 1024n ** 3n, reason: "larger than the per-file cap of 4 GiB" }];
    const ack = await report(s, { jobId, ...body, skipped });
    expect(ack.payload.value).toMatchObject({ jobId, attempt: 1, terminal: false });
    // A repeat (after a reconnect, with a new report id) changes nothing.
    await report(s, { jobId, ...body, files: [...body.files, { ...body.files[0], name: "another.txt" }] });
    const listed = await jobs().listJobArtifacts({ jobId });
    expect(listed.artifacts.map((a) => [a.name, a.digest, a.manifestDigest, a.storeUrl])).toEqual([
      ["out/report.txt", body.files[0].digest, body.manifestDigest, store.url],
    ]);
    const events = (await jobs().getJob({ jobId })).job!.timeline.filter((e) => e.kind === JobEventKind.ARTIFACTS);
    expect(events).toHaveLength(1);
    expect(events[0]).toMatchObject({ attempt: 1, hostId: host.id, state: JobState.FINALIZED });
    // One job.artifacts event on the feed (docs/events.md).
    expect(await feedPayloads(c.sql, jobId, "job.artifacts")).toEqual([
      { schema: "treadmill.event.v1", kind: "job.artifacts", job_id: jobId, attempt: 1, count: 1, bytes: 1006 },
    ]);
    expect(events[0].message).toBe(
      `artifacts: 1 file (1006 bytes) uploaded from host ${host.name}; skipped core (5 GiB): larger than the per-file cap of 4 GiB`,
    );

    const stranger = await attach(c, await c.createHost());
    open.push(stranger);
    const other = await finishedJob();
    await report(stranger, { jobId: other.jobId, ...body });
    expect((await jobs().listJobArtifacts({ jobId: other.jobId })).artifacts).toEqual([]);
    expect(stranger.lastError).toBeUndefined();
  });

  it("ends the stream of a supervisor that reports an artifact named outside its directory", async () => {
    const { s, jobId } = await finishedJob();
    const digest = `sha256:${"a".repeat(64)}`;
    s.send({
      case: "jobArtifactsReport",
      value: { reportId: "r", jobId, attempt: 1, manifestDigest: digest, uploadUrl: store.url, files: [{ name: "../etc/passwd", sizeBytes: 1n, digest }] },
    });
    await s.ended();
    expect(s.lastError?.code).toBe(Code.InvalidArgument);
    expect(s.lastError?.rawMessage).toBe("job_artifacts_report.files[0].name must be a relative path without . or .. parts");
  });

  it("removes artifacts older than the age limit: their manifest leaves the store, younger ones stay", async () => {
    const old = await finishedJob();
    const young = await finishedJob();
    const oldBody = await upload(old.jobId, "old.txt", "old");
    const youngBody = await upload(young.jobId, "young.txt", "young");
    await report(old.s, { jobId: old.jobId, ...oldBody });
    await report(young.s, { jobId: young.jobId, ...youngBody });
    await c.sql`update artifact_sets set created_at = now() - interval '2 hours' where job_id = ${old.jobId}`;

    await waitUntil(async () => (await jobs().listJobArtifacts({ jobId: old.jobId })).artifacts.length === 0, "retention to remove the old artifacts");
    const admin = store.client(await keys.sign({ scope: "image:admin" }, HOUR, { subject: "test", audience: "image" }));
    await expect(admin.getManifest({ digest: oldBody.manifestDigest })).rejects.toMatchObject({ code: Code.NotFound });
    expect((await admin.getManifest({ digest: youngBody.manifestDigest })).manifestJson.length).toBeGreaterThan(0);
    expect((await jobs().listJobArtifacts({ jobId: young.jobId })).artifacts.map((a) => a.name)).toEqual(["young.txt"]);
    const events = (await jobs().getJob({ jobId: old.jobId })).job!.timeline.filter((e) => e.kind === JobEventKind.ARTIFACTS);
    expect(events.at(-1)!.message).toBe("artifacts of attempt 1 (1003 bytes) removed by retention (age or per-user total)");
    const [audit] = await c.sql`select actor from audit_events where kind = 'job.artifacts' and job_id = ${old.jobId} order by id desc limit 1`;
    expect(audit.actor).toBe("system");
  });
});

/** The feed's events of `kind` about a job (numbered or not yet), oldest first: their payloads. */
async function feedPayloads(sql: TestCoordinator["sql"], jobId: string, kind: string): Promise<Record<string, unknown>[]> {
  const rows = await sql<{ payload: Record<string, unknown> }[]>`
    select payload from (select id, payload from feed_pending where job_id = ${jobId} and kind = ${kind}
                         union all select id, payload from feed_events where job_id = ${jobId} and kind = ${kind}) e order by id`;
  return rows.map((r) => r.payload);
}
