import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { ExitStatus, FinalizeReason, JobEventKind, JobState, type Job } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { startCluster, type Cluster } from "../support/cluster.js";

/** Long enough for a SIGKILLed supervisor to start again on a loaded machine. */
const GRACE_MS = 8000;

/** A workload that waits for the file /go (created by the test in its root), then exits with `code`. */
const waitForGo = (code: number) => `echo waiting; while [ ! -e /go ]; do sleep 0.1; done; echo released; exit ${code}`;

/**
 * Crashes of real processes (DESIGN.md §4): the coordinator and the
 * supervisors are child processes, SIGKILLed in the middle of jobs; the
 * coordinator's PostgreSQL outlives it.
 */
describe("crashes of the coordinator and of supervisors", () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await startCluster({
      supervisors: 2,
      coordinatorArgs: [
        "--supervisor-grace-ms", String(GRACE_MS),
        "--job-sweep-interval-ms", "200",
        // A restarted coordinator must not take the first one's hosts for
        // dead (and drop their jobs) before they re-attach.
        "--replica-heartbeat-ms", "20000",
      ],
    });
    await cluster.pushShellImage("test/sh:1");
  }, 180000);
  afterAll(async () => {
    await cluster?.stop();
  }, 60000);

  const submit = async (script: string, maxRestarts = 0) => {
    const { job } = await cluster.client(JobService).submitJob({
      spec: {
        image: "test/sh:1",
        hosts: { hostCount: 1 },
        parameters: [{ name: "script", value: script }],
        restartPolicy: maxRestarts > 0 ? { maxRestarts } : undefined,
      },
    });
    return job!.id;
  };
  const getJob = async (id: string) => (await cluster.client(JobService).getJob({ jobId: id })).job!;
  /** Lets a `waitForGo` workload of `job` (attempt 1) finish. */
  const release = (job: Job) => writeFile(join(cluster.jobRoot(cluster.supervisorOf(job.hostIds[0]).name, job.id, job.attempt), "go"), "");
  const finalEvents = (job: Job) => job.timeline.filter((e) => e.state === JobState.FINALIZED);

  it("finalizes the attempt of a SIGKILLed supervisor HOST_DROPPED after the grace period and runs it again on another host", async () => {
    const id = await submit('echo "attempt $TREADMILL_ATTEMPT"; if [ "$TREADMILL_ATTEMPT" = 1 ]; then sleep 600; fi; echo ran-to-the-end', 1);
    const running = await cluster.waitState(id, JobState.RUNNING);
    const victim = cluster.supervisorOf(running.hostIds[0]);
    const killedAt = Date.now();
    await cluster.killSupervisor(victim.name);

    const done = await cluster.waitFinalized(id, 120000);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
    expect(done.attempt).toBe(2);
    expect(done.hostIds).toHaveLength(1);
    expect(done.hostIds[0]).not.toBe(victim.hostId);

    const job = await getJob(id);
    const restarted = job.timeline.filter((e) => e.kind === JobEventKind.RESTARTED);
    expect(restarted).toHaveLength(1);
    expect(restarted[0].attempt).toBe(2);
    expect(restarted[0].hostId).toBe(victim.hostId);
    expect(restarted[0].message).toMatch(/attempt 1 ended host_dropped/);
    // Not before the grace period: a host may come back within it.
    expect(timestampMs(restarted[0].time!) - killedAt).toBeGreaterThanOrEqual(GRACE_MS - 50);
    expect(job.timeline.some((e) => e.attempt === 1 && e.state === JobState.RUNNING)).toBe(true);
    expect(job.timeline.some((e) => e.attempt === 2 && e.state === JobState.RUNNING)).toBe(true);
    expect(finalEvents(job)).toHaveLength(1);
    expect(finalEvents(job)[0].attempt).toBe(2);
    const console = await cluster.readLog(id, "console");
    expect(console).toContain("attempt 2");
    expect(console).toContain("ran-to-the-end");

    // The host comes back (its supervisor restarted) and takes jobs again.
    await cluster.startSupervisor(victim.name);
  }, 180000);

  it("never runs a workload twice within one attempt when its supervisor dies before the coordinator recorded the start", async () => {
    const id = await submit('echo "attempt $TREADMILL_ATTEMPT"; sleep 600', 1);
    const running = await cluster.waitState(id, JobState.RUNNING);
    const victim = cluster.supervisorOf(running.hostIds[0]);
    const before = victim.proc;
    // The acknowledgement of the StartJob is lost (as when the supervisor dies
    // right after starting the workload): the coordinator sends it again.
    await cluster.db.sql`update job_hosts set started = false where job_id = ${id} and attempt = 1`;
    await cluster.killSupervisor(victim.name);
    await cluster.startSupervisor(victim.name);
    const deadline = Date.now() + 120000;
    let done = await getJob(id);
    while (!(done.attempt === 2 && done.state === JobState.RUNNING)) {
      if (Date.now() > deadline) throw new Error(`job ${id} is not running attempt 2: attempt ${done.attempt}, ${JobState[done.state]}`);
      await new Promise((r) => setTimeout(r, 100));
      done = await getJob(id);
    }
    // The driver's "job started" line: a workload was started (the supervisor's own logs of the tally, outside Treadmill's records).
    const startsOfAttempt1 = (lines: string[]) =>
      lines.filter((l) => l.includes('"subsystem":"driver"') && l.includes('"msg":"job started"') && l.includes(id) && l.includes('"attempt":1,')).length;
    try {
      expect(startsOfAttempt1(before.lines) + startsOfAttempt1(victim.proc.lines)).toBe(1);
      const job = await getJob(id);
      expect(job.timeline.find((e) => e.kind === JobEventKind.RESTARTED && e.attempt === 2)?.message).toMatch(/attempt 1 ended host_start_failure.*already ran on this host/);
    } finally {
      await cluster.client(JobService).cancelJob({ jobId: done.id });
      await cluster.waitFinalized(id, 60000);
    }
  }, 180000);

  it("keeps jobs running while the coordinator is down; the supervisors re-attach and each job ends with its true exit status", async () => {
    const ok = await submit(waitForGo(0));
    const failing = await submit(waitForGo(3));
    const running = await Promise.all([ok, failing].map((id) => cluster.waitState(id, JobState.RUNNING)));
    expect(new Set(running.map((j) => j.hostIds[0])).size).toBe(2);
    const marks = new Map([...cluster.supervisors.values()].map((s) => [s.name, s.proc.lines.length]));

    await cluster.killCoordinator();
    // Each supervisor loses its stream and backs off, jobs untouched.
    await Promise.all(
      [...cluster.supervisors.values()].map((s) =>
        s.proc.waitForLine(/cannot attach to coordinator|coordinator closed the stream/, 30000, marks.get(s.name)),
      ),
    );
    await cluster.startCoordinator();
    await Promise.all([...cluster.supervisors.values()].map((s) => cluster.waitAttached(s.name, marks.get(s.name)!)));
    for (const s of cluster.supervisors.values()) {
      expect(s.proc.lines.slice(marks.get(s.name)).filter((l) => /"job exited"/.test(l))).toEqual([]);
    }

    await Promise.all(running.map(release));
    const [okDone, failingDone] = await Promise.all([ok, failing].map((id) => cluster.waitFinalized(id)));
    expect(okDone.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(okDone.exitStatus).toBe(ExitStatus.SUCCESS);
    expect(okDone.exitCode).toBe(0);
    expect(failingDone.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(failingDone.exitStatus).toBe(ExitStatus.FAILURE);
    expect(failingDone.exitCode).toBe(3);
    for (const id of [ok, failing]) {
      const job = await getJob(id);
      expect(job.attempt).toBe(1);
      expect(job.timeline.filter((e) => e.kind === JobEventKind.RESTARTED)).toEqual([]);
      expect(finalEvents(job)).toHaveLength(1);
      expect(await cluster.readLog(id, "console")).toContain("released");
    }
  }, 180000);

  it("reports a job that finished while the coordinator was down after the supervisor re-attaches, exactly once", async () => {
    const id = await submit(waitForGo(3));
    const running = await cluster.waitState(id, JobState.RUNNING);
    const sup = cluster.supervisorOf(running.hostIds[0]);
    const mark = sup.proc.lines.length;

    await cluster.killCoordinator();
    await release(running);
    // The supervisor saw the end and shipped the log; its report waits for a coordinator.
    const ofJob = (msg: string) => new RegExp(`"jobId":"${id}".*"msg":"${msg}"`);
    await sup.proc.waitForLine(ofJob("job exited"), 30000, mark);
    await sup.proc.waitForLine(ofJob("job log shipped"), 30000, mark);
    await cluster.startCoordinator();
    await cluster.waitAttached(sup.name, mark);

    const done = await cluster.waitFinalized(id);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(done.exitStatus).toBe(ExitStatus.FAILURE);
    expect(done.exitCode).toBe(3);
    expect(done.attempt).toBe(1);
    // The supervisor drops the report once acknowledged: a later re-attach
    // (the coordinator restarted once more) must not report it again.
    const again = sup.proc.lines.length;
    await cluster.killCoordinator();
    await cluster.startCoordinator();
    await cluster.waitAttached(sup.name, again);
    const job = await getJob(id);
    expect(finalEvents(job)).toHaveLength(1);
    expect(finalEvents(job)[0].message).toMatch(/workload_exited/);
    expect(job.exitCode).toBe(3);
    const rows = await cluster.db.sql<{ n: number }[]>`
      select count(*)::int as n from job_events where job_id = ${id} and state = 'finalized'`;
    expect(rows[0].n).toBe(1);
  }, 180000);
});
