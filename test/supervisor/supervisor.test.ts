import { describe, expect, it } from "@jest/globals";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import {
  type AttachRequest,
  type AttachResponse,
  AttachResponseSchema,
  SupervisorService,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { HostControlAction } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { silentLogger } from "../../lib/logger.js";
import { loadSupervisorConfig } from "../../supervisor/config.js";
import { createSupervisor, type Supervisor, type SupervisorState } from "../../supervisor/supervisor.js";
import { chmod, mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** The process driver's job slots run as other uids, which must reach the work directory. */
async function traversableTempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "treadmill-sup-"));
  await chmod(dir, 0o755);
  return dir;
}

type AttachImpl = (requests: AsyncIterable<AttachRequest>) => AsyncIterable<AttachResponse>;

async function supervisorAgainst(attach: AttachImpl, credential = "host-secret"): Promise<Supervisor> {
  const transport = createRouterTransport(({ service }) => {
    service(SupervisorService, { attach });
  });
  const config = {
    ...loadSupervisorConfig({ env: {}, argv: [] }),
    name: "test-host",
    hostCredential: credential,
    workDir: await traversableTempDir(),
    reconnectMaxMs: 20,
  };
  return createSupervisor({ config, logger: silentLogger(), transport });
}

/** Polls `state()` until it is `wanted`, or fails after a deadline. */
async function stateBecomes(supervisor: Supervisor, wanted: SupervisorState, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  while (supervisor.state() !== wanted) {
    if (Date.now() > deadline) throw new Error(`state stayed ${supervisor.state()}, wanted ${wanted}`);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

describe("the supervisor core", () => {
  it("opens with a hello that holds its full state and refuses a malformed start_job in its ack", async () => {
    const hellos: AttachRequest[] = [];
    const acks: AttachRequest[] = [];
    let acked!: () => void;
    const ackSeen = new Promise<void>((resolve) => (acked = resolve));
    const supervisor = await supervisorAgainst(async function* (requests) {
      const iterator = requests[Symbol.asyncIterator]();
      hellos.push((await iterator.next()).value);
      yield create(AttachResponseSchema, { payload: { case: "welcome", value: { host: { id: "h1" } } } });
      yield create(AttachResponseSchema, {
        payload: { case: "startJob", value: { requestId: "r1", jobId: "j1", attempt: 1 } },
      });
      acks.push((await iterator.next()).value);
      acked();
      // Hold the stream open, as a coordinator does, until the supervisor leaves.
      await iterator.next();
    });
    await supervisor.start();
    await ackSeen;
    expect(supervisor.state()).toBe("attached");
    const hello = hellos[0].payload;
    expect(hello.case).toBe("hello");
    if (hello.case === "hello") {
      expect(hello.value.protocolVersion).toMatchObject({ major: 1, minor: 0 });
      expect(hello.value.driverKind).toBe(DriverKind.PROCESS);
      expect(hello.value.jobs).toEqual([]);
    }
    expect(acks[0].payload).toMatchObject({
      case: "commandAck",
      value: { requestId: "r1", ok: false, errorCode: Code.InvalidArgument },
    });
    await supervisor.stop();
    expect(supervisor.state()).toBe("stopped");
  });

  it("refuses a start_job it cannot carry out (no log server) on the stream, and keeps the stream", async () => {
    const acks: AttachRequest[] = [];
    let attaches = 0;
    let acked!: () => void;
    const ackSeen = new Promise<void>((resolve) => (acked = resolve));
    const supervisor = await supervisorAgainst(async function* (requests) {
      attaches++;
      const iterator = requests[Symbol.asyncIterator]();
      await iterator.next();
      yield create(AttachResponseSchema, { payload: { case: "welcome", value: { host: { id: "h1" } } } });
      yield create(AttachResponseSchema, {
        payload: {
          case: "startJob",
          value: {
            requestId: "r1",
            jobId: "01a24e35-a6f1-7f2e-b0ce-591400baab7d",
            attempt: 1,
            spec: { image: "example/hello:latest" },
            image: { manifestDigest: `sha256:${"a".repeat(64)}` },
            logs: { serverUrls: [] },
          },
        },
      });
      for (let next = await iterator.next(); !next.done; next = await iterator.next()) {
        if (next.value.payload.case !== "commandAck") continue;
        acks.push(next.value);
        acked();
      }
    });
    await supervisor.start();
    await ackSeen;
    expect(acks[0].payload).toMatchObject({
      case: "commandAck",
      value: { requestId: "r1", ok: false, errorCode: Code.FailedPrecondition },
    });
    expect((acks[0].payload.value as { errorMessage: string }).errorMessage).toContain("no log server");
    expect(supervisor.state()).toBe("attached");
    expect(supervisor.jobs()).toEqual([]);
    expect(attaches).toBe(1);
    await supervisor.stop();
  });

  it("answers a control_host of an attempt it does not hold FAILED_PRECONDITION, again for the same control under a new request id", async () => {
    const results: AttachRequest[] = [];
    let answered!: () => void;
    const twoAnswers = new Promise<void>((resolve) => (answered = resolve));
    const control = (requestId: string, action: HostControlAction) =>
      create(AttachResponseSchema, {
        payload: { case: "controlHost", value: { requestId, controlId: "01a24e35-a6f1-7f2e-b0ce-591400baab7e", jobId: "j1", attempt: 1, action } },
      });
    const supervisor = await supervisorAgainst(async function* (requests) {
      const iterator = requests[Symbol.asyncIterator]();
      await iterator.next();
      yield create(AttachResponseSchema, { payload: { case: "welcome", value: { host: { id: "h1" } } } });
      yield control("c1", HostControlAction.RESET);
      yield control("c2", HostControlAction.RESET);
      for (let next = await iterator.next(); !next.done; next = await iterator.next()) {
        if (next.value.payload.case !== "hostControlResult") continue;
        results.push(next.value);
        if (results.length === 2) answered();
      }
    });
    await supervisor.start();
    await twoAnswers;
    expect(results.map((r) => r.payload.value)).toEqual([
      expect.objectContaining({ requestId: "c1", ok: false, errorCode: Code.FailedPrecondition, errorMessage: "job j1 attempt 1 does not run on this host" }),
      expect.objectContaining({ requestId: "c2", ok: false, errorCode: Code.FailedPrecondition, errorMessage: "job j1 attempt 1 does not run on this host" }),
    ]);
    expect(supervisor.state()).toBe("attached");
    await supervisor.stop();
  });

  it("keeps retrying while the coordinator cannot take it", async () => {
    let attempts = 0;
    let thirdAttempt!: () => void;
    const third = new Promise<void>((resolve) => (thirdAttempt = resolve));
    // eslint-disable-next-line require-yield
    const supervisor = await supervisorAgainst(async function* () {
      if (++attempts === 3) thirdAttempt();
      throw new ConnectError("coordinator restarting", Code.Unavailable);
    });
    await supervisor.start();
    await third;
    expect(supervisor.state()).not.toBe("refused");
    await supervisor.stop();
    expect(supervisor.state()).toBe("stopped");
  });

  it("stops for good when the coordinator refuses its credential", async () => {
    let attempts = 0;
    // eslint-disable-next-line require-yield
    const supervisor = await supervisorAgainst(async function* () {
      attempts++;
      throw new ConnectError("unknown host credential", Code.Unauthenticated);
    });
    await supervisor.start();
    await stateBecomes(supervisor, "refused");
    expect(attempts).toBe(1);
    await supervisor.stop();
    expect(supervisor.state()).toBe("refused");
  });
});
