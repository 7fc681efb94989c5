// SupervisorService.Attach answers the same over Connect, gRPC-Web and the
// raw gRPC path (coordinator/jobs/attach-grpc.ts): answers, errors (the text
// check included), auth refusals.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { SupervisorService, type AttachRequestSchema } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { FAST } from "../support/jobs.js";
import { bearer, collect, refusals, sameOnAllPaths, stream, threePaths, type PathName, type Clients, type Paths } from "./paths.js";

type AttachInit = MessageInitShape<typeof AttachRequestSchema>;

const hello = (fields: { major?: number; hostId?: string; supervisorVersion?: string } = {}): AttachInit => ({
  payload: {
    case: "hello",
    value: {
      protocolVersion: { major: fields.major ?? 1, minor: 0 },
      hostId: fields.hostId ?? "",
      supervisorVersion: fields.supervisorVersion ?? "conformance",
      instanceId: "instance-1",
      driverKind: DriverKind.PROCESS,
    },
  },
});

describe("SupervisorService.Attach on every path", () => {
  let c: TestCoordinator;
  let paths: Paths;
  let clients: Clients<typeof SupervisorService>;
  let hosts: Record<PathName, { id: string; credential: string }>;

  beforeAll(async () => {
    c = await startTestCoordinator({ config: FAST });
    paths = threePaths(c.url);
    clients = paths.clients(SupervisorService);
    hosts = { connect: await c.createHost(), "grpc-web": await c.createHost(), grpc: await c.createHost() };
  });

  afterAll(async () => {
    paths?.close();
    await c?.stop();
  });

  it("welcomes each path's supervisor alike, with its host record", async () => {
    const welcome = await sameOnAllPaths(async (path) => {
      // The supervisor half-closes at once: the coordinator ends the stream after its welcome.
      const [first] = await collect(clients[path].attach(stream(hello()), bearer(hosts[path].credential)));
      if (first.payload.case !== "welcome") return first.payload.case;
      const { protocolVersion, host } = first.payload.value;
      return { protocolVersion: { ...protocolVersion }, ownHost: host?.id === hosts[path].id, online: host?.online };
    });
    expect(welcome).toMatchObject({ answer: { protocolVersion: { major: 1 }, ownHost: true, online: true } });
  });

  it("fails bad Attach streams with the same codes and messages, nul characters included", async () => {
    const as = (path: PathName) => bearer(hosts[path].credential);
    expect(await sameOnAllPaths((path) => collect(clients[path].attach(stream<AttachInit>({ payload: { case: "heartbeat", value: {} } }), as(path))))).toEqual({
      code: "InvalidArgument",
      message: "the first message must be a hello",
    });
    expect(await sameOnAllPaths((path) => collect(clients[path].attach(stream(hello({ major: 2 })), as(path))))).toMatchObject({
      code: "FailedPrecondition",
    });
    expect(await sameOnAllPaths((path) => collect(clients[path].attach(stream(hello({ supervisorVersion: "v\u00001" })), as(path))))).toEqual({
      code: "InvalidArgument",
      message: "hello.supervisor_version must not contain a nul character",
    });
    expect(await sameOnAllPaths((path) => collect(clients[path].attach(stream(hello({ hostId: hosts.grpc.id === hosts[path].id ? hosts.connect.id : hosts.grpc.id })), as(path))))).toEqual({
      code: "PermissionDenied",
      message: "hello.host_id is not the host of this credential",
    });
  });

  it("refuses callers without a credential, with a malformed one, or with a user's token, alike", async () => {
    const user = await c.createUser();
    for (const { name, options } of refusals(user.token)) {
      const attached = await sameOnAllPaths((path) => collect(clients[path].attach(stream(hello()), options)));
      const expected = name === "wrong kind" ? "PermissionDenied" : "Unauthenticated";
      expect([name, attached]).toEqual([name, expect.objectContaining({ code: expected })]);
    }
  });
});
