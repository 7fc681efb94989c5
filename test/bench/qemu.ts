// `npm run bench -- qemu`: the qemu driver's job start overhead, from
// StartJob received by the supervisor to the guest's first console line
// (the kernel's first message, about a second after launch under TCG), with a warm cache,
// against launching the same QEMU command directly in the same run; and the
// bytes a job start writes (its job directory at the first console line)
// against the image's size. Uses the test guest (test/support/guest.ts) under
// TCG on npm start's testbed with one qemu supervisor.
//
// Both sides detect the first line the same way: polling the console log file
// QEMU writes (`logfile=`) every 5 ms.
import { execFile, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { qemuArgs } from "../../supervisor/drivers/qemu-args.js";
import { KERNEL_MEDIA_TYPE } from "../../lib/image/media-types.js";
import { CMDLINE_ANNOTATION, planVmImage } from "../../supervisor/drivers/qemu-image.js";
import { imageOf } from "../../testbed/images.js";
import { buildGuest, pushTestImage } from "../support/guest.js";
import { startTestbed } from "../support/testbed.js";
import { percentile, report } from "./report.js";

const exec = promisify(execFile);
const RUNS = Number(process.env.TREADMILL_BENCH_QEMU_RUNS ?? 5);

/** Resolves with the time the file first holds a newline (polled every 5 ms). */
async function firstLine(path: string, deadlineMs = 120000): Promise<number> {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const text = await readFile(path, "latin1").catch(() => "");
    if (text.includes("\n")) return Date.now();
    if (Date.now() > deadline) throw new Error(`no console line in ${path}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** Bytes allocated on disk under `dir` (what a job start wrote). */
async function allocatedBytes(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const st = await stat(join(dir, entry.name));
    total += entry.isDirectory() ? await allocatedBytes(join(dir, entry.name)) : st.blocks * 512;
  }
  return total;
}

export async function run(): Promise<void> {
  const guest = await buildGuest();
  const tb = await startTestbed({
    supervisors: 0,
    config: { vms: 1, boards: 0, vmAccel: "tcg", vmMemoryMb: 256 },
  });
  const scratch = await mkdtemp(join(tmpdir(), "treadmill-bench-qemu-"));
  try {
    // The kernel's first message (earlyprintk, no `quiet`) is the first console line: it comes
    // about a second after launch, before most of the boot's noise.
    const layers = guest.image.layers.map((l) => (l.mediaType === KERNEL_MEDIA_TYPE ? { ...l, annotations: { ...l.annotations, [CMDLINE_ANNOTATION]: "console=ttyS0 earlyprintk=ttyS0 panic=-1" } } : l));
    const image = imageOf(layers, guest.image.annotations);
    await pushTestImage(tb.admin, image, "bench/guest:1");
    const jobs = tb.client(JobService);
    const jobsDir = join(tb.dir, "data", "supervisors", "vm-1", "qemu", "jobs");
    const startedAt = (id: string) => {
      for (const line of tb.logLines) {
        if (!line.includes(id) || !line.includes('"msg":"job started"')) continue;
        return (JSON.parse(line) as { time: number }).time;
      }
      throw new Error(`no job started line for ${id}`);
    };

    /** One job: StartJob -> first console line, and its job directory's bytes then. */
    const viaJob = async () => {
      const { job } = await jobs.submitJob({
        spec: { image: "bench/guest:1", hosts: { hostCount: 1, tags: { driver: "qemu" } }, parameters: [{ name: "script", value: "true" }] },
      });
      const id = job!.id;
      const dir = join(jobsDir, createHash("sha256").update(`${id}.1`).digest("hex").slice(0, 16));
      const seen = await firstLine(join(dir, "console.log"));
      const bytes = await allocatedBytes(dir);
      await jobs.cancelJob({ jobId: id });
      await tb.waitFinalized(id, 120000);
      return { ms: seen - startedAt(id), bytes };
    };

    /** The same QEMU command, launched directly on the same blobs (the cache's files). */
    const cacheBlobs = join(tb.dir, "data", "image-cache", "blobs", "sha256");
    const cachedImage = { ...image, layers: image.layers.map((l) => ({ ...l, path: join(cacheBlobs, l.digest.slice(7)) })) };
    const direct = async (i: number) => {
      const plan = await planVmImage(cachedImage);
      const top = plan.chain[plan.chain.length - 1]!;
      const dir = join(scratch, `direct-${i}`);
      await exec("mkdir", ["-p", dir]);
      const overlay = join(dir, "overlay.qcow2");
      await exec("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-F", top.format, "-b", top.layer.path, overlay, String(top.virtualSize)]);
      const args = qemuArgs({
        binary: "qemu-system-x86_64",
        name: "bench",
        machine: "q35",
        accel: "tcg",
        cpus: 1,
        memoryMb: 256,
        plan,
        overlay,
        consoleSocket: join(dir, "console.sock"),
        consoleLog: join(dir, "console.log"),
        qmpSocket: join(dir, "qmp.sock"),
        forwards: [],
        restrictNetwork: true,
        debugExit: true,
        sandbox: true,
        extraArgs: [],
      });
      const started = Date.now();
      const child = spawn("qemu-system-x86_64", ["-no-reboot", ...args], { cwd: dir, stdio: "ignore" });
      const exited = new Promise((resolve) => child.once("close", resolve));
      const seen = await firstLine(join(dir, "console.log"));
      child.kill("SIGKILL");
      await exited;
      await rm(dir, { recursive: true, force: true });
      return seen - started;
    };

    // Warm up: the first job fills the cache (read in place by the direct launches too) and verifies the blobs once.
    await viaJob();
    const jobMs: number[] = [];
    const directMs: number[] = [];
    const bytes: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      directMs.push(await direct(i));
      const j = await viaJob();
      jobMs.push(j.ms);
      bytes.push(j.bytes);
    }
    const med = (xs: number[]) => percentile(xs, 50);
    process.stdout.write(`qemu driver, ${RUNS} runs each, TCG, warm cache (median; all: job ${jobMs.join(",")} ms, direct ${directMs.join(",")} ms)\n`);
    report("StartJob -> first console line", med(jobMs), "ms", { name: "qemu launched directly", value: med(directMs) });
    report("overhead above the direct launch (median of pairs)", med(jobMs.map((j, i) => j - directMs[i]!)), "ms");
    const imageBytes = image.layers.reduce((sum, l) => sum + l.size, 0);
    report("bytes written per job start (job dir)", med(bytes) / 1024, "KiB", { name: "image size", value: imageBytes / 1024 });
  } finally {
    await rm(scratch, { recursive: true, force: true });
    await tb.stop();
  }
}
