import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createHash } from "node:crypto";
import { chmod, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { connect, createServer, type AddressInfo } from "node:net";
import { join } from "node:path";
import { ExitStatus, FinalizeReason, JobStage, JobState, SnapshotState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { dialTunnel } from "../../lib/tunnel/client.js";
import { QCOW2_MEDIA_TYPE } from "../../lib/image/media-types.js";
import { type JobImage, type JobSpecForDriver } from "../../supervisor/drivers/driver.js";
import { createQemuDriver, type QemuDriver } from "../../supervisor/drivers/qemu-driver.js";
import { LOWER_ANNOTATION } from "../../supervisor/drivers/qemu-image.js";
import { imageOf, layerOf, type TestImage } from "../../testbed/images.js";
import { buildGuest, pushTestImage, type Guest } from "../support/guest.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";
import { capturingLogger, CollectedOutput } from "../supervisor/drivers/helpers.js";

/**
 * The qemu driver with a real guest (test/support/guest.ts: a Debian kernel,
 * a busybox initrd, a two-layer qcow2 disk), under TCG. VMs run one at a
 * time (2 cores); deadlines are generous, boots take seconds.
 */
const BOOT_MS = 120000;

const sha256 = async (path: string) => `sha256:${createHash("sha256").update(await readFile(path)).digest("hex")}`;

let guest: Guest;
beforeAll(async () => {
  guest = await buildGuest();
}, 300000);

describe("qemu driver with a real guest", () => {
  let dir: string;
  let driver: QemuDriver;
  let seq = 0;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "treadmill-qemu-"));
    await chmod(dir, 0o755);
    driver = await createQemuDriver({
      workDir: join(dir, "work"),
      accel: "tcg", // FACTS.md: /dev/kvm exists here but cannot boot a guest
      memoryMb: 256,
      readyPattern: "treadmill-guest: booted",
      sshPort: 0,
      graceMs: 2000,
      logger: capturingLogger().logger,
    });
  });
  afterAll(async () => {
    await driver?.close();
    await rm(dir, { recursive: true, force: true });
  });

  const spec = (image: JobImage, script: string): JobSpecForDriver => ({
    jobId: `vm-${++seq}`,
    attempt: 1,
    parameters: [{ name: "script", value: script, secret: false }],
    image,
  });

  /** Runs one job to its end; returns its exit and output. */
  const run = async (image: JobImage, script: string) => {
    const output = new CollectedOutput();
    const prepared = await driver.prepare(spec(image, script));
    try {
      const job = await driver.start(prepared, output);
      return { exit: await job.exited, output };
    } finally {
      await driver.cleanup(prepared);
    }
  };

  it("boots the two-layer image, runs the workload from the disk and reports its exit code from the console", async () => {
    const { exit, output } = await run(guest.image, "echo hello from the vm; exit 3");
    expect(output.text("console")).toContain("guest layer: upper");
    expect(output.text("console")).toContain("hello from the vm");
    expect(exit).toMatchObject({ exitCode: 3, status: "failure", stopped: false });
  }, BOOT_MS);

  it("takes the exit code from isa-debug-exit when the guest sets it", async () => {
    const { exit } = await run(guest.image, "printf '\\005' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null; sleep 60");
    expect(exit).toMatchObject({ exitCode: 5, status: "failure" });
    expect(exit.message).toMatch(/qemu exit code 11/);
  }, BOOT_MS);

  it("gives every job a fresh overlay: a second job does not see the first one's writes, and the blobs stay byte-identical", async () => {
    const before = await Promise.all(guest.image.layers.map((l) => sha256(l.path)));
    const first = await run(guest.image, "echo secret-of-job-1 > /mnt/data/note; sync; cat /mnt/data/note");
    expect(first.output.text("console")).toContain("secret-of-job-1");
    expect(first.exit.exitCode).toBe(0);
    const second = await run(guest.image, "cat /mnt/data/note 2>&1 || echo no-note-here");
    expect(second.output.text("console")).toContain("no-note-here");
    expect(second.output.text("console")).not.toContain("secret-of-job-1");
    expect(await Promise.all(guest.image.layers.map((l) => sha256(l.path)))).toEqual(before);
    // Nothing of either job is left in the work directory.
    expect(await readdir(join(dir, "work", "jobs"))).toEqual([]);
  }, 2 * BOOT_MS);

  it("snapshots a running vm as a qcow2 layer named after its lower layer, and a vm booted from it sees the change", async () => {
    const output = new CollectedOutput();
    const prepared = await driver.prepare(spec(guest.image, "echo kept-by-snapshot > /mnt/data/kept; sync; echo snapshot-me; sleep 600"));
    const job = await driver.start(prepared, output);
    await output.waitFor("console", /snapshot-me/, BOOT_MS);
    const outFile = join(dir, "snapshot.qcow2");
    const layer = await driver.snapshot(job, { outFile });
    const upper = guest.image.layers[guest.image.layers.length - 1]!;
    expect(layer).toMatchObject({ mediaType: QCOW2_MEDIA_TYPE, path: outFile, annotations: { [LOWER_ANNOTATION]: upper.digest } });
    expect(layer.digest).toBe(await sha256(outFile));
    // The VM runs on after the snapshot.
    expect(job.status()).toBe("running");
    await driver.stop(job, { graceMs: 0 });
    expect((await job.exited).stopped).toBe(true);
    await driver.cleanup(job);

    const snapshotImage = imageOf([...guest.image.layers, await layerOf(outFile, QCOW2_MEDIA_TYPE, layer.annotations)], guest.image.annotations);
    const next = await run(snapshotImage, "cat /mnt/data/kept");
    expect(next.output.text("console")).toContain("kept-by-snapshot");
    expect(next.exit.exitCode).toBe(0);
  }, 3 * BOOT_MS);

  it("resets the vm through QMP, powers it off and on: the console shows the guest booting again and the job goes on", async () => {
    const output = new CollectedOutput();
    const prepared = await driver.prepare(spec(guest.image, "echo vm-up; sleep 600"));
    const job = await driver.start(prepared, output);
    const boots = (n: number) => new RegExp(`(vm-up[\\s\\S]*){${n}}`);
    await output.waitFor("console", boots(1), BOOT_MS);
    expect(await driver.control(job, "reset")).toBe("vm reset");
    await output.waitFor("console", boots(2), BOOT_MS);
    expect(await driver.control(job, "power-off")).toBe("vm powered off");
    expect(job.status()).toBe("running");
    expect(await driver.control(job, "power-on")).toBe("vm powered on");
    await output.waitFor("console", boots(3), BOOT_MS);
    expect(job.status()).toBe("running");
    await driver.stop(job, { graceMs: 0 });
    expect((await job.exited).stopped).toBe(true);
    await expect(driver.control(job, "reset")).rejects.toMatchObject({ name: "ControlRefused", why: "not-running" });
    await driver.cleanup(job);
  }, 4 * BOOT_MS);

  it("stops a vm that is still booting and leaves nothing behind", async () => {
    const output = new CollectedOutput();
    const abort = new AbortController();
    const prepared = await driver.prepare(spec(guest.image, "sleep 600"));
    const starting = driver.start(prepared, output, { signal: abort.signal });
    await output.waitFor("supervisor", /vm started/, BOOT_MS);
    abort.abort();
    await expect(starting).rejects.toThrow(/aborted/);
    await driver.cleanup(prepared);
    expect(await readdir(join(dir, "work", "jobs"))).toEqual([]);
  }, BOOT_MS);

  it("keeps the guest from its host: 10.0.2.2 reaches no host port, and the vm's forwards listen on no port of the host", async () => {
    const hostService = createServer((socket) => socket.end("host-service\n"));
    await new Promise<void>((resolve) => hostService.listen(0, "127.0.0.1", resolve));
    const hostPort = (hostService.address() as AddressInfo).port;
    try {
      const output = new CollectedOutput();
      const script =
        `if echo | nc -w 3 10.0.2.2 ${hostPort} | grep -q host-service; then echo reached-the-host; else echo host-out-of-reach; fi; ` +
        "nc -ll -p 7777 -e /bin/cat & while ! netstat -ltn | grep -q :7777; do sleep 0.1; done; echo listening; sleep 600";
      const prepared = await driver.prepare({ ...spec(guest.image, script), exposedPorts: [{ name: "echo", port: 7777 }] });
      const job = await driver.start(prepared, output);
      await output.waitFor("console", /listening/, BOOT_MS);
      expect(output.text("console")).toContain("host-out-of-reach");
      // The forward is reached through the supervisor's own unix socket, not a port of the host.
      const echo = job.exposures().find((e) => e.name === "echo")!;
      expect(echo).toHaveProperty("path");
      const uid = (prepared as unknown as { uid: number }).uid;
      const hostListenersOfVm = (await readFile("/proc/net/tcp", "utf8"))
        .split("\n")
        .slice(1)
        .map((line) => line.trim().split(/\s+/))
        .filter((f) => f[3] === "0A" && Number(f[7]) === uid);
      expect(hostListenersOfVm).toEqual([]);
      await echo.check?.();
      const socket = connect({ path: (echo as { path: string }).path });
      const answer = await new Promise<string>((resolve, reject) => {
        let got = "";
        socket.on("data", (bytes: Buffer) => {
          got += bytes.toString();
          if (got.includes("ping-the-guest")) resolve(got);
        });
        socket.on("error", reject);
        socket.write("ping-the-guest\n");
      });
      socket.destroy();
      expect(answer).toContain("ping-the-guest");
      await driver.stop(job, { graceMs: 0 });
      await driver.cleanup(job);
    } finally {
      hostService.close();
    }
  }, BOOT_MS);

  it("refuses an image whose upper layer names a lower layer that is not in it, or whose disk is not qcow2", async () => {
    const [kernel, initrd, , upper] = guest.image.layers;
    const missing = imageOf([kernel!, initrd!, upper!], guest.image.annotations);
    await expect(driver.prepare(spec(missing, "true"))).rejects.toMatchObject({ reason: "image", message: expect.stringMatching(/not in the image/) });
    const junk = join(dir, "junk.qcow2");
    await writeFile(junk, Buffer.alloc(65536, 7));
    const corrupt = imageOf([kernel!, initrd!, await layerOf(junk, QCOW2_MEDIA_TYPE)], guest.image.annotations);
    await expect(driver.prepare(spec(corrupt, "true"))).rejects.toMatchObject({ reason: "image", message: expect.stringMatching(/not a qcow2 image/) });
  });
});

describe("vm jobs on the all-in-one testbed", () => {
  let tb: RunningTestbed;
  beforeAll(async () => {
    tb = await startTestbed({
      supervisors: 0,
      config: { vms: 1, boards: 0, vmAccel: "tcg", vmMemoryMb: 256, vmReadyPattern: "treadmill-guest: booted" },
    });
    await push(guest.image, "test/guest:1");
  }, 300000);
  afterAll(async () => {
    await tb?.stop();
  });

  const push = (image: TestImage, ref: string) => pushTestImage(tb.admin, image, ref);

  const submit = async (script: string, extra: { image?: string; ports?: { name: string; port: number }[] } = {}) => {
    const { job } = await tb.client(JobService).submitJob({
      spec: {
        image: extra.image ?? "test/guest:1",
        hosts: { hostCount: 1, tags: { driver: "qemu" } },
        parameters: [{ name: "script", value: script }],
        exposedPorts: extra.ports ?? [],
      },
    });
    return job!.id;
  };

  /** Waits until the job's console log (from the log server) matches. */
  const consoleSays = async (id: string, pattern: RegExp) => {
    const deadline = Date.now() + BOOT_MS;
    for (;;) {
      const log = await tb.readLog(id, "console").catch(() => "");
      if (pattern.test(log)) return log;
      if (Date.now() > deadline) throw new Error(`console of ${id} never matched ${pattern}: ${log}`);
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  };

  it("boots a vm job from the two-layer image through the cache; its console is on the log server, its exit code is the job's", async () => {
    const id = await submit("echo hello from a vm job; exit 7");
    const done = await tb.waitFinalized(id, BOOT_MS);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(done.exitStatus).toBe(ExitStatus.FAILURE);
    expect(done.exitCode).toBe(7);
    const console = await tb.readLog(id, "console");
    expect(console).toContain("guest layer: upper");
    expect(console).toContain("hello from a vm job");
    expect(await tb.readLog(id, "supervisor")).toMatch(/booting the vm/);
    // The blobs in the cache's shared directory are untouched.
    const cached = join(tb.dir, "data", "image-cache", "blobs", "sha256");
    for (const layer of guest.image.layers) {
      expect(await sha256(join(cached, layer.digest.slice(7)))).toBe(layer.digest);
    }
  }, BOOT_MS);

  it("cancels a vm job while it boots", async () => {
    const id = await submit("echo should-not-matter; sleep 600");
    const states: JobState[] = [];
    for await (const change of tb.client(JobService).watchJob({ jobId: id }, { signal: AbortSignal.timeout(BOOT_MS) })) {
      states.push(change.job!.state);
      if (change.job!.stage === JobStage.BOOTING) break;
    }
    await tb.client(JobService).cancelJob({ jobId: id });
    const done = await tb.waitFinalized(id, BOOT_MS);
    expect(done.finalizeReason).toBe(FinalizeReason.CANCELED);
    expect(states).not.toContain(JobState.RUNNING);
  }, BOOT_MS);

  it("reaches a guest port through the proxy", async () => {
    // "listening" only once nc listens: a connection before that would be reset.
    const script = "nc -ll -p 7777 -e /bin/cat & while ! netstat -ltn | grep -q :7777; do sleep 0.1; done; echo listening; wait";
    const id = await submit(script, { ports: [{ name: "echo", port: 7777 }] });
    await tb.waitState(id, JobState.RUNNING, BOOT_MS);
    await consoleSays(id, /listening/);
    const session = await tb.client(JobService).openJobSession({ jobId: id, portName: "echo" });
    const tunnel = await dialTunnel({ proxyUrl: session.grpcUrl, token: session.dialToken!.token, jobId: id, port: "echo", hostId: session.hostId });
    let seen = "";
    await new Promise<void>((resolve, reject) => {
      tunnel.on("data", (chunk: Buffer) => {
        seen += chunk.toString();
        if (seen.includes("ping-through-proxy")) resolve();
      });
      tunnel.on("close", () => reject(new Error(`tunnel closed; got ${JSON.stringify(seen)}`)));
      tunnel.write("ping-through-proxy\n");
    });
    tunnel.destroy();
    await tb.client(JobService).cancelJob({ jobId: id });
    expect((await tb.waitFinalized(id, BOOT_MS)).finalizeReason).toBe(FinalizeReason.CANCELED);
  }, BOOT_MS);

  it("snapshots a running vm job into an image whose jobs see its changes", async () => {
    const id = await submit("echo from-the-snapshot > /mnt/data/kept; sync; echo snapshot-me; sleep 600");
    await tb.waitState(id, JobState.RUNNING, BOOT_MS);
    await consoleSays(id, /snapshot-me/);
    const { snapshot } = await tb.client(JobService).snapshotJob({ jobId: id, name: "test/guest-snap", tag: "1", wait: true }, { timeoutMs: BOOT_MS });
    expect(snapshot?.state).toBe(SnapshotState.SUCCEEDED);
    await tb.client(JobService).cancelJob({ jobId: id });
    await tb.waitFinalized(id, BOOT_MS);
    const next = await submit("cat /mnt/data/kept", { image: "test/guest-snap:1" });
    const done = await tb.waitFinalized(next, BOOT_MS);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
    expect(await tb.readLog(next, "console")).toContain("from-the-snapshot");
  }, 3 * BOOT_MS);

  it("fails a job whose image lacks a backing layer, or has a corrupt one, with IMAGE_ERROR", async () => {
    const [kernel, initrd, , upper] = guest.image.layers;
    await push(imageOf([kernel!, initrd!, upper!], guest.image.annotations), "test/guest-missing:1");
    const junk = join(tb.dir, "junk.qcow2");
    await writeFile(junk, Buffer.alloc(65536, 7));
    await push(imageOf([kernel!, initrd!, await layerOf(junk, QCOW2_MEDIA_TYPE)], guest.image.annotations), "test/guest-corrupt:1");
    for (const image of ["test/guest-missing:1", "test/guest-corrupt:1"]) {
      const done = await tb.waitFinalized(await submit("true", { image }), BOOT_MS);
      expect(done.finalizeReason).toBe(FinalizeReason.IMAGE_ERROR);
    }
  }, BOOT_MS);
});
