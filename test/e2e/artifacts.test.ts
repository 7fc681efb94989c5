import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { ExitStatus, FinalizeReason, JobEventKind, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { ImageStoreService } from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { imageStoreTransport } from "../../lib/image/client.js";
import { buildFirmwareImage } from "../../testbed/images.js";
import { pushTestImage } from "../../testbed/provision.js";
import { tml } from "../cli/harness.js";
import { waitUntil } from "../support/jobs.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";

const codeOf = (p: Promise<unknown>) =>
  p.then(
    () => "ok",
    (err: unknown) => Code[ConnectError.from(err).code],
  );

const KIB = 1024;

/**
 * Artifacts end to end on the all-in-one testbed with real process jobs:
 * uploaded when a job ends (also failed), listed, downloaded with `tml`,
 * used as inputs, private to their owner, capped, and removed by retention.
 */
describe("job artifacts on the all-in-one testbed", () => {
  let tb: RunningTestbed;
  let dir: string;
  const users: Record<string, { transport: Transport; token: string }> = {};

  const login = async (name: string) => {
    const password = `${name}-password-123`;
    await tb.client(UserService).createUser({ name, password });
    const { token } = await createClient(AuthService, coordinatorTransport(tb.coordinatorUrl)).login({ name, password });
    users[name] = { transport: coordinatorTransport(tb.coordinatorUrl, token), token };
  };
  const jobsOf = (name: string) => createClient(JobService, users[name].transport);
  /** `tml` in this process as `name`. */
  const tmlAs = (name: string, args: string[]) =>
    tml(join(dir, "no-config.json"), args, { env: { TML_SERVER: tb.coordinatorUrl, TML_TOKEN: users[name].token } });

  beforeAll(async () => {
    tb = await startTestbed({
      supervisors: 1,
      coordinatorConfig: { artifactMaxFileBytes: 1024 * KIB, artifactMaxUserBytes: 3 * 1024 * KIB, artifactSweepIntervalMs: 100 },
    });
    dir = await mkdtemp(join(tmpdir(), "artifacts-test-"));
    for (const name of ["alice", "bob", "carol"]) await login(name);
    await tb.pushShellImage("alice/sh:1", undefined, users.alice.transport);
    await tb.pushShellImage("carol/sh:1", undefined, users.carol.transport);
    await tb.pushShellImage("bob/sh:1", undefined, users.bob.transport);
  }, 120000);
  afterAll(async () => {
    await tb?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  const submit = async (as: string, script: string, inputs: { name: string; source: string }[] = []) => {
    const { job } = await jobsOf(as).submitJob({
      spec: {
        image: `${as}/sh:1`,
        hosts: { hostCount: 1, tags: { driver: "process" } },
        parameters: [{ name: "script", value: script }],
        inputs,
      },
    });
    return job!.id;
  };

  let failedJob = "";

  it("uploads the artifacts of a failed job, lists them, downloads them byte-identical, and feeds one to the next job", async () => {
    failedJob = await submit(
      "alice",
      [
        "cd $TREADMILL_ARTIFACTS_DIR",
        "echo hello-artifacts > report.txt",
        "mkdir -p sub",
        "dd if=/dev/urandom of=sub/data.bin bs=1024 count=300 2>/dev/null",
        "sha256sum sub/data.bin",
        // Over the per-file cap (1 MiB here): skipped, on the timeline.
        "dd if=/dev/zero of=big.bin bs=1024 count=1536 2>/dev/null",
        // Never followed: a job cannot upload the host's files.
        "ln -s /etc/passwd passwd-link",
        "exit 3",
      ].join("; "),
    );
    const done = await tb.waitFinalized(failedJob);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(done.exitStatus).toBe(ExitStatus.FAILURE);
    expect(done.exitCode).toBe(3);

    const listed = await jobsOf("alice").listJobArtifacts({ jobId: failedJob });
    expect(listed.attempt).toBe(1);
    expect(listed.artifacts.map((a) => [a.name, Number(a.sizeBytes), a.mediaType])).toEqual([
      ["report.txt", 16, "text/plain"],
      ["sub/data.bin", 300 * KIB, "application/octet-stream"],
    ]);
    expect(listed.totalBytes).toBe(BigInt(16 + 300 * KIB));

    // The oversized file and the link: a clear timeline event; the job still finalized.
    const events = (await jobsOf("alice").getJob({ jobId: failedJob })).job!.timeline.filter((e) => e.kind === JobEventKind.ARTIFACTS);
    expect(events).toHaveLength(1);
    expect(events[0].message).toMatch(/^artifacts: 2 files \(.*\) uploaded from host /);
    expect(events[0].message).toMatch(/skipped big\.bin \(1\.5 MiB\): larger than the per-file cap of 1 MiB/);
    expect(events[0].message).toMatch(/skipped passwd-link .*a symbolic link \(not followed\)/);

    // tml lists and downloads them, verified; the bytes are the job's.
    const list = await tmlAs("alice", ["job", "artifacts", failedJob]);
    expect(list.code).toBe(0);
    expect(list.stdout).toMatch(/report\.txt\s+16 B\s+sha256:[0-9a-f]{64}/);
    expect(list.stdout).toContain("sub/data.bin");
    const out = join(dir, "all");
    const all = await tmlAs("alice", ["job", "artifacts", failedJob, "--all", "--dir", out]);
    expect(all.stderr).toBe("");
    expect(all.code).toBe(0);
    expect(await readFile(join(out, "report.txt"), "utf8")).toBe("hello-artifacts\n");
    const data = await readFile(join(out, "sub", "data.bin"));
    const hex = createHash("sha256").update(data).digest("hex");
    expect(await tb.readLog(failedJob, "console")).toContain(`${hex}  sub/data.bin`);
    const one = await tmlAs("alice", ["job", "artifacts", failedJob, "--get", "sub/data.bin", "--dir", join(dir, "one")]);
    expect(one.code).toBe(0);
    expect(await readFile(join(dir, "one", "data.bin"))).toEqual(data);
    const missing = await tmlAs("alice", ["job", "artifacts", failedJob, "--get", "nope.txt"]);
    expect(missing.stderr).toBe(`Error: Job ${failedJob} attempt 1 has no artifact named nope.txt.\n`);
    expect(missing.code).toBe(5);

    // An artifact as the input of the next job: the same bytes in $TREADMILL_INPUTS_DIR.
    const next = await submit("alice", "sha256sum $TREADMILL_INPUTS_DIR/data.bin", [{ name: "data.bin", source: `artifact:${failedJob}/sub/data.bin` }]);
    const nextDone = await tb.waitFinalized(next);
    expect(nextDone.exitStatus).toBe(ExitStatus.SUCCESS);
    expect(await tb.readLog(next, "console")).toContain(`${hex}  /run/treadmill/inputs/data.bin`);
    const spec = (await jobsOf("alice").getJob({ jobId: next })).job!.spec!;
    expect(spec.inputs[0]).toMatchObject({ name: "data.bin", digest: `sha256:${hex}`, sizeBytes: BigInt(300 * KIB), sourceAttempt: 1 });
  }, 240000);

  it("keeps a private job's artifacts from another user: no listing, no download token, no input", async () => {
    expect(failedJob).not.toBe("");
    const bob = jobsOf("bob");
    expect(await codeOf(bob.listJobArtifacts({ jobId: failedJob }))).toBe("PermissionDenied");
    expect(await codeOf(bob.getJobArtifactAccess({ jobId: failedJob }))).toBe("PermissionDenied");
    expect(await codeOf(submit("bob", "true", [{ name: "x", source: `artifact:${failedJob}/report.txt` }]))).toBe("PermissionDenied");
    const asBob = await tmlAs("bob", ["job", "artifacts", failedJob]);
    expect(asBob.stderr).toContain("belongs to another user");

    // Bad references are refused with the right codes.
    const alice = (inputs: { name: string; source: string }[]) => codeOf(submit("alice", "true", inputs));
    expect(await alice([{ name: "x", source: `artifact:${failedJob}/nope.txt` }])).toBe("NotFound");
    expect(await alice([{ name: "x", source: "artifact:0190a5a0-0000-7000-8000-000000000000/a" }])).toBe("NotFound");
    expect(await alice([{ name: "x", source: `job:${failedJob}/report.txt` }])).toBe("InvalidArgument");
    expect(await alice([{ name: "../x", source: `artifact:${failedJob}/report.txt` }])).toBe("InvalidArgument");
    expect(await alice([{ name: "x", source: `artifact:${failedJob}/../report.txt` }])).toBe("InvalidArgument");
    expect(await codeOf(jobsOf("alice").listJobArtifacts({ jobId: failedJob, attempt: 7 }))).toBe("NotFound");

    // Alice's read token reads her artifacts' blobs and nothing else at the store.
    const { access } = await jobsOf("alice").getJobArtifactAccess({ jobId: failedJob });
    expect(access).toHaveLength(1);
    const store = createClient(ImageStoreService, imageStoreTransport(access[0].storeUrl, { token: access[0].readToken!.token }));
    const other = `sha256:${"0".repeat(64)}`;
    expect(await codeOf(store.statBlob({ digest: other }))).toBe("PermissionDenied");
  }, 120000);

  it("removes a user's oldest artifacts past the per-user cap, and their blobs become collectable", async () => {
    // Three files of 700 KiB per job: the second job takes carol past 3 MiB.
    const script = (seed: string) =>
      `cd $TREADMILL_ARTIFACTS_DIR; for i in 1 2 3; do (echo ${seed}-$i; dd if=/dev/urandom bs=1024 count=700 2>/dev/null) > part-$i.bin; done`;
    const first = await submit("carol", script("first"));
    await tb.waitFinalized(first);
    const firstListed = await jobsOf("carol").listJobArtifacts({ jobId: first });
    expect(firstListed.artifacts).toHaveLength(3);
    const [{ manifestDigest, storeUrl }] = firstListed.artifacts;
    const second = await submit("carol", script("second"));
    await tb.waitFinalized(second);

    await waitUntil(async () => (await jobsOf("carol").listJobArtifacts({ jobId: first, attempt: 1 })).artifacts.length === 0, "retention to remove the first job's artifacts", 30000);
    const timeline = (await jobsOf("carol").getJob({ jobId: first })).job!.timeline.filter((e) => e.kind === JobEventKind.ARTIFACTS);
    expect(timeline.at(-1)!.message).toMatch(/^artifacts of attempt 1 \(2\.1 MiB\) removed by retention/);
    expect((await jobsOf("carol").listJobArtifacts({ jobId: second })).artifacts).toHaveLength(3);
    expect(await codeOf(jobsOf("carol").getJobArtifactAccess({ jobId: first, attempt: 1 }))).toBe("FailedPrecondition");
    // Alice's, well under the cap, stay.
    expect((await jobsOf("alice").listJobArtifacts({ jobId: failedJob })).artifacts).toHaveLength(2);

    // The manifest is gone from the store: its blobs are what garbage collection takes.
    const cap = await createClient(AuthService, tb.admin).createAdminCapability({ scope: CapabilityScope.IMAGE_ADMIN });
    const admin = createClient(ImageStoreService, imageStoreTransport(storeUrl, { token: cap.token!.token }));
    expect(await codeOf(admin.getManifest({ digest: manifestDigest }))).toBe("NotFound");
    const gc = await admin.collectGarbage({ gracePeriod: {}, dryRun: true });
    for (const a of firstListed.artifacts) expect(gc.deletedDigests).toContain(a.digest);
    for (const a of (await jobsOf("carol").listJobArtifacts({ jobId: second })).artifacts) expect(gc.deletedDigests).not.toContain(a.digest);
  }, 240000);

  it("uploads what a canceled job wrote before it was stopped", async () => {
    const id = await submit("alice", "echo partial-results > $TREADMILL_ARTIFACTS_DIR/partial.txt; echo ready; sleep 600");
    await tb.waitState(id, JobState.RUNNING);
    await waitUntil(() => tb.readLog(id, "console").then((log) => log.includes("ready"), () => false), "the job to say ready", 60000);
    await jobsOf("alice").cancelJob({ jobId: id });
    expect((await tb.waitFinalized(id)).finalizeReason).toBe(FinalizeReason.CANCELED);
    const listed = await jobsOf("alice").listJobArtifacts({ jobId: id });
    expect(listed.artifacts.map((a) => a.name)).toEqual(["partial.txt"]);
  }, 120000);

  it("takes a board's artifacts from lines on its serial console, verified, skipping a garbled one", async () => {
    // The firmware runs on the simulated board as a shell script: it prints its file as the protocol says.
    const script = [
      "f=$(mktemp)",
      "echo board-says-hi > $f; seq 1 2000 >> $f",
      'base64 $f | while read l; do echo "TREADMILL_ARTIFACT logs/board.txt $l"; done',
      'echo "TREADMILL_ARTIFACT_END logs/board.txt $(sha256sum $f | cut -d" " -f1)"',
      'echo "TREADMILL_ARTIFACT garbled.bin aGVsbG8="',
      `echo "TREADMILL_ARTIFACT_END garbled.bin ${"0".repeat(64)}"`,
      "sha256sum $f; rm -f $f",
      "echo TREADMILL_EXIT=0",
      "",
    ].join("\n");
    await pushTestImage(users.alice.transport, await buildFirmwareImage({ dir: join(tb.dir, "images"), script }), "alice/board-artifacts:1");
    const { job } = await jobsOf("alice").submitJob({ spec: { image: "alice/board-artifacts:1", hosts: { hostCount: 1, tags: { board: "sim" } } } });
    const done = await tb.waitFinalized(job!.id, 120000);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
    const listed = await jobsOf("alice").listJobArtifacts({ jobId: job!.id });
    expect(listed.artifacts.map((a) => a.name)).toEqual(["logs/board.txt"]);
    const hex = listed.artifacts[0].digest.slice("sha256:".length);
    expect(await tb.readLog(job!.id, "console")).toContain(hex);
    const event = done.timeline.find((e) => e.kind === JobEventKind.ARTIFACTS);
    expect(event?.message).toMatch(/skipped garbled\.bin \(5 bytes\): garbled on the console/);
    const got = await tmlAs("alice", ["job", "artifacts", job!.id, "--get", "logs/board.txt", "--dir", join(dir, "board")]);
    expect(got.code).toBe(0);
    const text = await readFile(join(dir, "board", "board.txt"), "utf8");
    expect(text.startsWith("board-says-hi\n1\n2\n")).toBe(true);
    expect(text.endsWith("2000\n")).toBe(true);
  }, 180000);
});
