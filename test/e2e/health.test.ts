/**
 * Host health with a real process-driver supervisor (issue #21): a host
 * whose image fetches keep failing because its stores are unreachable (the
 * infrastructure's failure, HOST_START_FAILURE, decided by the supervisor)
 * is quarantined after three such ends in a row, and SubmitJob then refuses
 * a job only it could run.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, type ConnectError } from "@connectrpc/connect";
import { FinalizeReason } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { silentLogger } from "../../lib/logger.js";
import { loadSupervisorConfig } from "../../supervisor/config.js";
import { createSupervisor, type Supervisor } from "../../supervisor/supervisor.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { FAST, insertImage, jobInState, uniqueTag, waitUntil } from "../support/jobs.js";

describe("host health with a process supervisor", () => {
  let c: TestCoordinator;
  let supervisor: Supervisor | undefined;
  let dir: string;

  beforeAll(async () => {
    c = await startTestCoordinator({ config: { ...FAST, healthSweepIntervalMs: 50 } });
    dir = await mkdtemp(join(tmpdir(), "treadmill-health-"));
  });
  afterAll(async () => {
    await supervisor?.stop();
    await c?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("quarantines a host whose image fetches fail three times in a row for unreachable stores", async () => {
    const tags = uniqueTag();
    const host = await c.createHost({ name: "fetch-fails", tags });
    // The image's only location does not resolve: every fetch fails as the infrastructure's.
    const { ref } = await insertImage(c.sql);
    supervisor = createSupervisor({
      config: {
        ...loadSupervisorConfig({ env: {}, argv: [] }),
        name: host.name,
        coordinatorUrl: [c.url],
        hostCredential: host.credential,
        driver: "process",
        workDir: join(dir, "supervisor"),
        imageFetchBudgetMs: 100,
        reconnectMaxMs: 1000,
      },
      logger: silentLogger(),
    });
    await supervisor.start();
    await waitUntil(async () => (await c.sql`select attached_replica from hosts where id = ${host.id}`)[0].attached_replica !== null, "attach");
    const user = await c.createUser();
    const jobs = c.client(JobService, user.token);
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const { job } = await jobs.submitJob({ spec: { image: ref, hosts: { tags } } });
      ids.push(job!.id);
      expect(await jobInState(c.sql, job!.id, "finalized", 60_000)).toMatchObject({ reason: "host_start_failure" });
    }
    const { job: last } = await jobs.getJob({ jobId: ids[2] });
    expect(last?.finalizeReason).toBe(FinalizeReason.HOST_START_FAILURE);
    const [h] = await c.sql`select health, health_reason from hosts where id = ${host.id}`;
    expect(h.health).toBe("quarantined");
    for (const id of ids) expect(h.health_reason).toContain(id);
    const refused = (await jobs.submitJob({ spec: { image: ref, hosts: { tags } } }).catch((e: unknown) => e)) as ConnectError;
    expect(refused.code).toBe(Code.FailedPrecondition);
    // The refusal says why whole: the host's reason names the three jobs and the last failure.
    expect(refused.rawMessage).toContain(`${host.name} quarantined (${h.health_reason})`);
  }, 120_000);
});
