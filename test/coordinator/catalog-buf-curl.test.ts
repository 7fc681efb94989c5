/**
 * The README's commands: `buf curl` (through gRPC server reflection) logs in
 * and creates a host, exactly as docs/coordinator-catalog.md shows.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";

const BUF = fileURLToPath(new URL("../../node_modules/.bin/buf", import.meta.url));
const run = promisify(execFile);

async function bufCurl(args: string[]): Promise<Record<string, unknown>> {
  const { stdout } = await run(BUF, ["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...args], { timeout: 60_000 });
  return JSON.parse(stdout) as Record<string, unknown>;
}

describe("the coordinator with buf curl", () => {
  let c: TestCoordinator;
  beforeAll(async () => {
    c = await startTestCoordinator({ config: { adminName: "admin", adminPassword: "change-me-please" } });
  });
  afterAll(async () => {
    await c?.stop();
  });

  it("logs in and creates a host through reflection", async () => {
    const login = await bufCurl([
      "-d",
      '{"name": "admin", "password": "change-me-please", "description": "buf curl"}',
      `${c.url}/treadmill.coordinator.v1.AuthService/Login`,
    ]);
    const token = login.token as string;
    expect(token).toMatch(/^tmu_/);
    const created = await bufCurl([
      "-H",
      `Authorization: Bearer ${token}`,
      "-d",
      '{"name": "rpi-1", "tags": {"board": "rpi4"}, "driverKind": "DRIVER_KIND_PROCESS", "mediaTypes": ["application/vnd.treadmill.rootfs.tar+gzip"]}',
      `${c.url}/treadmill.coordinator.v1.HostService/CreateHost`,
    ]);
    expect(created.credential).toMatch(/^tmh_/);
    expect(created.host).toMatchObject({ name: "rpi-1", tags: { board: "rpi4" }, driverKind: "DRIVER_KIND_PROCESS", capacity: 1 });
    // The credential works for the supervisor.
    const who = await c.client(AuthService, created.credential as string).whoAmI({});
    expect(who.hostId).toBe((created.host as { id: string }).id);
  });
});
