import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { ExitStatus, FinalizeReason, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { eventually } from "../cli/harness.js";
import { startCluster, type Cluster } from "../support/cluster.js";

/** A job of three hosts on three supervisor processes (DESIGN.md §5, §7). */
describe("a three-host job", () => {
  let cluster: Cluster;
  beforeAll(async () => {
    cluster = await startCluster({ supervisors: 3 });
    await cluster.pushShellImage("test/sh:1");
  }, 180000);
  afterAll(async () => {
    await cluster?.stop();
  }, 60000);

  it("tells every host its peers, runs only once all three are ready, ends for all when one ends, and logs each host's output", async () => {
    // Host 0 ends the job when the test lets it; the others would run on.
    const script = [
      'echo "host $TREADMILL_HOST_INDEX of $TREADMILL_HOST_COUNT peers $TREADMILL_PEERS"',
      'if [ "$TREADMILL_HOST_INDEX" = 0 ]; then while [ ! -e /go ]; do sleep 0.1; done; echo host-0-done; exit 0; fi',
      "sleep 600",
    ].join("\n");
    // One supervisor is frozen: it gets StartJob but cannot start its part.
    const late = cluster.supervisors.get("sup-3")!;
    late.proc.child.kill("SIGSTOP");
    let id: string;
    try {
      const { job } = await cluster.client(JobService).submitJob({
        spec: { image: "test/sh:1", hosts: { hostCount: 3 }, parameters: [{ name: "script", value: script }] },
      });
      id = job!.id;
      // The other two run their part and the coordinator has their reports...
      await eventually("two hosts running", async () => {
        const rows = await cluster.db.sql<{ n: number }[]>`
          select count(*)::int as n from job_hosts where job_id = ${id} and state = 'running'`;
        return rows[0].n === 2;
      });
      // ... yet the job is not running: one host is not ready.
      const waiting = (await cluster.client(JobService).getJob({ jobId: id })).job!;
      expect(waiting.state).toBeLessThan(JobState.RUNNING);
      expect(waiting.hostIds).toHaveLength(3);
      expect(waiting.hostIds).toContain(late.hostId);
    } finally {
      late.proc.child.kill("SIGCONT");
    }

    const running = await cluster.waitState(id, JobState.RUNNING);
    expect(running.state).toBe(JobState.RUNNING);
    // The job became RUNNING with the last host's report.
    const timeline = (await cluster.client(JobService).getJob({ jobId: id })).job!.timeline;
    const turnedRunning = timeline.filter((e) => e.state === JobState.RUNNING);
    expect(turnedRunning).toHaveLength(1);
    expect(turnedRunning[0].hostId).toBe(late.hostId);

    const names = running.hostIds.map((h) => cluster.supervisorOf(h).name);
    await writeFile(join(cluster.jobRoot(names[0], id, 1), "go"), "");
    const done = await cluster.waitFinalized(id);
    expect(done.finalizeReason).toBe(FinalizeReason.WORKLOAD_EXITED);
    expect(done.exitStatus).toBe(ExitStatus.SUCCESS);
    // Hosts 1 and 2 were told to stop their part; every host shipped its log.
    for (const name of names.slice(1)) {
      await cluster.supervisors.get(name)!.proc.waitForLine(new RegExp(`"jobId":"${id}".*"stopped":true.*"msg":"job exited"`), 60000);
    }
    for (const name of names) {
      const shipped = await cluster.supervisors.get(name)!.proc.waitForLine(new RegExp(`"jobId":"${id}".*"msg":"job log (shipped|incomplete)`), 60000);
      expect(shipped).toMatch(/job log shipped/);
    }

    const consoles = await Promise.all(["console", "console-1", "console-2"].map((c) => cluster.readLog(id, c)));
    for (const [i, text] of consoles.entries()) {
      expect(text).toContain(`host ${i} of 3 peers ${names.join(" ")}`);
    }
    expect(consoles[0]).toContain("host-0-done");
    // Each host's log is complete: its last line, written after the first
    // host ended (and closed its own channels), is there too.
    for (const channel of ["supervisor", "supervisor-1", "supervisor-2"]) {
      expect(await cluster.readLog(id, channel)).toMatch(/job ended: /);
    }
  }, 180000);
});
