import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomBytes } from "node:crypto";
import { readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ADMIN_PASSWORD, busyboxRootfs, spawnTml, startWorld, tml, type CliWorld } from "./harness.js";

let world: CliWorld;

beforeAll(async () => {
  world = await startWorld();
  await world.startStores();
}, 120_000);

afterAll(async () => {
  await world?.stop();
}, 60_000);

describe("tml login, whoami and logout", () => {
  it("logs in with the right password, saves the token in a 0600 file and says who it is", async () => {
    const config = world.configFile();
    const login = await tml(config, ["login", world.url, "--user", "admin", "--password-stdin"], { input: `${ADMIN_PASSWORD}\n` });
    expect(login).toMatchObject({ code: 0 });
    expect(login.stdout).toContain("as admin (admin)");
    expect((await stat(config)).mode & 0o777).toBe(0o600);
    const saved = JSON.parse(await readFile(config, "utf8"));
    expect(saved.contexts[saved.current]).toMatchObject({ server: world.url, user: "admin" });
    expect(saved.contexts[saved.current].token).toMatch(/^tmu_/);
    expect(login.stdout + login.stderr).not.toContain(ADMIN_PASSWORD);

    const whoami = await tml(config, ["whoami"]);
    expect(whoami.code).toBe(0);
    expect(whoami.stdout).toMatch(/User:\s+admin/);
    expect(whoami.stdout).toMatch(/Role:\s+admin/);

    const json = await tml(config, ["whoami", "-o", "json"]);
    expect(JSON.parse(json.stdout)).toMatchObject({ server: world.url, user: { name: "admin", role: "ROLE_ADMIN" } });

    const logout = await tml(config, ["logout"]);
    expect(logout.code).toBe(0);
    const after = await tml(config, ["whoami"]);
    expect(after.code).toBe(4);
    expect(after.stderr).toContain("logged out");
    // The token was revoked at the server, not only forgotten.
    const [row] = await world.coordinator.sql<{ revoked: boolean }[]>`
      select revoked_at is not null as revoked from api_tokens where id = ${saved.contexts[saved.current].tokenId}`;
    expect(row.revoked).toBe(true);
  });

  it("refuses a wrong password with one clear sentence and exit code 4, saving nothing", async () => {
    const config = world.configFile();
    const login = await tml(config, ["login", world.url, "--user", "admin", "--password-stdin"], { input: "not the password\n" });
    expect(login.code).toBe(4);
    expect(login.stderr.trim()).toBe(`Error: Wrong user name or password for ${world.url}.`);
    await expect(stat(config)).rejects.toThrow();
  });

  it("says the token expired (exit 4) when the server refuses it", async () => {
    const config = await world.adminConfig();
    const saved = JSON.parse(await readFile(config, "utf8"));
    await world.coordinator.sql`
      update api_tokens set expires_at = now() - interval '1 minute' where id = ${saved.contexts[saved.current].tokenId}`;
    const whoami = await tml(config, ["whoami"]);
    expect(whoami.code).toBe(4);
    expect(whoami.stderr).toContain("your token has expired or was revoked. Run `tml login` again.");
    expect(whoami.stderr).not.toMatch(/at .*\.ts:\d+/);
  });

  it("says the server cannot be reached (exit 3) when it is down", async () => {
    const config = world.configFile();
    // A port nothing listens on: the coordinator's port after it would have stopped is racy, so use port 1.
    // The real bin: under jest's module sandbox Node's own errors are not `instanceof Error`, which hides ECONNREFUSED from Connect.
    const login = await spawnTml(config, ["login", "http://127.0.0.1:1", "--user", "admin", "--password-stdin"], { input: "x\n" }).result;
    expect(login.code).toBe(3);
    expect(login.stderr).toContain("Cannot reach the server at http://127.0.0.1:1 (connection refused)");
    expect(login.stderr.trim().split("\n")).toHaveLength(1);
  });

  it("keeps several named contexts and switches between them", async () => {
    const config = await world.adminConfig();
    const second = await tml(config, ["login", world.url, "--user", "admin", "--password-stdin", "--name", "other"], {
      input: `${ADMIN_PASSWORD}\n`,
    });
    expect(second.code).toBe(0);
    const list = await tml(config, ["context", "list", "-o", "json"]);
    const contexts = JSON.parse(list.stdout) as { name: string; current: boolean }[];
    expect(contexts.map((c) => c.name).sort()).toEqual(["127.0.0.1-" + new URL(world.url).port, "other"].sort());
    expect(contexts.find((c) => c.current)?.name).toBe("other");
    expect((await tml(config, ["context", "use", "nope"])).code).toBe(5);
    expect((await tml(config, ["context", "rm", "other"])).code).toBe(0);
    expect((await tml(config, ["whoami"])).code).toBe(4);
    expect((await tml(config, ["whoami", "--context", "other"])).code).toBe(2);
  });
});

describe("tml command line", () => {
  it("answers bad flags and unknown commands with exit 2 and names them", async () => {
    const config = world.configFile();
    const flag = await tml(config, ["job", "list", "--colour"]);
    expect(flag.code).toBe(2);
    expect(flag.stderr).toContain("Unknown flag --colour for `tml job list`");
    const command = await tml(config, ["imgae", "list"]);
    expect(command.code).toBe(2);
    expect(command.stderr).toContain('did you mean "image"');
    const missing = await tml(config, ["job", "get"]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toContain("needs JOB");
    const value = await tml(config, ["job", "list", "-o", "xml"]);
    expect(value.code).toBe(2);
    expect(value.stderr).toContain("--output must be one of table, json, yaml");
    const badKv = await tml(config, ["job", "run", "x:y", "--param", "oops"]);
    expect(badKv.code).toBe(2);
    expect(badKv.stderr).toContain('--param takes key=value, got "oops"');
  });

  it("prints help with examples, and a completion script", async () => {
    const config = world.configFile();
    const help = await tml(config, ["image", "push", "--help"]);
    expect(help.code).toBe(0);
    expect(help.stdout).toContain("Usage:\n  tml image push PATH [flags]");
    expect(help.stdout).toContain("Examples:");
    const bash = await tml(config, ["completion", "bash"]);
    expect(bash.stdout).toContain("complete -o default -F _tml tml");
    expect(bash.stdout).toContain('"job run") opts="');
  });
});

describe("tml token and host", () => {
  it("creates, lists (table and JSON) and revokes tokens", async () => {
    const config = await world.adminConfig();
    const created = await tml(config, ["token", "create", "--description", "ci runner", "-o", "json"]);
    expect(created.code).toBe(0);
    const { token, info } = JSON.parse(created.stdout);
    expect(token).toMatch(/^tmu_/);
    const table = await tml(config, ["token", "list"]);
    expect(table.stdout.split("\n")[0]).toMatch(/^ID\s+PREFIX\s+SCOPE\s+DESCRIPTION/);
    expect(table.stdout).toContain("ci runner");
    // The new token works, as a script would use it.
    const env = { TML_SERVER: world.url, TML_TOKEN: token };
    expect((await tml(world.configFile(), ["whoami"], { env })).code).toBe(0);
    expect((await tml(config, ["token", "revoke", info.id])).code).toBe(0);
    const listed = JSON.parse((await tml(config, ["token", "list", "--all", "-o", "json"])).stdout) as { id: string; revokeTime?: string }[];
    expect(listed.find((t) => t.id === info.id)?.revokeTime).toBeTruthy();
    expect((await tml(world.configFile(), ["whoami"], { env })).code).toBe(4);
  });

  it("creates a host, printing its credential once and a supervisor command line, then lists it", async () => {
    const config = await world.adminConfig();
    const created = await tml(config, ["host", "create", "bench-1", "--tag", "board=nrf52840dk", "--site", "lab-a"]);
    expect(created.code).toBe(0);
    expect(created.stdout).toMatch(/tmh_\S+/);
    expect(created.stdout).toContain(`treadmill-supervisor --coordinator-url ${world.url} --name bench-1 --driver process`);
    const table = await tml(config, ["host", "list"]);
    expect(table.stdout).toMatch(/bench-1\s+offline, enabled\s+unknown\s+process\s+lab-a\s+0\/1\s+board=nrf52840dk/);
    const yaml = await tml(config, ["host", "get", "bench-1", "-o", "yaml"]);
    expect(yaml.stdout).toContain("name: bench-1");
    expect(yaml.stdout).toContain("site: lab-a");
    const drained = await tml(config, ["host", "drain", "bench-1", "--reason", "maintenance"]);
    expect(drained.code).toBe(0);
    const json = JSON.parse((await tml(config, ["host", "get", "bench-1", "-o", "json"])).stdout);
    expect(json).toMatchObject({ adminState: "HOST_ADMIN_STATE_DRAINING", adminStateReason: "maintenance" });
    const user = await tml(config, ["host", "create", "bench-1"]);
    expect(user.code).toBe(6);
  });
});

describe("tml image", () => {
  it("resumes an interrupted push, then pulls back the same bytes", async () => {
    const config = await world.adminConfig();
    const disk = join(world.dir, "disk.img");
    const bytes = randomBytes(24 * 1024 * 1024);
    await writeFile(disk, bytes);
    // A real process, killed hard once part of the disk has gone up.
    const first = spawnTml(config, ["image", "push", disk, "--name", "vm/disk:1", "--limit-rate", "4M"]);
    await first.waitForLine(/Uploading disk\.img: [1-9][\d.]* MiB/);
    first.child.kill("SIGKILL");
    await first.result;
    const second = await tml(config, ["image", "push", disk, "--name", "vm/disk:1"]);
    expect(second.code).toBe(0);
    expect(second.stderr).toMatch(/Resuming the upload at [\d.]+ MiB of 24 MiB/);
    expect(second.stdout).toContain("Pushed vm/disk:1");

    const list = await tml(config, ["image", "list", "-o", "json"]);
    expect(JSON.parse(list.stdout)).toEqual(
      expect.arrayContaining([expect.objectContaining({ name: "vm/disk", tag: "1", mediaTypes: ["application/vnd.treadmill.disk.raw"] })]),
    );
    const pulled = join(world.dir, "pulled");
    const pull = await tml(config, ["image", "pull", "vm/disk:1", "--dir", pulled]);
    expect(pull.code).toBe(0);
    expect((await readFile(join(pulled, "disk.img"))).equals(bytes)).toBe(true);
    const manifest = JSON.parse(await readFile(join(pulled, "manifest.json"), "utf8"));
    expect(manifest.layers[0].mediaType).toBe("application/vnd.treadmill.disk.raw");
  }, 120_000);
});

describe("tml job", () => {
  let config: string;

  beforeAll(async () => {
    await world.startSupervisor("runner-1");
    config = await world.adminConfig();
    const root = await busyboxRootfs(join(world.dir, "rootfs"), ["sh", "sleep"]);
    for (const [name, entrypoint] of [
      ["example/hello:latest", "echo hello from tml; echo warning on stderr >&2"],
      ["example/fail:latest", "echo about to fail; exit 3"],
      ["example/slow:latest", "sleep 2; echo slow output done"],
      ["example/long:latest", "echo started; sleep 120"],
    ]) {
      const push = await tml(config, ["image", "push", root, "--name", name, "--entrypoint", entrypoint]);
      expect(push.stderr + push.stdout).toContain(`Pushed ${name}`);
    }
  }, 120_000);

  it("runs a job, streams its output live and exits 0 when it succeeds", async () => {
    const run = await tml(config, ["job", "run", "example/hello"]);
    // The process driver runs the workload on a pseudo-terminal (the console channel): CRLF line ends.
    expect(run.stdout.replace(/\r\n/g, "\n")).toBe("hello from tml\n");
    expect(run.stderr).toContain("warning on stderr");
    expect(run.stderr).toMatch(/--> job \S+ succeeded \(exit code 0\)/);
    expect(run.code).toBe(0);
  }, 120_000);

  it("exits 1 with the job's failure, and job get/list/logs/wait show it", async () => {
    const run = await tml(config, ["job", "run", "example/fail"]);
    expect(run.code).toBe(1);
    expect(run.stdout.replace(/\r\n/g, "\n")).toBe("about to fail\n");
    const jobId = /--> job (\S+) failed \(exit code 3\)/.exec(run.stderr)?.[1];
    expect(jobId).toBeDefined();

    const get = JSON.parse((await tml(config, ["job", "get", jobId!, "-o", "json"])).stdout);
    expect(get).toMatchObject({ id: jobId, state: "JOB_STATE_FINALIZED", exitStatus: "EXIT_STATUS_FAILURE", exitCode: 3 });
    const list = await tml(config, ["job", "list"]);
    expect(list.stdout.split("\n")[0]).toMatch(/^ID\s+STATE\s+IMAGE/);
    expect(list.stdout).toMatch(new RegExp(`${jobId}\\s+failed \\(exit code 3\\)\\s+example/fail:latest`));
    const logs = await tml(config, ["job", "logs", jobId!]);
    expect(logs.code).toBe(0);
    expect(logs.stdout.replace(/\r\n/g, "\n")).toBe("about to fail\n");
    const wait = await tml(config, ["job", "wait", jobId!]);
    expect(wait.code).toBe(1);
    const events = await tml(config, ["job", "events", jobId!, "-o", "json"]);
    expect((JSON.parse(events.stdout) as { kind: string }[]).map((e) => e.kind)).toContain("JOB_EVENT_KIND_SUBMITTED");
  }, 120_000);

  it("detaches on request, and logs --follow ends when the job ends", async () => {
    const run = await tml(config, ["job", "run", "example/slow", "--detach"]);
    expect(run.code).toBe(0);
    const jobId = run.stdout.trim();
    const follow = await tml(config, ["job", "logs", jobId, "--follow"]);
    expect(follow.code).toBe(0);
    expect(follow.stdout.replace(/\r\n/g, "\n")).toBe("slow output done\n");
    const get = JSON.parse((await tml(config, ["job", "get", jobId, "-o", "json"])).stdout);
    expect(get.state).toBe("JOB_STATE_FINALIZED");
  }, 120_000);

  it("cancels the job on Ctrl-C without a terminal and exits 130", async () => {
    // The real bin, so that the signal goes the way a shell sends it.
    const run = spawnTml(config, ["job", "run", "example/long"]);
    await run.waitForLine(/^started\r?$/);
    run.child.kill("SIGINT");
    const result = await run.result;
    expect(result.stderr).toMatch(/--> canceling job \S+/);
    expect(result.stderr).toMatch(/--> job \S+ canceled/);
    expect(result.code).toBe(130);
  }, 120_000);

  it("refuses an unknown image with exit 5", async () => {
    const run = await tml(config, ["job", "run", "example/none:latest"]);
    expect(run.code).toBe(5);
    expect(run.stderr).toContain("Error: Not found: image example/none:latest not found.");
  }, 60_000);
});
