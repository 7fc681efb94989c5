import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { create, toJsonString } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { GetJobResponseSchema, JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import {
  AttachRequestSchema,
  type StartJob,
  SupervisorService,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { newSecret } from "../../coordinator/auth.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { connectHttp2, openRawCall } from "../../lib/grpc/client.js";
import { frame } from "../../lib/grpc/wire.js";
import { type JSONWebKeySet, type JWK, TokenVerifier } from "../../lib/tokens.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, attach, insertImage, jobInState, jobRow, uniqueTag, waitUntil } from "../support/jobs.js";

describe("SupervisorService.Attach", () => {
  let c: TestCoordinator;
  let user: { id: string; token: string };
  let image: { ref: string; digest: string };
  const open: ScriptedSupervisor[] = [];
  const track = <T extends ScriptedSupervisor>(s: T) => (open.push(s), s);

  beforeAll(async () => {
    c = await startTestCoordinator({ config: FAST });
    user = await c.createUser();
    image = await insertImage(c.sql, { locations: [{ service: "s1", url: "http://store-b.invalid", site: "" }] });
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  it("welcomes a supervisor with its host record and records it online", async () => {
    const host = await c.createHost({ tags: { board: "x" } });
    const s = track(await attach(c, host));
    expect(s.welcome?.host?.id).toBe(host.id);
    expect(s.welcome?.host?.online).toBe(true);
    expect(s.welcome?.protocolVersion?.major).toBe(1);
    const [row] = await c.sql`select attached_replica, supervisor_version, last_seen_at from hosts where id = ${host.id}`;
    expect(row.attached_replica).toBe(s.welcome?.coordinatorId);
    expect(row.supervisor_version).toBe("scripted");
    await s.close();
    await waitUntil(async () => {
      const [r] = await c.sql`select attached_replica from hosts where id = ${host.id}`;
      return r.attached_replica === null;
    }, "the host to be detached");
  });

  it("sends StartJob with everything the supervisor needs, secrets included, and tokens that verify", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = track(await attach(c, host));
    const jobs = c.client(JobService, user.token);
    const { job } = await jobs.submitJob({
      spec: {
        image: image.ref,
        hosts: { tags: tag },
        parameters: [
          { name: "PLAIN", value: "visible" },
          { name: "PASSWORD", value: "hunter2", secret: true },
        ],
      },
    });
    expect(job!.spec!.parameters.find((p) => p.name === "PASSWORD")?.value).toBe("");
    const start: StartJob = await s.startJob(job!.id);
    expect(start.attempt).toBe(1);
    expect(start.spec!.parameters.find((p) => p.name === "PASSWORD")?.value).toBe("hunter2");
    expect(start.image!.manifestDigest).toBe(image.digest);
    expect(start.image!.locationUrls).toEqual(["http://store-b.invalid"]);
    expect(start.peers.map((p) => p.hostId)).toEqual([host.id]);
    expect(start.hostIndex).toBe(0);
    expect(start.deadline).toBeDefined();
    const verifier = new TokenVerifier({ keys: () => jwks(c) });
    const read = await verifier.verify(start.image!.readToken!.token, { scope: "image:read", digest: image.digest });
    // Minted for the job's owner (a snapshot mounts the job's layers with it), naming the image's holder.
    expect(read.subject).toBe(user.id);
    await verifier.verify(start.logs!.writeToken!.token, { scope: "log:write", job: job!.id });
    await expect(verifier.verify(start.logs!.writeToken!.token, { scope: "log:write", job: image.digest })).rejects.toThrow();

    // The secret is readable by no API, also once the job is finalized.
    const got = await jobs.getJob({ jobId: job!.id });
    expect(toJsonString(GetJobResponseSchema, got)).not.toContain("hunter2");
    await s.report(job!.id, 1, JobState.RUNNING);
    await jobInState(c.sql, job!.id, "running");
    await s.exit(job!.id, 1);
    const done = await jobInState(c.sql, job!.id, "finalized");
    expect(done.reason).toBe("workload_exited");
    expect(done.exit_status).toBe("success");
    const secrets = await c.sql`select * from job_secrets where job_id = ${job!.id}`;
    // Kept after its end, for a re-run (migration 0024); still in no answer.
    expect(secrets.length).toBe(1);
    // Commands sent are audited right after they go out, off the stream's path.
    let audit: { kind: string }[] = [];
    await waitUntil(async () => {
      audit = await c.sql`select kind, details::text from audit_events where job_id = ${job!.id}`;
      return audit.some((a) => a.kind === "command.start_job");
    }, "the StartJob to be audited");
    expect(JSON.stringify(audit)).not.toContain("hunter2");
    await s.close();
  });

  it("stops a StartJob whose supervisor's stream breaks each time it is sent, and ends the attempt as a start failure", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    // A supervisor that dies (its stream breaks) on every StartJob, and attaches again.
    const s: ScriptedSupervisor = track(
      await attach(c, host, { reconnect: true, silent: true, onStartJob: () => void s.drop() }),
    );
    const { job } = await c.client(JobService, user.token).submitJob({
      spec: { image: image.ref, hosts: { tags: tag }, restartPolicy: { maxRestarts: 0 } },
    });
    const row = await jobInState(c.sql, job!.id, "finalized");
    expect(row.reason).toBe("host_start_failure");
    const { job: got } = await c.client(JobService, user.token).getJob({ jobId: job!.id });
    expect(got!.statusMessage).toContain("stream broke 3 times while StartJob was unanswered");
    // Nothing is sent any more: the stream stays up (checked over a few heartbeats).
    const attaches = s.attaches;
    await new Promise((r) => setTimeout(r, 1500));
    expect(s.attaches).toBe(attaches);
  });

  it("refuses a hello of an incompatible protocol major with FailedPrecondition", async () => {
    const host = await c.createHost();
    const s = new ScriptedSupervisor({ urls: [c.url], credential: host.credential, protocolVersion: { major: 2, minor: 0 } });
    const err = await s.connect().catch((e: unknown) => ConnectError.from(e));
    expect((err as ConnectError).code).toBe(Code.FailedPrecondition);
    await s.close();
  });

  it("refuses a hello naming another host, a wrong driver, and a first message that is not a hello", async () => {
    const host = await c.createHost();
    const other = await c.createHost();
    const wrongHost = new ScriptedSupervisor({ urls: [c.url], credential: host.credential, hostId: other.id });
    expect(((await wrongHost.connect().catch((e: unknown) => e)) as ConnectError).code).toBe(Code.PermissionDenied);
    await wrongHost.close();
    const wrongDriver = new ScriptedSupervisor({ urls: [c.url], credential: host.credential, driverKind: DriverKind.QEMU });
    expect(((await wrongDriver.connect().catch((e: unknown) => e)) as ConnectError).code).toBe(Code.InvalidArgument);
    await wrongDriver.close();

    const client = createClient(
      SupervisorService,
      createGrpcTransport({ baseUrl: c.url, interceptors: [bearerInterceptor(() => host.credential)] }),
    );
    async function* notHello() {
      yield create(AttachRequestSchema, { payload: { case: "heartbeat", value: {} } });
    }
    const err = await (async () => {
      for await (const _ of client.attach(notHello())) void _;
    })().catch((e: unknown) => ConnectError.from(e));
    expect((err as ConnectError).code).toBe(Code.InvalidArgument);
    const [row] = await c.sql`select attached_replica from hosts where id = ${host.id}`;
    expect(row.attached_replica).toBeNull();
  });

  it("serves the same stream to a Connect-protocol client (through the adapter) as to gRPC clients", async () => {
    const host = await c.createHost();
    const client = createClient(
      SupervisorService,
      createConnectTransport({ baseUrl: c.url, httpVersion: "2", interceptors: [bearerInterceptor(() => host.credential)] }),
    );
    const abort = new AbortController();
    async function* hello() {
      yield create(AttachRequestSchema, {
        payload: { case: "hello", value: { protocolVersion: { major: 1, minor: 0 }, instanceId: "connect-client", driverKind: DriverKind.PROCESS } },
      });
      await new Promise((r) => abort.signal.addEventListener("abort", r));
    }
    const responses = client.attach(hello(), { signal: abort.signal });
    for await (const r of responses) {
      expect(r.payload.case).toBe("welcome");
      expect(r.payload.case === "welcome" && r.payload.value.host?.id).toBe(host.id);
      break;
    }
    abort.abort();
    await waitUntil(async () => {
      const [r] = await c.sql`select attached_replica from hosts where id = ${host.id}`;
      return r.attached_replica === null;
    }, "the host to be detached");
  });

  it("runs a job with a supervisor on the hand-framed gRPC wire, and detaches it when it drops", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = track(await attach(c, host, { wire: "raw", mode: "exit" }));
    expect(s.welcome?.host?.id).toBe(host.id);
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image: image.ref, hosts: { tags: tag } } });
    await jobInState(c.sql, job!.id, "finalized");
    expect(s.starts.get(job!.id)).toBe(1);
    expect((await jobRow(c.sql, job!.id)).reason).toBe("workload_exited");
    await s.drop();
    expect(s.lastError?.code).toBe(Code.Canceled);
    await waitUntil(async () => {
      const [r] = await c.sql`select attached_replica from hosts where id = ${host.id}`;
      return r.attached_replica === null;
    }, "the host to be detached");
  });

  it("answers malformed bytes on the plain-gRPC stream with InvalidArgument", async () => {
    const host = await c.createHost();
    const session = connectHttp2(c.url);
    try {
      const call = openRawCall(session, `/${SupervisorService.typeName}/Attach`, { authorization: `Bearer ${host.credential}` }, { maxMessageBytes: 1 << 20 });
      call.write(frame(Buffer.from([0xff, 0xff, 0xff])));
      call.end();
      const err = await (async () => {
        for await (const _ of call.messages()) void _;
      })().catch((e: unknown) => ConnectError.from(e));
      expect((err as ConnectError).code).toBe(Code.InvalidArgument);
    } finally {
      session.close();
    }
    const [row] = await c.sql`select attached_replica from hosts where id = ${host.id}`;
    expect(row.attached_replica).toBeNull();
  });

  it("refuses a missing or unknown credential and a user token", async () => {
    const unknown = new ScriptedSupervisor({ urls: [c.url], credential: newSecret("host") });
    expect(((await unknown.connect().catch((e: unknown) => e)) as ConnectError).code).toBe(Code.Unauthenticated);
    await unknown.close();
    const none = new ScriptedSupervisor({ urls: [c.url], credential: "" });
    expect(((await none.connect().catch((e: unknown) => e)) as ConnectError).code).toBe(Code.Unauthenticated);
    await none.close();
    const asUser = new ScriptedSupervisor({ urls: [c.url], credential: user.token });
    expect(((await asUser.connect().catch((e: unknown) => e)) as ConnectError).code).toBe(Code.PermissionDenied);
    await asUser.close();
  });

  it("closes the older of two streams for one host with Aborted", async () => {
    const host = await c.createHost();
    const first = track(await attach(c, host));
    const second = track(await attach(c, host));
    await first.ended();
    expect(first.lastError?.code).toBe(Code.Aborted);
    expect(first.lastError?.rawMessage).toContain("superseded");
    const [row] = await c.sql`select attach_session from hosts where id = ${host.id}`;
    expect(row.attach_session).not.toBeNull();
    // The newer one still works: it gets its jobs.
    const tag = uniqueTag();
    await c.sql`update hosts set tags = ${c.sql.json(tag)} where id = ${host.id}`;
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image: image.ref, hosts: { tags: tag } } });
    await second.startJob(job!.id);
    await second.close();
  });

  it("attaches while another transaction releases a slot of the host, each waiting its turn instead of deadlocking", async () => {
    // The job system's lock order (coordinator/jobs/transitions.ts): job
    // rows, job_hosts rows, host rows. A release holds its job row and then
    // counts the freed slot on the host row; an attach must not hold the
    // host row while it waits for the job row.
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const first = track(await attach(c, host));
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image: image.ref, hosts: { tags: tag } } });
    await first.startJob(job!.id);
    await first.report(job!.id, 1, JobState.RUNNING);
    const release = await c.sql.reserve();
    try {
      await release`begin`;
      await release`select 1 from jobs where id = ${job!.id} for update`;
      const second = track(new ScriptedSupervisor({ urls: [c.url], credential: host.credential, hostId: host.id, mode: "manual" }));
      const welcomed = second.connect();
      await waitUntil(async () => {
        const rows = await c.sql`select 1 from pg_stat_activity where wait_event_type = 'Lock' and query like '%for no key update of j%'`;
        return rows.length > 0;
      }, "the attach to wait for the job's row");
      const deadlocks = async () => {
        await c.sql`select pg_stat_clear_snapshot()`;
        const [{ n }] = await c.sql`select deadlocks::int as n from pg_stat_database where datname = current_database()`;
        return n as number;
      };
      const before = await deadlocks();
      await release`update job_hosts set released_at = now() where job_id = ${job!.id}`;
      await release`commit`;
      expect((await welcomed).host?.id).toBe(host.id);
      // PostgreSQL breaks a deadlock after deadlock_timeout by failing one side, and counts it.
      await c.sql`select pg_stat_force_next_flush()`;
      expect(await deadlocks()).toBe(before);
    } finally {
      release.release();
    }
    const [row] = await c.sql`select held_slots from hosts where id = ${host.id}`;
    expect(row.held_slots).toBe(0);
  });

  it("ends a stream that stays silent for three heartbeat intervals with DeadlineExceeded", async () => {
    const host = await c.createHost();
    const s = track(await attach(c, host, { heartbeatMs: 3_600_000 }));
    await s.ended();
    expect(s.lastError?.code).toBe(Code.DeadlineExceeded);
  });

  it("ignores a report of a stale attempt and a repeated terminal report", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = track(await attach(c, host));
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image: image.ref, hosts: { tags: tag } } });
    await s.startJob(job!.id);
    await s.report(job!.id, 7, JobState.RUNNING);
    expect((await jobRow(c.sql, job!.id)).state).toBe("assigned");
    await s.report(job!.id, 1, JobState.RUNNING);
    await s.exit(job!.id, 1, 3);
    const done = await jobInState(c.sql, job!.id, "finalized");
    expect(done).toMatchObject({ reason: "workload_exited", exit_status: "failure", exit_code: 3 });
    // The same end again (a retained report re-sent): acknowledged, nothing changes.
    s.held.set(`${job!.id}/1`, { jobId: job!.id, attempt: 1, state: JobState.TERMINATING, stage: 0 });
    const ack = await s.exit(job!.id, 1, 0);
    expect(ack.payload.case).toBe("ackReport");
    expect(await jobRow(c.sql, job!.id)).toMatchObject({ reason: "workload_exited", exit_status: "failure", exit_code: 3 });
    await s.close();
  });
});

async function jwks(c: TestCoordinator): Promise<JSONWebKeySet> {
  const rows = await c.sql<{ public_jwk: JWK }[]>`select public_jwk from signing_keys`;
  return { keys: rows.map((r) => r.public_jwk) };
}
