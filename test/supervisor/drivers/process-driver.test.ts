import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { execFile, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmod, mkdtemp, readdir, readFile, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { promisify } from "node:util";
import { createServer, connect, type AddressInfo, type Server } from "node:net";
import {
  DriverAbortError,
  DriverError,
  ExposureDenied,
  type Exposure,
  type JobSpecForDriver,
  type RunningJob,
} from "../../../supervisor/drivers/driver.js";
import { createProcessDriver, type ProcessDriver } from "../../../supervisor/drivers/process-driver.js";
import { JOBS_DIR } from "../../../supervisor/drivers/machine.js";
import { processesOfUid, signalAll } from "../../../supervisor/drivers/sandbox.js";
import { buildBusyboxImage, buildRawLayer, imageOf, layerOf, type TestImage } from "../../support/images.js";
import { capturingLogger, CollectedOutput, socketClient } from "./helpers.js";

const execFileAsync = promisify(execFile);

let base: string;
let image: TestImage;
let driver: ProcessDriver;
/** The driver's first slot uid (claimed: `auto` picks a free range). */
let uidBase: number;
const { logger, lines: logLines } = capturingLogger();
let jobCounter = 0;

function spec(script: string, extra: Partial<JobSpecForDriver> = {}): JobSpecForDriver {
  return {
    jobId: `job-${process.pid}-${++jobCounter}`,
    attempt: 1,
    parameters: [],
    entrypoint: ["/bin/sh", "-c", script],
    image,
    ...extra,
  };
}

/** Prepares and starts a job; returns it with its output. */
async function run(s: JobSpecForDriver, d: ProcessDriver = driver): Promise<{ job: RunningJob; out: CollectedOutput }> {
  const out = new CollectedOutput();
  const prepared = await d.prepare(s);
  const job = await d.start(prepared, out);
  return { job, out };
}

/** Pids of processes whose command line starts with `marker` (or contains it, with `anywhere`). */
async function processesMentioning(marker: string, anywhere = false): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const cmdline = (await readFile(`/proc/${entry}/cmdline`, "utf8")).replace(/\0/g, " ");
      if (anywhere ? cmdline.includes(marker) && !cmdline.includes("jest") : cmdline.startsWith(marker)) pids.push(Number(entry));
    } catch {
      // Gone.
    }
  }
  return pids;
}

/** A TCP server on the host's loopback that greets whoever connects with `greeting`. */
async function hostService(greeting: string): Promise<{ server: Server; port: number }> {
  const server = createServer((socket) => socket.end(`${greeting}\n`));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, port: (server.address() as AddressInfo).port };
}

/** Everything a connection to the exposure's address receives until it closes (or 3 s pass). */
async function dialExposure(exposure: Exposure): Promise<string> {
  const socket = "path" in exposure ? connect({ path: exposure.path }) : connect({ host: exposure.host, port: exposure.port });
  return new Promise((resolve) => {
    let got = "";
    const timer = setTimeout(() => socket.destroy(), 3000);
    socket.on("data", (bytes: Buffer) => (got += bytes.toString("utf8")));
    socket.on("error", () => undefined);
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(got);
    });
  });
}

const exposureOf = (job: RunningJob, name: string) => job.exposures().find((e) => e.name === name)!;

/** A script that serves `greeting` on `port`, waits until it listens, then tries each of `probe` on 127.0.0.1 and says what happened. */
const serveAndProbe = (port: number, greeting: string, probe: number[]) =>
  `nc -ll -p ${port} -e /bin/sh -c "echo ${greeting}" & ` +
  `while ! netstat -ltn | grep -q ":${port} "; do sleep 0.05; done; ` +
  `for p in ${probe.join(" ")}; do if echo | nc -w 2 127.0.0.1 $p >/dev/null 2>&1; then echo reached-$p; else echo refused-$p; fi; done; ` +
  "echo probed; exec sleep 100000";

beforeAll(async () => {
  base = await mkdtemp("/tmp/treadmill-process-driver-");
  await chmod(base, 0o711);
  image = await buildBusyboxImage({
    dir: join(base, "images"),
    entrypoint: ["/bin/sh", "-c", "echo hello from the entrypoint; id -u; cat /etc/hostname"],
  });
  driver = await createProcessDriver({ workDir: join(base, "work"), slots: 2, graceMs: 5000, logger });
  uidBase = driver.slotUidBase!;
});

afterAll(async () => {
  await driver?.close();
  await rm(base, { recursive: true, force: true });
});

describe("process driver", () => {
  it("runs the image's entrypoint as the slot's uid in bubblewrap and maps exit code 0 to success", async () => {
    expect(driver.sandbox).toEqual({ mode: "bwrap", switchUid: true, network: "isolated" });
    const s = spec("");
    delete s.entrypoint;
    const { job, out } = await run(s);
    expect(job.status()).toBe("running");
    const exit = await job.exited;
    expect(exit).toMatchObject({ exitCode: 0, status: "success", stopped: false });
    expect(job.status()).toBe("exited");
    expect(out.text("console")).toContain("hello from the entrypoint");
    expect(out.text("console")).toMatch(new RegExp(`\\b${uidBase}\\b`));
    expect(out.text("console")).toContain("treadmill-job");
    const jobDir = (job.prepared as unknown as { jobDir: string }).jobDir;
    await driver.cleanup(job);
    await expect(stat(jobDir)).rejects.toThrow(/ENOENT/);
  });

  it("runs jobs from a work directory under a private (0700) directory, without opening it to others", async () => {
    const privateDir = await mkdtemp("/tmp/treadmill-private-");
    expect((await stat(privateDir)).mode & 0o777).toBe(0o700);
    const own = await createProcessDriver({ workDir: join(privateDir, "work"), slots: 1, graceMs: 1000, logger });
    try {
      const { job, out } = await run(spec("echo from-a-private-work-dir; id -u"), own);
      expect(await job.exited).toMatchObject({ exitCode: 0, status: "success" });
      expect(out.text("console")).toContain("from-a-private-work-dir");
      const jobDir = (job.prepared as unknown as { jobDir: string }).jobDir;
      expect(jobDir.startsWith(`${JOBS_DIR}/process-`)).toBe(true);
      await own.cleanup(job);
      expect((await stat(privateDir)).mode & 0o777).toBe(0o700);
    } finally {
      await own.close();
      await rm(privateDir, { recursive: true, force: true });
    }
    const left = (await readdir(JOBS_DIR).catch(() => [] as string[])).filter((d) => d.startsWith("process-"));
    for (const d of left) expect(await readFile(join(JOBS_DIR, d, "origin"), "utf8")).not.toContain(privateDir);
  });

  it("maps a non-zero exit code to failure and keeps stderr apart from the console", async () => {
    const { job, out } = await run(spec("echo to-console; echo to-stderr >&2; exit 3"));
    expect(await job.exited).toMatchObject({ exitCode: 3, status: "failure", stopped: false });
    expect(out.text("console")).toContain("to-console");
    expect(out.text("stderr")).toContain("to-stderr");
    expect(out.text("console")).not.toContain("to-stderr");
    await driver.cleanup(job);
  });

  it("fails an image without an entrypoint as an image error", async () => {
    const noEntry = imageOf(image.layers, { "treadmill.driver": "process" });
    const s = spec("");
    delete s.entrypoint;
    await expect(driver.prepare({ ...s, image: noEntry })).rejects.toMatchObject({ reason: "image" });
  });

  it("delivers parameters as environment and a secret as a 0600 file, and never logs the secret", async () => {
    const secret = `s3cr3t-${randomBytes(8).toString("hex")}`;
    const { job, out } = await run(
      spec(
        'echo "plain=$TREADMILL_PARAM_COLOR"; echo "env=$TREADMILL_PARAM_TOKEN"; ' +
          'stat -c "mode=%a owner=%u" $TREADMILL_SECRETS_DIR/TOKEN; echo "file=$(cat $TREADMILL_SECRETS_DIR/TOKEN)"; ' +
          "test -e $TREADMILL_SECRETS_DIR/COLOR || echo no-file-for-plain",
        {
          parameters: [
            { name: "COLOR", value: "blue", secret: false },
            { name: "TOKEN", value: secret, secret: true },
          ],
        },
      ),
    );
    expect(await job.exited).toMatchObject({ exitCode: 0, status: "success" });
    const console = out.text("console");
    expect(console).toContain("plain=blue");
    expect(console).toContain(`env=${secret}`);
    expect(console).toContain(`mode=600 owner=${uidBase}`);
    expect(console).toContain(`file=${secret}`);
    expect(console).toContain("no-file-for-plain");
    await driver.cleanup(job);
    expect(logLines.length).toBeGreaterThan(5);
    expect(logLines.join("\n")).not.toContain(secret);
    expect(out.text("supervisor")).not.toContain(secret);
  });

  it("stops with SIGHUP and SIGTERM, waits the grace period, then kills every process of the job", async () => {
    const marker = String(100000 + Math.floor(Math.random() * 800000));
    const { job, out } = await run(
      spec(`trap "" HUP TERM; setsid sleep ${marker} & sleep ${marker} & echo ready; while true; do sleep 1; done`),
    );
    await out.waitFor("console", /ready/);
    const uid = (job.prepared as unknown as { uid: number }).uid;
    expect((await processesOfUid(uid)).length).toBeGreaterThanOrEqual(4);
    // Both sleeps are up (setsid may not have exec'd yet when "ready" shows).
    const deadline = Date.now() + 20000;
    while ((await processesMentioning(`sleep ${marker}`)).length < 2 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    expect((await processesMentioning(`sleep ${marker}`)).length).toBe(2);
    await driver.stop(job, { graceMs: 300 });
    const exit = await job.exited;
    expect(exit).toMatchObject({ status: "failure", stopped: true, signal: "SIGKILL", exitCode: null });
    expect(job.status()).toBe("exited");
    expect(await processesOfUid(uid)).toEqual([]);
    expect(await processesMentioning(`sleep ${marker}`, true)).toEqual([]);
    await driver.stop(job); // Idempotent.
    await driver.cleanup(job);
  });

  it("lets a workload that ignores SIGHUP but honours SIGTERM exit on its own within the grace period", async () => {
    const { job, out } = await run(spec('trap "" HUP; trap "echo got-term; exit 5" TERM; echo ready; while true; do sleep 1; done'));
    await out.waitFor("console", /ready/);
    await driver.stop(job, { graceMs: 60000 });
    const exit = await job.exited;
    expect(exit).toMatchObject({ exitCode: 5, status: "failure", stopped: true });
    expect(exit.signal).toBeUndefined();
    expect(out.text("console")).toContain("got-term");
    await driver.cleanup(job);
  });

  it("stops an interactive shell, which ignores SIGTERM, at once with SIGHUP instead of waiting out the grace period", async () => {
    const { job, out } = await run(spec("echo ready; exec sh -i"));
    await out.waitFor("console", /ready/);
    job.writeConsole(Buffer.from("echo shell-$((6*7))\n"));
    await out.waitFor("console", /shell-42/);
    const started = Date.now();
    await driver.stop(job, { graceMs: 60000 });
    const exit = await job.exited;
    expect(Date.now() - started).toBeLessThan(5000);
    expect(exit).toMatchObject({ exitCode: 129, status: "failure", stopped: true }); // 128 + SIGHUP
    await driver.cleanup(job);
  });

  it("starts every job from the image again: two jobs in a row see none of each other's files", async () => {
    const first = await run(spec("echo one > /root/left-behind; echo two > /etc/hostname; ls /root"));
    expect(await first.job.exited).toMatchObject({ exitCode: 0 });
    expect(first.out.text("console")).toContain("left-behind");
    await driver.cleanup(first.job);
    const secondSpec = spec("test -e /root/left-behind && echo FOUND; cat /etc/hostname; exit 0");
    const second = await run(secondSpec);
    expect(await second.job.exited).toMatchObject({ exitCode: 0 });
    expect(second.out.text("console")).not.toContain("FOUND");
    expect(second.out.text("console")).toContain("treadmill-job");
    await driver.cleanup(second.job);
    // The second job's root was the spare built when the first one ended:
    // fresh all the same.
    const built = logLines.find((l) => l.includes(`"jobId":"${secondSpec.jobId}"`) && l.includes("work directory built"));
    expect(built).toContain('"spare":true');
  });

  it("keeps running jobs apart: another slot's uid can read neither the job's directory nor the layer cache", async () => {
    const a = await run(spec("echo private > /root/mine; echo ready; exec sleep 100000"));
    const b = await run(spec("echo ready; ls / ; exec sleep 100000"));
    await a.out.waitFor("console", /ready/);
    await b.out.waitFor("console", /ready/);
    const pa = a.job.prepared as unknown as { uid: number; jobDir: string };
    const pb = b.job.prepared as unknown as { uid: number; jobDir: string };
    expect(pa.uid).not.toBe(pb.uid);
    const asB = (args: string[]) => spawnSync(args[0]!, args.slice(1), { uid: pb.uid, gid: pb.uid, encoding: "utf8" });
    const readA = asB(["cat", join(pa.jobDir, "rootfs", "root", "mine")]);
    expect(readA.status).not.toBe(0);
    expect(readA.stderr).toMatch(/Permission denied/);
    expect(asB(["ls", join(base, "work", "jobs")]).stderr).toMatch(/Permission denied/);
    expect(asB(["ls", join(base, "work", "layers")]).stderr).toMatch(/Permission denied/);
    // Its own directory is its own.
    expect(asB(["ls", join(pb.jobDir, "rootfs", "bin", "busybox")]).status).toBe(0);
    // Inside the sandbox, the host's file system is not there at all.
    expect(b.out.text("console")).not.toContain("work");
    await Promise.all([driver.stop(a.job, { graceMs: 100 }), driver.stop(b.job, { graceMs: 100 })]);
    await Promise.all([driver.cleanup(a.job), driver.cleanup(b.job)]);
  });

  it("rejects layers whose paths escape the root, and writes nothing outside", async () => {
    const outside = join(base, `outside-${randomBytes(4).toString("hex")}`);
    const hostile: [string, Parameters<typeof buildRawLayer>[1]][] = [
      ["dotdot", [{ name: "../escaped", type: "file", mode: 0o644, mtime: 0, content: "x" }]],
      ["absolute", [{ name: `${outside}/abs`, type: "file", mode: 0o644, mtime: 0, content: "x" }]],
      [
        "through a link",
        [
          { name: "link", type: "symlink", mode: 0o777, mtime: 0, linkname: base },
          { name: "link/through-link", type: "file", mode: 0o644, mtime: 0, content: "x" },
        ],
      ],
      ["relative link out", [{ name: "up", type: "symlink", mode: 0o777, mtime: 0, linkname: "../../../.." }]],
      ["hard link out", [{ name: "hard", type: "hardlink", mode: 0o644, mtime: 0, linkname: "/etc/passwd" }]],
    ];
    for (const [label, entries] of hostile) {
      const layer = await buildRawLayer(join(base, `hostile-${label.replace(/ /g, "-")}.tar.gz`), entries);
      const s = spec("true", { image: imageOf([layer], {}) });
      const err = await driver.prepare(s).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DriverError);
      expect((err as DriverError).reason).toBe("image");
      expect((err as DriverError).message).toMatch(/rejected/);
    }
    await expect(stat(join(base, "escaped"))).rejects.toThrow(/ENOENT/);
    await expect(stat(join(base, "through-link"))).rejects.toThrow(/ENOENT/);
    await expect(stat(outside)).rejects.toThrow(/ENOENT/);
    // A corrupted blob (digest mismatch) is an image error too.
    const good = image.layers[0]!;
    const wrong = { ...good, digest: `sha256:${"0".repeat(64)}` };
    await expect(driver.prepare(spec("true", { image: imageOf([wrong], {}) }))).rejects.toMatchObject({ reason: "image" });
    // Failures freed their slots: both are free.
    const a = await driver.prepare(spec("true"));
    const b = await driver.prepare(spec("true"));
    await Promise.all([driver.cleanup(a), driver.cleanup(b)]);
  });

  it("bridges the console to a 0600 unix socket in a root-only directory, never a tcp port: a client's line reaches the workload and the echo comes back", async () => {
    const { job, out } = await run(spec('echo ready; read line; echo "got:$line"; read again; echo "second:$again"'));
    const exposure = job.exposures().find((e) => e.kind === "console")!;
    expect(exposure).toMatchObject({ name: "console" });
    expect(exposure).not.toHaveProperty("port");
    if (!("path" in exposure)) throw new Error("the console is not a unix socket");
    const socketStat = await stat(exposure.path);
    expect(socketStat.isSocket()).toBe(true);
    expect(socketStat.mode & 0o777).toBe(0o600);
    const dirStat = await stat(dirname(exposure.path));
    expect({ mode: dirStat.mode & 0o777, uid: dirStat.uid }).toEqual({ mode: 0o700, uid: 0 });
    // Another user (a job's uid) cannot even reach it.
    const asOther = spawnSync("socat", ["-", `UNIX-CONNECT:${exposure.path}`], { uid: uidBase + 1, gid: uidBase + 1, input: "", encoding: "utf8" });
    expect(asOther.status).not.toBe(0);
    expect(asOther.stderr).toMatch(/Permission denied/);
    const one = await socketClient(exposure.path);
    const two = await socketClient(exposure.path);
    await out.waitFor("console", /ready/);
    one.socket.write("ping\n");
    await one.waitFor(/got:ping/);
    await two.waitFor(/got:ping/); // Every client sees the console.
    expect(one.text()).toMatch(/ping\r?\n/); // The terminal's echo.
    two.socket.write("pong\n");
    await one.waitFor(/second:pong/);
    expect(await job.exited).toMatchObject({ exitCode: 0 });
    expect(out.text("console")).toContain("got:ping");
    expect(job.exposures()).toEqual([]);
    one.socket.destroy();
    two.socket.destroy();
    await driver.cleanup(job);
  });

  it("snapshots what the job changed as a layer a new job starts from", async () => {
    const { job } = await run(spec("mkdir -p /srv/data; echo made-by-job > /srv/data/file; rm /etc/hostname; echo done"));
    expect(await job.exited).toMatchObject({ exitCode: 0 });
    const layer = await driver.snapshot(job, { outFile: join(base, "snapshot.tar.gz") });
    await driver.cleanup(job);
    expect(layer.mediaType).toBe("application/vnd.treadmill.rootfs.tar+gzip");
    const described = await layerOf(layer.path, layer.mediaType);
    expect(layer.digest).toBe(described.digest);
    expect(layer.size).toBe(described.size);
    const { stdout } = await execFileAsync("tar", ["-tzf", layer.path]);
    const names = stdout.split("\n").filter(Boolean);
    expect(names).toEqual(expect.arrayContaining(["srv/", "srv/data/", "srv/data/file", "etc/.wh.hostname"]));
    expect(names.some((n) => n.startsWith("bin/"))).toBe(false); // Unchanged image files are not in it.
    expect(names.some((n) => n.includes("secrets"))).toBe(false);

    const next = await run(
      spec("cat /srv/data/file; test -e /etc/hostname || echo hostname-gone", { image: imageOf([...image.layers, described], {}) }),
    );
    expect(await next.job.exited).toMatchObject({ exitCode: 0 });
    expect(next.out.text("console")).toContain("made-by-job");
    expect(next.out.text("console")).toContain("hostname-gone");
    await driver.cleanup(next.job);
  });

  it("gives up preparing when the job is canceled, and frees the slot", async () => {
    const abort = new AbortController();
    const pending = driver.prepare(spec("true"), {
      signal: abort.signal,
      onStage: (stage) => {
        if (stage === "provisioning") abort.abort();
      },
    });
    await expect(pending).rejects.toBeInstanceOf(DriverAbortError);
    const a = await driver.prepare(spec("true"));
    const b = await driver.prepare(spec("true"));
    await expect(driver.prepare(spec("true"))).rejects.toMatchObject({ reason: "start" }); // Both slots taken.
    await Promise.all([driver.cleanup(a), driver.cleanup(b)]);
  });
  it("puts every job in a network namespace of its own: it reaches no port of the host, and an exposure reaches only its own listeners", async () => {
    const host = await hostService("host-service");
    try {
      const { job, out } = await run(
        spec(serveAndProbe(8080, "from-the-job", [host.port, 8080]), {
          exposedPorts: [
            { name: "web", port: 8080 },
            { name: "host", port: host.port },
            { name: "idle", port: 9 },
          ],
        }),
      );
      await out.waitFor("console", /probed/);
      // From inside: its own port answers, the host's does not exist.
      expect(out.text("console")).toContain("reached-8080");
      expect(out.text("console")).toContain(`refused-${host.port}`);
      // Through the supervisor: the job's own listener, through its relay.
      const web = exposureOf(job, "web");
      expect(web).toHaveProperty("path");
      await web.check!();
      expect(await dialExposure(web)).toContain("from-the-job");
      // A port of the host, or one nothing of the job listens on: PERMISSION_DENIED, and its relay reaches nothing.
      const hostPort = exposureOf(job, "host");
      await expect(hostPort.check!()).rejects.toBeInstanceOf(ExposureDenied);
      await expect(hostPort.check!()).rejects.toThrow(`nothing of the job listens on port ${host.port}`);
      expect(await dialExposure(hostPort)).toBe("");
      await expect(exposureOf(job, "idle").check!()).rejects.toBeInstanceOf(ExposureDenied);
      await driver.stop(job, { graceMs: 100 });
      await driver.cleanup(job);
    } finally {
      host.server.close();
    }
  });

  it("with --job-network host allows a declared port only when the job's own uid listens on it", async () => {
    const host = await hostService("host-service");
    const hostNet = await createProcessDriver({ workDir: join(base, "work-host-net"), network: "host", graceMs: 1000, logger });
    try {
      expect(hostNet.sandbox.network).toBe("host");
      const jobPort = host.port + 1 > 65000 ? host.port - 1 : host.port + 1;
      const { job, out } = await run(
        spec(serveAndProbe(jobPort, "from-the-job", [host.port]), {
          exposedPorts: [
            { name: "web", port: jobPort },
            { name: "host", port: host.port },
          ],
        }),
        hostNet,
      );
      await out.waitFor("console", /probed/);
      expect(out.text("console")).toContain(`reached-${host.port}`); // What "host" means: unsafe.
      const web = exposureOf(job, "web");
      expect(web).toMatchObject({ host: "127.0.0.1", port: jobPort });
      await web.check!();
      expect(await dialExposure(web)).toContain("from-the-job");
      await expect(exposureOf(job, "host").check!()).rejects.toThrow(`port ${host.port} on this host belongs to something other than the job`);
      await hostNet.stop(job, { graceMs: 100 });
      await hostNet.cleanup(job);
    } finally {
      await hostNet.close();
      host.server.close();
    }
  });

  it("without bubblewrap (chroot mode) still runs the job in pid and network namespaces of its own", async () => {
    const host = await hostService("host-service");
    const chrooted = await createProcessDriver({ workDir: join(base, "work-chroot"), sandbox: "chroot", graceMs: 1000, logger });
    try {
      expect(chrooted.sandbox).toMatchObject({ mode: "chroot", network: "isolated" });
      const { job, out } = await run(
        spec(`if echo | nc -w 2 127.0.0.1 ${host.port} 2>/dev/null | grep -q host-service; then echo reached-host; else echo host-refused; fi; echo "pid $$"; exit 0`),
        chrooted,
      );
      expect(await job.exited).toMatchObject({ exitCode: 0, status: "success" });
      expect(out.text("console")).toContain("host-refused");
      expect(out.text("console")).toMatch(/pid [2-9]\r?\n/); // A namespace of its own, whose init is pid 1.
      await chrooted.cleanup(job);
    } finally {
      await chrooted.close();
      host.server.close();
    }
  });

  it("reports a job whose sandbox was killed from outside (every process of its uid, as a second supervisor on the same uids once did) as a host failure", async () => {
    const { job, out } = await run(spec("echo ready; exec sleep 100000"));
    await out.waitFor("console", /ready/);
    const uid = (job.prepared as unknown as { uid: number }).uid;
    signalAll(
      (await processesOfUid(uid)).map((p) => p.pid),
      "SIGKILL",
    );
    const exit = await job.exited;
    expect(exit).toMatchObject({ exitCode: null, status: "failure", stopped: false });
    expect(exit.message).toMatch(/sandbox was killed by SIGKILL, from outside the job/);
    expect(exit.failure).toBeInstanceOf(DriverError);
    expect(exit.failure?.reason).toBe("internal");
    await driver.cleanup(job);
  });
});
