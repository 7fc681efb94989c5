/**
 * `tml` with a coordinator of several replicas (issue #20 item 4): `tml
 * login A,B` keeps the list in the context, `whoami` and `context list` show
 * it, and every command goes on to the next replica when the first cannot be
 * reached; `TML_SERVER=A,B` does the same, and a context file written before
 * the list (one `server`) still reads.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { once } from "node:events";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { tml } from "./harness.js";

const PASSWORD = "a-long-admin-password";
let dir: string;
let coordinator: TestCoordinator;
/** A replica that is down: nothing listens at its port. */
let dead: string;

/** A loopback URL whose port refuses connections. */
async function refusedUrl(): Promise<string> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  server.close();
  await once(server, "close");
  return `http://127.0.0.1:${port}`;
}

interface SavedFile {
  current: string;
  contexts: Record<string, { server: string; servers?: string[]; user: string; token?: string }>;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "tml-replicas-"));
  coordinator = await startTestCoordinator({ config: { adminPassword: PASSWORD }, logServer: false });
  dead = await refusedUrl();
});

afterAll(async () => {
  await coordinator?.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("tml with several coordinator replicas", () => {
  it("logs in past a replica that is down, keeps every replica in the context and shows them", async () => {
    const config = join(dir, "login.json");
    const replicas = `${dead},${coordinator.url}`;
    const login = await tml(config, ["login", replicas, "--user", "admin", "--password-stdin"], { input: `${PASSWORD}\n` });
    expect({ code: login.code, stderr: login.stderr }).toEqual({ code: 0, stderr: "" });
    expect(login.stdout).toContain(`Logged in to ${replicas} as admin`);

    const saved = JSON.parse(await readFile(config, "utf8")) as SavedFile;
    expect(saved.contexts[saved.current]).toMatchObject({ server: dead, servers: [dead, coordinator.url], user: "admin" });

    const whoami = await tml(config, ["whoami"]);
    expect(whoami.code).toBe(0);
    expect(whoami.stdout).toContain(`Servers: ${dead}, ${coordinator.url}`);
    const json = JSON.parse((await tml(config, ["whoami", "-o", "json"])).stdout) as { server: string; servers: string[] };
    expect(json).toMatchObject({ server: replicas, servers: [dead, coordinator.url] });
    const contexts = await tml(config, ["context", "list"]);
    expect(contexts.stdout).toContain(replicas);

    const jobs = await tml(config, ["job", "list"]);
    expect({ code: jobs.code, stderr: jobs.stderr }).toEqual({ code: 0, stderr: "No jobs.\n" });
    // --verbose says which replica it passed over.
    const verbose = await tml(config, ["job", "list", "--verbose"]);
    expect(verbose.code).toBe(0);
    expect(verbose.stderr).toContain(`${dead} cannot be reached`);
    expect(verbose.stderr).toContain(`trying ${coordinator.url}`);
  });

  it("reads TML_SERVER as a list of replicas", async () => {
    const saved = JSON.parse(await readFile(join(dir, "login.json"), "utf8")) as SavedFile;
    const token = saved.contexts[saved.current].token!;
    const env = { TML_SERVER: `${dead},${coordinator.url}`, TML_TOKEN: token };
    const whoami = await tml(join(dir, "empty.json"), ["whoami", "-o", "json"], { env });
    expect(whoami.code).toBe(0);
    expect(JSON.parse(whoami.stdout)).toMatchObject({ servers: [dead, coordinator.url], user: { name: "admin" } });
    // Without a live replica it fails as an unreachable server does.
    const down = await tml(join(dir, "empty.json"), ["job", "list"], { env: { ...env, TML_SERVER: dead } });
    expect(down.code).not.toBe(0);
  });

  it("still reads a context saved with one server and no list", async () => {
    const saved = JSON.parse(await readFile(join(dir, "login.json"), "utf8")) as SavedFile;
    const token = saved.contexts[saved.current].token!;
    const config = join(dir, "old.json");
    await writeFile(config, JSON.stringify({ current: "old", contexts: { old: { server: coordinator.url, user: "admin", token } } }), { mode: 0o600 });
    const whoami = await tml(config, ["whoami", "-o", "json"]);
    expect(whoami.code).toBe(0);
    expect(JSON.parse(whoami.stdout)).toMatchObject({ context: "old", server: coordinator.url, servers: [coordinator.url] });
    const contexts = JSON.parse((await tml(config, ["context", "list", "-o", "json"])).stdout) as { server: string; servers: string[] }[];
    expect(contexts).toMatchObject([{ server: coordinator.url, servers: [coordinator.url] }]);
  });
});
