/**
 * JobService.SnapshotJob on the coordinator, with scripted supervisors over
 * real Attach streams: validation, the TakeSnapshot command (target, token),
 * SnapshotResult handling, the wait deadline and re-delivery on re-attach.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { JobEventKind, JobState, SnapshotState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import type { AttachResponse, TakeSnapshot } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, QCOW2, ROOTFS, attach, codeOf, insertImage, jobInState, uniqueTag, waitUntil } from "../support/jobs.js";

const isSnapshot = (jobId: string) => (m: AttachResponse) => m.payload.case === "takeSnapshot" && m.payload.value.jobId === jobId;

describe("SnapshotJob on the coordinator", () => {
  let c: TestCoordinator;
  let user: { id: string; token: string };
  let image: { ref: string; digest: string };
  const open: ScriptedSupervisor[] = [];
  const cacheId = randomUUID();

  beforeAll(async () => {
    c = await startTestCoordinator({ config: { ...FAST, supervisorGraceMs: 600_000 } });
    user = await c.createUser();
    image = await insertImage(c.sql, { visibility: "public", mediaTypes: [ROOTFS] });
    await c.sql`
      insert into services (id, kind, url, site, heartbeat_interval_ms)
      values (${cacheId}, 'image_cache', 'http://cache.lab-a.invalid:7702', 'lab-a', 600000)`;
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  /** A running job on a fresh host of `site` and `driver`, held by a manual scripted supervisor. */
  async function runningJob(options: { site?: string; driver?: "process" | "board" } = {}) {
    const tags = uniqueTag();
    const board = options.driver === "board";
    const host = await c.createHost({ tags, site: options.site ?? "", driverKind: options.driver ?? "process", mediaTypes: [ROOTFS] });
    const s = await attach(c, host, { driverKind: board ? DriverKind.BOARD : DriverKind.PROCESS, reconnect: true });
    open.push(s);
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image: image.ref, hosts: { tags } } });
    const jobId = job!.id;
    await s.startJob(jobId);
    await s.report(jobId, 1, JobState.RUNNING);
    await jobInState(c.sql, jobId, "running");
    return { jobId, s, host };
  }

  it("sends TakeSnapshot for the site's cache with an image:write token and fails the operation on a failed result", async () => {
    const jobs = c.client(JobService, user.token);
    const { jobId, s } = await runningJob({ site: "lab-a" });
    const command = s.waitFor(isSnapshot(jobId));
    const { snapshot } = await jobs.snapshotJob({ jobId, name: "snaps/one", tag: "v1" });
    expect(snapshot?.state).toBe(SnapshotState.PENDING);
    const take = (await command).payload.value as TakeSnapshot;
    expect(take.snapshotId).toBe(snapshot?.id);
    expect(take.attempt).toBe(1);
    expect(take.uploadUrl).toBe("http://cache.lab-a.invalid:7702");
    expect(take.writeToken?.token).toMatch(/^ey/);
    expect(take.annotations["org.opencontainers.image.title"]).toBe("snaps/one:v1");

    // While it is pending, its name is taken.
    expect(await codeOf(jobs.snapshotJob({ jobId, name: "snaps/one", tag: "v1", requestId: "another" }))).toBe("AlreadyExists");
    s.send({
      case: "snapshotResult",
      value: { requestId: take.requestId, snapshotId: take.snapshotId, jobId, attempt: 1, ok: false, errorCode: 9, errorMessage: "the driver cannot snapshot this job" },
    });
    const failed = await waitUntil(async () => {
      const [row] = await c.sql<{ state: string; message: string }[]>`select state, message from snapshots where id = ${take.snapshotId}`;
      return row.state !== "pending" ? row : undefined;
    }, "the snapshot to end");
    expect(failed.state).toBe("failed");
    expect(failed.message).toContain("the driver cannot snapshot this job");
    const timeline = (await jobs.getJob({ jobId })).job!.timeline;
    expect(timeline.find((e) => e.kind === JobEventKind.SNAPSHOT_FAILED)?.message).toContain("cannot snapshot");
    expect((await c.sql`select 1 from images where name = 'snaps/one'`).length).toBe(0);
  });

  it("ends a wait at the call's deadline, re-sends to a re-attached supervisor, and registers the image on success", async () => {
    const jobs = c.client(JobService, user.token);
    const { jobId, s } = await runningJob();
    const first = s.waitFor(isSnapshot(jobId));
    expect(await codeOf(jobs.snapshotJob({ jobId, name: "snaps/two", tag: "v1", wait: true, requestId: "r2" }, { timeoutMs: 1500 }))).toBe(
      "DeadlineExceeded",
    );
    const take = (await first).payload.value as TakeSnapshot;
    // No host cache: the first store of the job's image.
    expect(take.uploadUrl).toBe("http://store.invalid:1");

    // The stream breaks; the supervisor attaches again and gets the command again.
    const again = s.waitFor((m) => isSnapshot(jobId)(m) && (m.payload.value as TakeSnapshot).requestId !== take.requestId, { timeoutMs: 30000 });
    await s.drop();
    const resent = (await again).payload.value as TakeSnapshot;
    expect(resent.snapshotId).toBe(take.snapshotId);

    const digest = `sha256:${"ab".repeat(32)}`;
    s.send({
      case: "snapshotResult",
      value: { requestId: resent.requestId, snapshotId: resent.snapshotId, jobId, attempt: 1, ok: true, manifestDigest: digest, sizeBytes: 1234n, mediaTypes: [QCOW2] },
    });
    const done = (await jobs.snapshotJob({ jobId, name: "snaps/two", tag: "v1", wait: true, requestId: "r2" }, { timeoutMs: 30000 })).snapshot!;
    expect(done.id).toBe(take.snapshotId);
    expect(done.state).toBe(SnapshotState.SUCCEEDED);
    expect(done.manifestDigest).toBe(digest);
    const [row] = await c.sql<{ owner_id: string; visibility: string; media_types: string[]; source_job_id: string; size: string; locations: { url: string }[] }[]>`
      select owner_id, visibility, media_types, source_job_id, size::text, locations from images where name = 'snaps/two' and tag = 'v1'`;
    expect(row).toMatchObject({ owner_id: user.id, visibility: "private", source_job_id: jobId, size: "1234" });
    expect([...row.media_types].sort()).toEqual([QCOW2, ROOTFS].sort());
    expect(row.locations.map((l) => l.url)).toEqual(["http://store.invalid:1"]);
    // The same result again changes nothing.
    s.send({
      case: "snapshotResult",
      value: { requestId: resent.requestId, snapshotId: resent.snapshotId, jobId, attempt: 1, ok: false, errorCode: 13, errorMessage: "late" },
    });
    const timeline = (await jobs.getJob({ jobId })).job!.timeline;
    expect(timeline.filter((e) => e.kind === JobEventKind.SNAPSHOT_SUCCEEDED).length).toBe(1);
  });

  it("refuses a board job, bad input, no token and another user's job with the right codes", async () => {
    const jobs = c.client(JobService, user.token);
    const board = await runningJob({ driver: "board" });
    expect(await codeOf(jobs.snapshotJob({ jobId: board.jobId, name: "snaps/board", tag: "v1" }))).toBe("FailedPrecondition");
    expect(await codeOf(jobs.snapshotJob({ jobId: "not-a-uuid", name: "snaps/x", tag: "v1" }))).toBe("InvalidArgument");
    expect(await codeOf(jobs.snapshotJob({ jobId: board.jobId, name: "", tag: "v1" }))).toBe("InvalidArgument");
    expect(await codeOf(jobs.snapshotJob({ jobId: board.jobId, name: "snaps/x", tag: "" }))).toBe("InvalidArgument");
    expect(await codeOf(jobs.snapshotJob({ jobId: board.jobId, name: "snaps/x", tag: "v1", requestId: "x".repeat(65) }))).toBe("InvalidArgument");
    expect(await codeOf(c.client(JobService).snapshotJob({ jobId: board.jobId, name: "snaps/x", tag: "v1" }))).toBe("Unauthenticated");
    const other = await c.createUser();
    expect(await codeOf(c.client(JobService, other.token).snapshotJob({ jobId: board.jobId, name: "snaps/x", tag: "v1" }))).toBe(
      "PermissionDenied",
    );
    expect((await c.sql`select 1 from snapshots where job_id = ${board.jobId}`).length).toBe(0);
  });
});
