/**
 * The package as a lab installs it (issue #20): `npm pack` makes a tarball
 * (its `prepare` compiles the programs into dist/), `npm install -g` of the
 * tarball gives working `tml` and `treadmill-*` commands that run from any
 * directory, with no TypeScript sources and no tsx at run time: the
 * installed testbed comes up, and the installed `tml` logs in and runs a job
 * on it.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = fileURLToPath(new URL("../..", import.meta.url));

let dir: string;
let prefix: string;
let testbed: ChildProcess | undefined;

/** Runs an installed command in `cwd`, with `env` added; fails on a non-zero exit. */
function installed(command: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = {}, input?: string): string {
  const result = spawnSync(join(prefix, "bin", command), args, { cwd, env: { ...process.env, ...env }, encoding: "utf8", input, timeout: 120_000 });
  if (result.status !== 0) throw new Error(`${command} ${args.join(" ")} exited ${result.status}:\n${result.stdout}\n${result.stderr}`);
  return result.stdout;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "treadmill-package-"));
  prefix = join(dir, "prefix");
  const pack = spawnSync("npm", ["pack", "--pack-destination", dir], { cwd: REPO, encoding: "utf8", timeout: 300_000 });
  expect(pack.status).toBe(0);
  const [tarball] = (await readdir(dir)).filter((name) => name.endsWith(".tgz"));
  expect(tarball).toBeDefined();
  const install = spawnSync("npm", ["install", "-g", "--prefix", prefix, "--no-audit", "--no-fund", join(dir, tarball!)], {
    cwd: dir,
    encoding: "utf8",
    timeout: 300_000,
  });
  expect({ status: install.status, stderr: install.status === 0 ? "" : install.stderr }).toEqual({ status: 0, stderr: "" });
}, 600_000);

afterAll(async () => {
  if (testbed?.exitCode === null) {
    testbed.kill("SIGINT");
    await new Promise((resolve) => testbed!.once("exit", resolve));
  }
  await rm(dir, { recursive: true, force: true });
});

describe("the installed package", () => {
  it("ships the compiled programs without the TypeScript sources", () => {
    const root = join(prefix, "lib", "node_modules", "treadmill");
    expect(existsSync(join(root, "dist", "tml.cjs"))).toBe(true);
    expect(existsSync(join(root, "dist", "tml.cjs.cache"))).toBe(true);
    expect(existsSync(join(root, "dist", "treadmill-coordinator.js"))).toBe(true);
    expect(existsSync(join(root, "coordinator", "migrations", "0001_init.sql"))).toBe(true);
    expect(existsSync(join(root, "console", "dist", "index.html"))).toBe(true);
    expect(existsSync(join(root, "cli", "main.ts"))).toBe(false);
    expect(existsSync(join(root, "lib"))).toBe(false);
  });

  it("runs the testbed from any directory, and its tml logs in and runs a job there", async () => {
    const work = join(dir, "lab");
    await mkdir(work);
    expect(installed("tml", ["--help"], "/")).toMatch(/^tml: the Treadmill command-line client/);
    expect(installed("treadmill-supervisor", ["--help"], "/")).toMatch(/^treadmill-supervisor/);
    testbed = spawn(join(prefix, "bin", "treadmill-testbed"), ["--base-port", "0", "--boards", "0", "--supervisors", "1"], {
      cwd: work,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    const url = await new Promise<string>((resolve, reject) => {
      const onData = (b: Buffer) => {
        output += b.toString("utf8");
        const up = /Treadmill testbed is up[\s\S]*coordinator\s+(http:\/\/\S+)/.exec(output);
        if (up) resolve(up[1]!);
      };
      testbed!.stdout!.on("data", onData);
      testbed!.stderr!.on("data", onData);
      testbed!.once("exit", () => reject(new Error(`the installed testbed exited:\n${output}`)));
    });
    const env = { TML_CONFIG: join(work, "tml.json"), TML_SERVER: "", TML_TOKEN: "", NO_COLOR: "1" };
    const password = await readFile(join(work, ".treadmill", "admin-password"), "utf8");
    installed("tml", ["login", url, "--user", "admin", "--password-stdin"], work, env, password);
    expect(installed("tml", ["job", "run", "example/hello"], work, env)).toContain("hello from treadmill");
  }, 180_000);
});
