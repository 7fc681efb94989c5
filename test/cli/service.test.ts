// `tml service list` (issue #18 defect 6: "there is no way to list what is
// registered"): bin/tml.js against a coordinator with a store and a log
// server registered, as an admin and as an ordinary user.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { startWorld, tml, type CliWorld } from "./harness.js";

let world: CliWorld;

beforeAll(async () => {
  world = await startWorld();
  await world.startStores();
}, 120_000);

afterAll(async () => {
  await world?.stop();
}, 60_000);

describe("tml service list", () => {
  it("shows an admin every registration with its kind, url and liveness, and refuses a user with exit 4", async () => {
    const config = await world.adminConfig();
    const table = await tml(config, ["service", "list"]);
    expect(table.code).toBe(0);
    expect(table.stdout.split("\n")[0]).toMatch(/^KIND\s+URL\s+SITE\s+STATUS\s+HEARD\s+FREE\s+ID/);
    expect(table.stdout).toMatch(/image-store\s+http:\/\/127\.0\.0\.1:\d+\s+\S+\s+live/);
    expect(table.stdout).toMatch(/log-server\s+http:\/\/127\.0\.0\.1:\d+/);
    const json = JSON.parse((await tml(config, ["service", "list", "--kind", "image-store", "-o", "json"])).stdout) as { kind: string; live: boolean }[];
    expect(json.map((s) => [s.kind, s.live])).toEqual([["SERVICE_KIND_IMAGE_STORE", true]]);
    expect((await tml(config, ["service", "list", "--kind", "teapot"])).code).toBe(2);
    const user = await world.coordinator.createUser({ name: "svc-user" });
    const refused = await tml(world.configFile("user"), ["service", "list"], { env: { TML_SERVER: world.url, TML_TOKEN: user.token } });
    expect(refused.code).toBe(4);
    expect(refused.stderr).toContain("admins and services only");
  });
});
