/**
 * Jobs and the log servers they write to (issue #18 defects 3 and 6): with no
 * live log server the scheduler assigns nothing and the job's timeline says
 * why; a log server that registers lets it run. A server whose registration
 * the coordinator refuses reports it: NOT_SERVING, never SERVING in silence.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Health, HealthCheckResponse_ServingStatus as ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { JobEventKind } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import type { ServingComponent } from "../../lib/component.js";
import { REGISTRATION_HEALTH } from "../../lib/coordinator-client.js";
import { loadLogServerConfig } from "../../stores/log/config.js";
import { createLogServer } from "../../stores/log/log-server.js";
import { silentLogger } from "../../lib/logger.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { attach, FAST, insertImage, jobInState, uniqueTag, waitUntil } from "../support/jobs.js";
import { tempDir } from "../stores/log/helpers.js";

describe("log servers and the jobs that need them", () => {
  let c: TestCoordinator;
  let credential: string;
  let dir: { path: string; remove(): Promise<void> };
  const cleanup: (() => Promise<unknown>)[] = [];

  beforeAll(async () => {
    c = await startTestCoordinator({ config: { ...FAST, serviceHeartbeatMs: 500 }, logServer: false });
    const admin = await c.createUser({ role: "admin" });
    credential = (await c.client(AuthService, admin.token).createToken({ scope: TokenScope.SERVICE, description: "logs" })).token;
    dir = await tempDir();
  });
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn().catch(() => undefined);
    await c?.stop();
    await dir?.remove();
  });

  async function logServer(site: string): Promise<ServingComponent> {
    const server = createLogServer({
      config: {
        ...loadLogServerConfig({ env: {}, argv: [] }),
        port: 0,
        dataDir: `${dir.path}/${site || "any"}`,
        coordinatorUrl: [c.url],
        serviceCredential: credential,
        site,
        graceMs: 500,
      },
      logger: silentLogger(),
    });
    await server.start();
    cleanup.push(() => server.stop());
    return server;
  }

  const health = (server: ServingComponent) => createClient(Health, createGrpcTransport({ baseUrl: server.address().url }));

  it("keeps a job queued while no log server is live, says why on its timeline, and runs it once one registers", async () => {
    const user = await c.createUser();
    const image = await insertImage(c.sql);
    const tags = uniqueTag();
    const host = await c.createHost({ tags });
    const supervisor = await attach(c, host, { mode: "exit" });
    cleanup.push(() => supervisor.close());
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image: image.ref, hosts: { tags } } });
    const jobs = c.client(JobService, user.token);
    const waiting = await waitUntil(async () => {
      const { job: got } = await jobs.getJob({ jobId: job!.id });
      return got!.timeline.find((e) => e.kind === JobEventKind.WAITING);
    }, "a waiting event");
    expect(waiting.message).toBe("waiting for a log server: none is registered and live");
    expect((await jobs.getJob({ jobId: job!.id })).job!.statusMessage).toBe(waiting.message);
    expect(supervisor.starts.size).toBe(0);

    await logServer("");
    const row = await jobInState(c.sql, job!.id, "finalized");
    expect(row.reason).toBe("workload_exited");
    const [{ status_message }] = await c.sql`select status_message from jobs where id = ${job!.id}`;
    expect(status_message).not.toBe(waiting.message);
  });

  it("reports NOT_SERVING when the coordinator refuses its registration, and SERVING with its registration live", async () => {
    const refused = await logServer("Not A Site");
    await waitUntil(async () => (await health(refused).check({})).status === ServingStatus.NOT_SERVING, "the refused server to say NOT_SERVING");
    expect((await health(refused).check({ service: REGISTRATION_HEALTH })).status).toBe(ServingStatus.NOT_SERVING);

    const accepted = await logServer("lab-a");
    await waitUntil(
      async () => (await health(accepted).check({ service: REGISTRATION_HEALTH })).status === ServingStatus.SERVING,
      "the accepted server's registration to say SERVING",
    );
    expect((await health(accepted).check({})).status).toBe(ServingStatus.SERVING);
  });
});
