/**
 * docs/cli.md as it is written: its command blocks run against a coordinator
 * with an image store, a log server and a process supervisor, with the
 * guide's example addresses replaced by the test's; then the commands its
 * tables show that no other test runs (users, hosts, images, tokens, job
 * flags).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { execFile } from "node:child_process";
import { mkdir, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { contextNameFor } from "../../cli/config.js";
import { docBlock, docBlocks, runBash, type DocBlock } from "../support/doc-blocks.js";
import { ADMIN_PASSWORD, busyboxRootfs, startWorld, tml, type CliWorld } from "./harness.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GUIDE = join(REPO, "docs", "cli.md");
const CI_PASSWORD = "the ci user's password";
const run = promisify(execFile);

let world: CliWorld;
let blocks: DocBlock[];
let work: string;
let config: string;
let bins: string;

/** Runs the guide's block `name` in the work directory, the guide's addresses replaced by the world's. */
function guide(name: string, input = "") {
  const text = docBlock(blocks, GUIDE, "guide", name)
    .text.replaceAll("http://127.0.0.1:7700", world.url)
    .replaceAll("https://treadmill.lab.example", world.url);
  const env = { ...process.env, PATH: `${bins}:${process.env.PATH}`, TML_CONFIG: config, NO_COLOR: "1", TREADMILL_PASSWORD: CI_PASSWORD };
  return runBash(`set -eo pipefail\n${text}`, { cwd: work, env, input });
}

/** `tml args...` as the admin. */
const admin = (args: string[], input?: string) => tml(config, args, { input });

beforeAll(async () => {
  blocks = await docBlocks(GUIDE);
  world = await startWorld();
  await world.startStores();
  await world.startSupervisor("guide-1", { arch: "x86_64" });
  config = await world.adminConfig("guide");
  bins = join(world.dir, "bin");
  await mkdir(bins);
  await symlink(join(REPO, "bin", "tml.js"), join(bins, "tml"));
  // The files the guide's commands name, in the directory they run in.
  work = join(world.dir, "work");
  const rootfs = await busyboxRootfs(join(work, "rootfs"), ["sh", "echo", "sleep", "cat"]);
  await run("tar", ["-czf", join(work, "app.tar.gz"), "-C", rootfs, "."]);
  await run("qemu-img", ["create", "-q", "-f", "qcow2", join(work, "debian.qcow2"), "16M"]);
  await writeFile(join(work, "zephyr.bin"), Buffer.alloc(4096, 0x5a));
}, 180_000);

afterAll(async () => {
  await world?.stop();
}, 60_000);

describe("docs/cli.md's command blocks", () => {
  it("quick start: logs in (the password from standard input), pushes an image, runs a job and lists it", async () => {
    const result = await guide("quick-start", `${ADMIN_PASSWORD}\n`);
    expect(result.stdout + result.stderr).toContain("Pushed example/hello:latest");
    expect(result.stdout.replace(/\r\n/g, "\n")).toContain("hello\n");
    expect(result.stderr).toMatch(/--> job \S+ succeeded \(exit code 0\)/);
    expect(result.stdout).toMatch(/^ID\s+STATE\s+IMAGE/m);
    expect(result.code).toBe(0);
  }, 120_000);

  it("pushes a rootfs, a tar.gz with a JSON entrypoint, a public qcow2 disk and firmware", async () => {
    const result = await guide("images");
    expect(result.code).toBe(0);
    for (const name of ["example/hello:latest", "example/app:v2", "vm/debian:12", "zephyr/blinky:v1"]) {
      expect(result.stdout + result.stderr).toContain(`Pushed ${name}`);
    }
    const debian = JSON.parse((await admin(["image", "inspect", "vm/debian:12", "-o", "json"])).stdout) as Record<string, unknown>;
    expect(JSON.stringify(debian)).toContain("application/vnd.treadmill.disk.qcow2");
    expect(JSON.stringify(debian)).toContain("VISIBILITY_PUBLIC");
  }, 120_000);

  it("logs in a CI user with --password-stdin", async () => {
    const created = await admin(["user", "create", "ci", "--password-stdin"], `${CI_PASSWORD}\n`);
    expect(created.code).toBe(0);
    const result = await guide("login-ci");
    expect(result.stdout).toContain("as ci (user)");
    expect(result.code).toBe(0);
    // Back to the admin for the next tests.
    expect((await admin(["login", world.url, "--user", "admin", "--password-stdin"], `${ADMIN_PASSWORD}\n`)).code).toBe(0);
  }, 60_000);

  it("creates a board host, printing its credential once and its supervisor's command line", async () => {
    const result = await guide("host-create");
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/tmh_\S+/);
    expect(result.stdout).toContain("treadmill-supervisor --coordinator-url");
    expect(result.stdout).toContain("--name lab-a-nrf-1 --driver board");
  }, 60_000);

  it("shows a host's statistics and lists hosts by health", async () => {
    const result = await guide("host-stats");
    expect(result).toMatchObject({ code: 0, stderr: "" });
    expect(result.stdout).toMatch(/^Health:\s+unknown$/m);
    expect(result.stdout).toMatch(/^\s+LAST 24H\s+LAST 7D$/m);
    expect(result.stdout).toMatch(/^Jobs run\s+0\s+0$/m);
    // Its supervisor never attached.
    expect(result.stdout).toMatch(/^Online\s+0\.0%\s+0\.0%$/m);
    expect(result.stdout).toContain("No change of its health in the last 7 days.");
    expect(result.stdout).toMatch(/^Time unknown\s+\S+\s+\S+$/m);
    expect(result.stdout).toMatch(/^lab-a-nrf-1\s.*\bunknown\b/m);
  }, 60_000);

  it("loads the bash completion", async () => {
    const result = await guide("completion");
    expect(result).toMatchObject({ code: 0, stderr: "" });
    const zsh = await admin(["completion", "zsh"]);
    expect(zsh.stdout).toContain("autoload -U +X bashcompinit && bashcompinit");
  }, 60_000);
});

describe("the commands docs/cli.md's tables show", () => {
  /** Runs each command as the admin, expecting exit 0; returns their outputs. */
  async function ok(...commands: { args: string[]; input?: string }[]): Promise<string[]> {
    const outputs: string[] = [];
    for (const { args, input } of commands) {
      const result = await admin(args, input);
      expect({ args, code: result.code, stderr: result.code === 0 ? "" : result.stderr }).toEqual({ args, code: 0, stderr: "" });
      outputs.push(result.stdout + result.stderr);
    }
    return outputs;
  }

  it("manages users: create, list, get, update role and state, passwd, rm", async () => {
    const [, list, get, , disabled, , passwd, rm] = await ok(
      { args: ["user", "create", "alice", "--role", "admin", "--password-stdin"], input: "alice's first password\n" },
      { args: ["user", "list"] },
      { args: ["user", "get", "alice", "-o", "json"] },
      { args: ["user", "update", "alice", "--role", "user"] },
      { args: ["user", "update", "alice", "--disable", "-o", "json"] },
      { args: ["user", "update", "alice", "--enable"] },
      { args: ["user", "passwd", "alice", "--password-stdin"], input: "alice's second password\n" },
      { args: ["user", "rm", "alice"] },
    );
    expect(list).toMatch(/^alice\s/m);
    expect(JSON.parse(get)).toMatchObject({ name: "alice", role: "ROLE_ADMIN" });
    expect(disabled).toContain("true");
    expect(passwd).toContain("Password of alice changed.");
    expect(rm).toContain("User alice deleted.");
  }, 120_000);

  it("manages hosts: list by tag and site, get, update tags, capacity and credential, drain, disable, enable, rm", async () => {
    await ok({ args: ["host", "create", "spare-1", "--driver", "process", "--site", "lab-b"] });
    const [list, get, rotated, , drained, disabled, enabled, removed] = await ok(
      { args: ["host", "list", "--site", "lab-b"] },
      { args: ["host", "get", "spare-1", "-o", "json"] },
      { args: ["host", "update", "spare-1", "--tag", "board=none", "--capacity", "2", "--rotate-credential"] },
      { args: ["host", "list", "--tag", "board=none", "--online"] },
      { args: ["host", "drain", "spare-1", "--reason", "moving racks", "-o", "json"] },
      { args: ["host", "disable", "spare-1", "-o", "json"] },
      { args: ["host", "enable", "spare-1", "-o", "json"] },
      { args: ["host", "rm", "spare-1"] },
    );
    expect(list).toMatch(/^spare-1\s/m);
    expect(JSON.parse(get)).toMatchObject({ name: "spare-1", site: "lab-b", capacity: 1, health: "HOST_HEALTH_UNKNOWN" });
    expect(rotated).toMatch(/tmh_\S+/);
    expect(JSON.parse(drained)).toMatchObject({ adminState: "HOST_ADMIN_STATE_DRAINING", adminStateReason: "moving racks" });
    expect(JSON.parse(disabled)).toMatchObject({ adminState: "HOST_ADMIN_STATE_DISABLED" });
    expect(JSON.parse(enabled)).toMatchObject({ adminState: "HOST_ADMIN_STATE_ENABLED", tags: { board: "none" }, capacity: 2 });
    expect(removed).toContain("spare-1");
  }, 120_000);

  it("manages images: list by prefix and mine, inspect, tag, pull, rm", async () => {
    const dir = join(world.dir, "pulled");
    const [list, mine, inspect, , pulled, , after] = await ok(
      { args: ["image", "list", "--prefix", "example/"] },
      { args: ["image", "list", "--mine"] },
      { args: ["image", "inspect", "example/app:v2"] },
      { args: ["image", "tag", "example/app:v2", "example/app:old"] },
      { args: ["image", "pull", "example/app:old", "--dir", dir] },
      { args: ["image", "rm", "example/app:old"] },
      { args: ["image", "list", "--prefix", "example/app"] },
    );
    expect(list).toContain("example/app");
    expect(mine).toContain("vm/debian");
    expect(inspect).toMatch(/sha256:[0-9a-f]{64}/);
    expect(pulled).toContain(`Pulled example/app:old into ${dir}`);
    expect(after).not.toContain(":old");
  }, 120_000);

  it("makes a service credential and manages contexts", async () => {
    const [service, contexts, , , , removed] = await ok(
      { args: ["token", "create", "--service", "--description", "a log server", "-o", "json"] },
      { args: ["context", "list"] },
      { args: ["login", world.url, "--user", "admin", "--password-stdin", "--name", "second", "--ttl", "30d"], input: `${ADMIN_PASSWORD}\n` },
      { args: ["context", "use", contextNameFor(world.url)] },
      { args: ["whoami"] },
      { args: ["context", "rm", "second"] },
    );
    expect(JSON.parse(service)).toMatchObject({ token: expect.stringMatching(/^tms_/), info: { scope: "TOKEN_SCOPE_SERVICE" } });
    expect(contexts).toMatch(/^\*/m);
    expect(removed).toContain("second");
  }, 120_000);

  it("runs a job with parameters, a secret file, labels, limits and restarts; logs --since, events, wait, cancel --wait", async () => {
    await writeFile(join(work, "key.txt"), "s3cret\n", { mode: 0o600 });
    await ok({ args: ["image", "push", join(work, "rootfs"), "--name", "example/params:v1", "--entrypoint", "echo suite=$TREADMILL_PARAM_SUITE"] });
    const run = await admin(
      ["job", "run", "example/params:v1", "--tag", "arch=x86_64", "--param", "SUITE=smoke", "--secret-file", "API_KEY=" + join(work, "key.txt"),
        "--label", "pr=123", "--priority", "5", "--timeout", "10m", "--queue-timeout", "1h", "--restarts", "2", "--detach"],
    );
    expect(run.code).toBe(0);
    const jobId = run.stdout.trim();
    const [, logs, events, get, list] = await ok(
      { args: ["job", "wait", jobId, "--timeout", "2m"] },
      { args: ["job", "logs", jobId, "--since", "10m"] },
      { args: ["job", "events", jobId] },
      { args: ["job", "get", jobId, "-o", "json"] },
      { args: ["job", "list", "--label", "pr=123", "--state", "finalized", "--limit", "5"] },
    );
    expect(logs.replace(/\r\n/g, "\n")).toBe("suite=smoke\n");
    expect(events).toContain("submitted");
    const job = JSON.parse(get) as { spec: Record<string, unknown> };
    expect(job.spec).toMatchObject({ tags: { pr: "123" }, priority: 5, restartPolicy: { maxRestarts: 2 } });
    expect(get).not.toContain("s3cret");
    expect(list).toContain(jobId);

    await ok({ args: ["image", "push", join(work, "rootfs"), "--name", "example/sleeper:v1", "--entrypoint", "sleep 600"] });
    const long = await admin(["job", "run", "example/sleeper:v1", "--detach"]);
    const [canceled] = await ok({ args: ["job", "cancel", long.stdout.trim(), "--message", "not needed", "--wait"] });
    expect(canceled).toContain(long.stdout.trim());
  }, 180_000);
});
