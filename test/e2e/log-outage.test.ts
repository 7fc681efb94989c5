import { readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createClient } from "@connectrpc/connect";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { FinalizeReason, JobEventKind, JobState, LogStatus, type Job } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { FrameCache, Spill, SpillBudget } from "../../supervisor/log-shipper/spill.js";
import { spawnTml } from "../cli/harness.js";
import { startCluster, type Cluster } from "../support/cluster.js";

// The real bin: what tml says about an unreachable log server rests on Node's
// network errors, which jest's module sandbox hides from Connect (test/cli/harness.ts).
const tml = (...args: Parameters<typeof spawnTml>) => spawnTml(...args).result;
const startTml = spawnTml;

/** The per-host spill cap of the cluster's supervisors (small, to reach it in a test). */
const CAP = 256 * 1024;

/** A workload that waits for the file /go (created by the test in its root), then runs `then`. */
const afterGo = (then: string) => `echo waiting; while [ ! -e /go ]; do sleep 0.1; done; ${then}`;
/** Prints "line 1" to "line N", one echo each. */
const numbered = (n: number) => `i=1; while [ $i -le ${n} ]; do echo "line $i"; i=$((i+1)); done`;
const expectedLines = (n: number) => Array.from({ length: n }, (_, i) => `line ${i + 1}\n`).join("");
/** The console is a terminal: its lines end in CRLF. */
const lf = (text: string) => text.replace(/\r\n/g, "\n");

/**
 * How many numbered lines `text` holds, checking that they are "line 1",
 * "line 2"... each once and in order (the last one may be cut short).
 */
function countNumbered(text: string): number {
  const lines = lf(text).split("\n");
  const last = lines.pop()!;
  lines.forEach((line, i) => {
    if (line !== `line ${i + 1}`) throw new Error(`line ${i + 1} of the log is ${JSON.stringify(line)}`);
  });
  if (!`line ${lines.length + 1}`.startsWith(last)) throw new Error(`the log ends with ${JSON.stringify(last)}`);
  return lines.length;
}

/**
 * Job logs across log-server outages and supervisor crashes (issue #18,
 * defect 4; DESIGN.md §7): real supervisors (child processes) ship to a real
 * log server that the test stops and starts again. Every line spilled
 * arrives exactly once, however long the outage; what the host's spill cap
 * drops is on the job's record, its timeline and its supervisor channel.
 */
describe("job logs across log-server outages and supervisor crashes", () => {
  let cluster: Cluster;
  /** `tml` as a user of the cluster. */
  let tmlEnv: { env: Record<string, string> };
  const tmlConfig = () => join(cluster.dir, "tml.json");
  beforeAll(async () => {
    cluster = await startCluster({
      supervisors: 1,
      coordinatorArgs: ["--supervisor-grace-ms", "1500", "--job-sweep-interval-ms", "200", "--replica-heartbeat-ms", "20000"],
      supervisorArgs: ["--log-spill-cap-bytes", String(CAP)],
    });
    await cluster.pushShellImage("test/sh:1");
    const token = (await createClient(AuthService, cluster.admin).createToken({ description: "tml in the log outage test" })).token;
    tmlEnv = { env: { TML_SERVER: cluster.coordinatorUrl, TML_TOKEN: token } };
  }, 180000);
  afterAll(async () => {
    await cluster?.stop();
  }, 60000);

  const submit = async (script: string) => {
    const { job } = await cluster.client(JobService).submitJob({
      spec: { image: "test/sh:1", hosts: { hostCount: 1 }, parameters: [{ name: "script", value: script }] },
    });
    return job!.id;
  };
  const getJob = async (id: string) => (await cluster.client(JobService).getJob({ jobId: id })).job!;
  const release = (job: Job) => writeFile(join(cluster.jobRoot(cluster.supervisorOf(job.hostIds[0]).name, job.id, job.attempt), "go"), "");
  /** The job's log status reaches `status` (after finalization nothing streams it: GetJob, with a deadline). */
  const waitLogStatus = async (id: string, status: LogStatus, timeoutMs = 60000) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const job = await getJob(id);
      if (job.logStatus === status) return job;
      if (Date.now() > deadline) throw new Error(`job ${id}'s log is ${LogStatus[job.logStatus]}, not ${LogStatus[status]}, after ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  };
  const spillDir = (jobId: string) => join(cluster.supervisors.get("sup-1")!.workDir, "spill", `${jobId}-1`);
  const spilledBytes = async (jobId: string) => {
    const names = await readdir(spillDir(jobId)).catch(() => [] as string[]);
    const sizes = await Promise.all(names.filter((n) => n.endsWith(".spill")).map(async (n) => (await stat(join(spillDir(jobId), n))).size));
    return sizes.reduce((a, b) => a + b, 0);
  };

  it("finalizes a job at once while its log server is down, then delivers every line exactly once when the server is back", async () => {
    const id = await submit(afterGo(numbered(201)));
    const running = await cluster.waitState(id, JobState.RUNNING);
    await cluster.stopLogServer();
    await release(running);
    // The end waits for the log servers only briefly: the job is finalized with its log still on the host.
    const done = await cluster.waitFinalized(id, 30000);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(done.exitCode).toBe(0);
    const shipping = await getJob(id);
    expect(shipping.logStatus).toBe(LogStatus.SHIPPING);
    expect(shipping.logStatusMessage).toMatch(new RegExp(`waiting for log server ${cluster.logServerUrl}.* on host sup-1$`));
    expect(await spilledBytes(id)).toBeGreaterThan(0);
    const shown = await tml(tmlConfig(), ["job", "get", id], tmlEnv);
    expect(shown.stdout).toMatch(/Log:\s+still being shipped \(waiting for log server .* on host sup-1\)/);
    // tml job logs cannot read the log server, and says why the log is not all there.
    const logs = await tml(tmlConfig(), ["job", "logs", id], tmlEnv);
    expect(logs.code).not.toBe(0);
    expect(logs.stderr).toContain(`the log of job ${id} is still being shipped from its host`);

    await cluster.startLogServer();
    const complete = await waitLogStatus(id, LogStatus.COMPLETE);
    expect(complete.logBytesLost).toBe(0n);
    expect(complete.logStatusMessage).toBe("");
    expect(complete.state).toBe(JobState.FINALIZED);
    expect(complete.finalizeTime).toEqual(done.finalizeTime);
    expect(complete.timeline.some((e) => e.kind === JobEventKind.LOG_INCOMPLETE)).toBe(false);
    expect(lf(await cluster.readLog(id, "console"))).toBe(`waiting\n${expectedLines(201)}`);
    // The spill is gone once the coordinator has the final report.
    const deadline = Date.now() + 20000;
    while ((await readdir(spillDir(id)).catch(() => null)) !== null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(await readdir(spillDir(id)).catch(() => null)).toBeNull();
  }, 120000);

  it("resumes the spill of a supervisor SIGKILLed while its job printed with the log server down: every spilled line arrives once", async () => {
    const id = await submit('i=1; while true; do echo "line $i"; i=$((i+1)); if [ $((i % 20)) = 0 ]; then sleep 0.02; fi; done');
    await cluster.waitState(id, JobState.RUNNING);
    // Some lines reach the log server, then it goes down and the rest piles up in the spill.
    const server = await cluster.readLog(id, "console").catch(() => "");
    await cluster.stopLogServer();
    const deadline = Date.now() + 30000;
    while ((await spilledBytes(id)) < 24 * 1024 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    await cluster.killSupervisor("sup-1");

    // What the spill holds is what must arrive: read it as the dead process left it.
    const budget = new SpillBudget();
    const spill = await Spill.open({
      dir: spillDir(id),
      ready: Promise.resolve(),
      prefix: `${id}-1-console`,
      fileBytes: 16 * 1024,
      cache: new FrameCache(0),
      budget,
      syncIntervalMs: 0,
    });
    expect(spill.lastSeq).toBeGreaterThan(0);
    const spilled: Buffer[] = [];
    for (let seq = spill.lastSeq; seq >= 1 && spill.holds(seq); seq--) spilled.unshift(Buffer.from((await spill.get(seq)).data));
    await spill.close();
    const spilledText = Buffer.concat(spilled).toString();
    expect(lf(spilledText)).toMatch(/^line \d+/);

    // Its log:write token expired meanwhile: the restarted supervisor must get a fresh one.
    const [meta] = (await readdir(spillDir(id))).filter((n) => n.endsWith(".shipper.json"));
    const metaPath = join(spillDir(id), meta);
    const described = JSON.parse(await readFile(metaPath, "utf8")) as { token: string; tokenExpireMs: number };
    await writeFile(metaPath, JSON.stringify({ ...described, token: "expired", tokenExpireMs: Date.now() - 1000 }));

    const sup = cluster.supervisors.get("sup-1")!;
    await cluster.startSupervisor("sup-1");
    await sup.proc.waitForLine(/"asking the coordinator for a fresh log token"/, 30000);
    const dropped = await cluster.waitFinalized(id, 30000);
    expect(dropped.finalizeReason).toBe(FinalizeReason.HOST_DROPPED);
    expect((await waitLogStatus(id, LogStatus.SHIPPING)).logStatusMessage).toContain(cluster.logServerUrl);

    await cluster.startLogServer();
    const complete = await waitLogStatus(id, LogStatus.COMPLETE);
    expect(complete.logBytesLost).toBe(0n);
    // The server's copy: what it had before the outage, then everything the spill held, each line once.
    const shipped = await cluster.readLog(id, "console");
    expect(shipped.endsWith(spilledText)).toBe(true);
    expect(countNumbered(shipped)).toBeGreaterThan(countNumbered(server));
    expect(shipped.startsWith(server)).toBe(true);
  }, 180000);

  it("marks the log INCOMPLETE with the bytes lost when the spill cap is reached, on the record, the timeline and the supervisor channel", async () => {
    const lines = 40000; // about 200 KiB of output more than the cap
    const run = startTml(tmlConfig(), ["job", "run", "test/sh:1", "--param", `script=${afterGo(numbered(lines))}`], tmlEnv);
    const id = /--> job (\S+) submitted/.exec(await run.waitForLine(/--> job \S+ submitted/))![1];
    const running = await cluster.waitState(id, JobState.RUNNING);
    await cluster.stopLogServer();
    await release(running);
    const done = await cluster.waitFinalized(id, 60000);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    const incomplete = await getJob(id);
    expect(incomplete.logStatus).toBe(LogStatus.INCOMPLETE);
    expect(incomplete.logBytesLost).toBeGreaterThan(0n);
    expect(incomplete.logStatusMessage).toBe("spill cap reached on host sup-1");
    const events = incomplete.timeline.filter((e) => e.kind === JobEventKind.LOG_INCOMPLETE);
    expect(events.length).toBeGreaterThanOrEqual(1);
    expect(events[0].message).toMatch(/^log incomplete: [\d.]+ KiB lost: spill cap reached on host sup-1$/);

    const shown = await tml(tmlConfig(), ["job", "get", id], tmlEnv);
    expect(shown.code).toBe(0);
    expect(shown.stdout).toMatch(/Log:\s+INCOMPLETE, [\d.]+ KiB lost: spill cap reached on host sup-1/);
    // The last line of tml job run says so too.
    const ran = await run.result;
    expect(ran.code).toBe(0);
    expect(ran.stderr).toMatch(new RegExp(`--> job ${id} succeeded \\(exit code 0\\); log INCOMPLETE, [\\d.]+ KiB lost: spill cap reached on host sup-1\n$`));

    await cluster.startLogServer();
    // What was spilled arrives: a prefix of the output, each line once; the rest is what the record says was lost.
    const total = Buffer.byteLength(`waiting\n${expectedLines(lines)}`.replace(/\n/g, "\r\n"));
    const deadline = Date.now() + 60000;
    let console = "";
    while (Date.now() < deadline) {
      console = await cluster.readLog(id, "console").catch(() => "");
      if (console.length > 0 && Buffer.byteLength(console) + Number((await getJob(id)).logBytesLost) === total) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    expect(lf(console).startsWith("waiting\n")).toBe(true);
    countNumbered(lf(console).slice("waiting\n".length));
    expect(Buffer.byteLength(console) + Number((await getJob(id)).logBytesLost)).toBe(total);
    expect(await cluster.readLog(id, "supervisor")).toContain(
      "log output of console is being dropped: this host's spill cap (256 KiB) is reached while the log servers are behind",
    );
    expect((await getJob(id)).logStatus).toBe(LogStatus.INCOMPLETE);
    const logs = await tml(tmlConfig(), ["job", "logs", id, "--channel", "supervisor"], tmlEnv);
    expect(logs.code).toBe(0);
    expect(logs.stderr).toMatch(new RegExp(`the log of job ${id} is INCOMPLETE, [\\d.]+ KiB lost: spill cap reached on host sup-1`));
  }, 180000);
});
