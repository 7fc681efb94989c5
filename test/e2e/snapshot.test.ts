import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { ImageVisibility } from "../../gen/treadmill/coordinator/v1/image_pb.js";
import { ImageService } from "../../gen/treadmill/coordinator/v1/image_service_pb.js";
import { ExitStatus, FinalizeReason, JobEventKind, JobState, SnapshotState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { waitUntil } from "../support/jobs.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";

const codeOf = (p: Promise<unknown>) =>
  p.then(
    () => "ok",
    (err: unknown) => Code[ConnectError.from(err).code],
  );

/** Snapshots end to end: a process job's files become an image that another job runs. */
describe("job snapshots on the all-in-one testbed", () => {
  let tb: RunningTestbed;
  let alice: Transport;
  let bob: Transport;

  const login = async (name: string) => {
    const password = `${name}-password-123`;
    await tb.client(UserService).createUser({ name, password });
    const { token } = await createClient(AuthService, coordinatorTransport(tb.coordinatorUrl)).login({ name, password });
    return coordinatorTransport(tb.coordinatorUrl, token);
  };

  beforeAll(async () => {
    tb = await startTestbed({ supervisors: 1 });
    alice = await login("alice");
    bob = await login("bob");
    await tb.pushShellImage("alice/sh:1", undefined, alice);
  }, 120000);
  afterAll(async () => {
    await tb?.stop();
  });

  const submit = async (as: Transport, image: string, script: string) => {
    const { job } = await createClient(JobService, as).submitJob({
      spec: { image, hosts: { hostCount: 1, tags: { driver: "process" } }, parameters: [{ name: "script", value: script }] },
    });
    return job!.id;
  };

  /** A job that changes its files, says "ready", and runs until canceled. */
  const runningJob = async () => {
    const id = await submit(
      alice,
      "alice/sh:1",
      "echo snapshot-data > /root/data.txt; mkdir -p /opt/app; echo nested > /opt/app/conf; rm /etc/hostname; echo ready; sleep 600",
    );
    await tb.waitState(id, JobState.RUNNING);
    // The console channel exists once the job has written to it.
    const said = () => tb.readLog(id, "console").then((log) => log.includes("ready"), () => false);
    await waitUntil(said, "the job to say ready", 60000);
    return id;
  };

  it("snapshots a running job into a private image another job runs with the files", async () => {
    const jobs = createClient(JobService, alice);
    const id = await runningJob();
    const { snapshot } = await jobs.snapshotJob({ jobId: id, name: "alice/snap", tag: "v1", wait: true }, { timeoutMs: 120000 });
    expect(snapshot?.state).toBe(SnapshotState.SUCCEEDED);
    expect(snapshot?.manifestDigest).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(snapshot?.jobId).toBe(id);

    // The job goes on after the snapshot; finish it.
    await jobs.cancelJob({ jobId: id });
    expect((await tb.waitFinalized(id)).finalizeReason).toBe(FinalizeReason.CANCELED);
    const timeline = (await jobs.getJob({ jobId: id })).job!.timeline.map((e) => e.kind);
    expect(timeline).toContain(JobEventKind.SNAPSHOT_REQUESTED);
    expect(timeline).toContain(JobEventKind.SNAPSHOT_SUCCEEDED);
    expect(await tb.readLog(id, "supervisor")).toMatch(/uploading 100%/);

    const { image } = await createClient(ImageService, alice).getImage({ reference: "alice/snap:v1" });
    expect(image?.manifestDigest).toBe(snapshot?.manifestDigest);
    expect(image?.visibility).toBe(ImageVisibility.PRIVATE);
    expect(image?.sourceJobId).toBe(id);
    expect(image?.mediaTypes).toContain("application/vnd.treadmill.rootfs.tar+gzip");
    expect(image?.locations.length).toBe(1);
    const listed = await createClient(ImageService, alice).listImages({ namePrefix: "alice/snap" });
    expect(listed.images.map((i) => `${i.name}:${i.tag}`)).toEqual(["alice/snap:v1"]);

    const next = await submit(alice, "alice/snap:v1", "cat /root/data.txt /opt/app/conf; [ -e /etc/hostname ] || echo hostname-gone");
    const done = await tb.waitFinalized(next);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
    const out = await tb.readLog(next, "console");
    expect(out).toContain("snapshot-data");
    expect(out).toContain("nested");
    expect(out).toContain("hostname-gone");

    // Private: another user neither sees nor runs it.
    expect(await codeOf(createClient(ImageService, bob).getImage({ reference: "alice/snap:v1" }))).toBe("NotFound");
    expect((await createClient(ImageService, bob).listImages({ namePrefix: "alice/" })).images).toEqual([]);
    expect(await codeOf(submit(bob, "alice/snap:v1", "true"))).toBe("PermissionDenied");
  }, 240000);

  it("refuses what cannot be snapshotted with the right codes, and is idempotent by request_id", async () => {
    const jobs = createClient(JobService, alice);
    const id = await runningJob();
    expect(await codeOf(jobs.snapshotJob({ jobId: id, name: "Bad Name", tag: "v1" }))).toBe("InvalidArgument");
    expect(await codeOf(jobs.snapshotJob({ jobId: id, name: "alice/x", tag: "-bad" }))).toBe("InvalidArgument");
    expect(await codeOf(createClient(JobService, bob).snapshotJob({ jobId: id, name: "bob/x", tag: "v1" }))).toBe("PermissionDenied");
    expect(await codeOf(jobs.snapshotJob({ jobId: id, name: "alice/snap", tag: "v1" }))).toBe("AlreadyExists");

    // The same request_id twice: one operation; the second call polls it.
    const first = (await jobs.snapshotJob({ jobId: id, name: "alice/snap", tag: "v2", requestId: "req-1" })).snapshot!;
    expect([SnapshotState.PENDING, SnapshotState.SUCCEEDED]).toContain(first.state);
    const again = (await jobs.snapshotJob({ jobId: id, name: "alice/snap", tag: "v2", requestId: "req-1", wait: true }, { timeoutMs: 120000 }))
      .snapshot!;
    expect(again.id).toBe(first.id);
    expect(again.state).toBe(SnapshotState.SUCCEEDED);
    expect(await codeOf(jobs.snapshotJob({ jobId: id, name: "alice/snap", tag: "v3", requestId: "req-1" }))).toBe("InvalidArgument");

    await jobs.cancelJob({ jobId: id });
    await tb.waitFinalized(id);
    expect(await codeOf(jobs.snapshotJob({ jobId: id, name: "alice/snap", tag: "v4" }))).toBe("FailedPrecondition");
    // A job that waits in the queue: no host can run an image for hosts tagged so.
    const { job: queued } = await jobs.submitJob({ spec: { image: "alice/sh:1", hosts: { hostCount: 1, tags: { nowhere: "yes" } } } });
    expect(await codeOf(jobs.snapshotJob({ jobId: queued!.id, name: "alice/snap", tag: "v5" }))).toBe("FailedPrecondition");
    await jobs.cancelJob({ jobId: queued!.id });
    expect(await codeOf(jobs.snapshotJob({ jobId: "0190a5a0-0000-7000-8000-000000000000", name: "alice/snap", tag: "v6" }))).toBe(
      "NotFound",
    );
  }, 240000);
});
