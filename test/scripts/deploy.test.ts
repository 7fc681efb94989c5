/**
 * deploy/ as docs/deploy.md installs it: every systemd unit passes
 * `systemd-analyze verify` (its ExecStart pointed at this checkout's bins, as
 * `npm install --global` puts them in /usr/local/bin), and each unit's
 * command line with the example environment file it reads is a whole, valid
 * configuration of its component: no unknown flag or variable, no bad
 * value, nothing required missing.
 */
import { describe, expect, it } from "@jest/globals";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, stat, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { loadCoordinatorConfig } from "../../coordinator/config.js";
import { loadProxyConfig } from "../../proxy/config.js";
import { loadImageStoreConfig } from "../../stores/image/config.js";
import { loadLogServerConfig } from "../../stores/log/config.js";
import { loadSupervisorConfig } from "../../supervisor/config.js";
import { docBlock, docBlocks, runBash } from "../support/doc-blocks.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const DEPLOY_DOC = join(REPO, "docs", "deploy.md");
const UNITS = join(REPO, "deploy", "systemd");
const INSTALLED_BINS = "/usr/local/bin/";

type Source = { env: Record<string, string | undefined>; argv: string[] };
const LOADERS: Record<string, (source: Source) => unknown> = {
  "treadmill-coordinator": loadCoordinatorConfig,
  "treadmill-image-store": loadImageStoreConfig,
  "treadmill-log-server": loadLogServerConfig,
  "treadmill-proxy": loadProxyConfig,
  "treadmill-supervisor": loadSupervisorConfig,
};

interface Unit {
  file: string;
  text: string;
  bin: string;
  argv: string[];
  environmentFile: string;
}

/** A unit's ExecStart and EnvironmentFile, with the instance `%i` of a template filled in. */
function readUnit(file: string, instance = "sup-1"): Unit {
  const text = readFileSync(join(UNITS, file), "utf8");
  const value = (key: string) => {
    const line = text.split("\n").find((l) => l.startsWith(`${key}=`));
    if (line === undefined) throw new Error(`${file} has no ${key}=`);
    return line.slice(key.length + 1).replaceAll("%i", instance);
  };
  const [command, ...argv] = value("ExecStart").split(/\s+/);
  return { file, text, bin: command!.replace(INSTALLED_BINS, ""), argv, environmentFile: value("EnvironmentFile") };
}

/** The variables an example environment file sets (its commented-out lines too, when `withOptional`). */
function readEnvFile(path: string, withOptional: boolean): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of readFileSync(path, "utf8").split("\n")) {
    const match = /^(#)?([A-Z][A-Z0-9_]*)=(.*)$/.exec(line);
    if (match && (withOptional || match[1] === undefined)) env[match[2]!] = match[3]!;
  }
  return env;
}

/** deploy/env/X.env for /etc/treadmill/X.env (supervisor-NAME.env: supervisor.env). */
function exampleOf(environmentFile: string): string {
  const name = environmentFile.replace("/etc/treadmill/", "").replace(/^supervisor-[^.]+\.env$/, "supervisor.env");
  return join(REPO, "deploy", "env", name);
}

const unitFiles = readdirSync(UNITS).filter((f) => f.endsWith(".service"));

describe("the systemd units of deploy/systemd", () => {
  it("are one per component, each run by a bin of the package", () => {
    expect(unitFiles.sort()).toEqual([
      "treadmill-coordinator.service",
      "treadmill-image-cache.service",
      "treadmill-image-store.service",
      "treadmill-log-server.service",
      "treadmill-proxy.service",
      "treadmill-supervisor@.service",
    ]);
    const bins = (JSON.parse(readFileSync(join(REPO, "package.json"), "utf8")) as { bin: Record<string, string> }).bin;
    for (const file of unitFiles) {
      const unit = readUnit(file);
      expect({ file, bin: unit.bin in bins && unit.bin in LOADERS }).toEqual({ file, bin: true });
    }
  });

  it("pass systemd-analyze verify with nothing to say", async () => {
    expect(existsSync("/usr/bin/systemd-analyze")).toBe(true);
    const dir = await mkdtemp(join(tmpdir(), "treadmill-units-"));
    try {
      await mkdir(join(dir, "bin"));
      for (const bin of Object.keys(LOADERS)) await symlink(join(REPO, "bin", `${bin}.js`), join(dir, "bin", bin));
      const checked: string[] = [];
      for (const file of unitFiles) {
        const text = readFileSync(join(UNITS, file), "utf8").replaceAll(INSTALLED_BINS, `${join(dir, "bin")}/`);
        // A template is verified as one of its instances.
        const name = file.replace("@.service", "@sup-1.service");
        await writeFile(join(dir, name), text);
        const result = spawnSync("systemd-analyze", ["verify", join(dir, name)], { encoding: "utf8", cwd: dir });
        expect({ name, status: result.status, said: `${result.stdout}${result.stderr}` }).toEqual({ name, status: 0, said: "" });
        checked.push(name);
      }
      expect(checked).toHaveLength(unitFiles.length);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("each run a whole configuration with their example environment file, with or without its optional lines", () => {
    for (const file of unitFiles) {
      const unit = readUnit(file);
      const example = exampleOf(unit.environmentFile);
      for (const withOptional of [false, true]) {
        const env = readEnvFile(example, withOptional);
        // The commented alternatives of a board supervisor need their file; the rest must load as written.
        if (withOptional && env.TREADMILL_SUPERVISOR_DRIVER === "board") env.TREADMILL_SUPERVISOR_DRIVER = "process";
        expect({ file, withOptional, loaded: attempt(() => LOADERS[unit.bin]!({ env, argv: unit.argv })) }).toEqual({
          file,
          withOptional,
          loaded: "ok",
        });
      }
    }
  });

  it("and a typo in an environment file is refused at start, naming the variable", () => {
    const unit = readUnit("treadmill-log-server.service");
    const env = { ...readEnvFile(exampleOf(unit.environmentFile), false), TREADMILL_LOG_SERVER_RETENTON_MAX_AGE_MS: "1h" };
    expect(attempt(() => loadLogServerConfig({ env, argv: unit.argv }))).toMatch(/unknown environment variable TREADMILL_LOG_SERVER_RETENTON_MAX_AGE_MS/);
  });
});

describe("docs/deploy.md", () => {
  it("installs the units, the journal's settings and one env file per component and host, secrets unreadable by others, and keeps edited ones", async () => {
    const blocks = await docBlocks(DEPLOY_DOC);
    const script = `${docBlock(blocks, DEPLOY_DOC, "vars", "install").text}\n${docBlock(blocks, DEPLOY_DOC, "step", "install").text}`;
    const etc = await mkdtemp(join(tmpdir(), "treadmill-etc-"));
    try {
      const run = () => runBash(script, { cwd: etc, env: { ...process.env, ETC: etc, TREADMILL: REPO } });
      expect(await run()).toMatchObject({ code: 0, stderr: "" });
      expect((await readdir(join(etc, "systemd", "system"))).sort()).toEqual(unitFiles.sort());
      expect(existsSync(join(etc, "systemd", "journald@treadmill.conf"))).toBe(true);
      const envFiles = (await readdir(join(etc, "treadmill"))).sort();
      expect(envFiles).toEqual(["coordinator.env", "image-cache.env", "image-store.env", "log-server.env", "proxy.env", "supervisor-board-1.env"]);
      for (const file of envFiles) expect({ file, mode: (await stat(join(etc, "treadmill", file))).mode & 0o777 }).toEqual({ file, mode: 0o600 });
      // Every unit's EnvironmentFile is one the block installed.
      for (const unit of unitFiles.map((f) => readUnit(f, "board-1"))) {
        expect(existsSync(unit.environmentFile.replace("/etc/", `${etc}/`))).toBe(true);
      }
      await writeFile(join(etc, "treadmill", "proxy.env"), "TREADMILL_PROXY_SITE=edited\n");
      expect(await run()).toMatchObject({ code: 0, stderr: "" });
      expect(readFileSync(join(etc, "treadmill", "proxy.env"), "utf8")).toBe("TREADMILL_PROXY_SITE=edited\n");
      expect(spawnSync("id", ["-u", "treadmill"]).status).toBe(0);
    } finally {
      await rm(etc, { recursive: true, force: true });
    }
  });

  it("names only units that deploy/systemd has, in its systemctl and journalctl lines", () => {
    const text = readFileSync(DEPLOY_DOC, "utf8");
    const named = new Set([...text.matchAll(/^(?:systemctl|journalctl) .*$/gm)].flatMap((line) => [...line[0].matchAll(/treadmill-[a-z-]+(@[a-z0-9-]+)?/g)].map((m) => m[0])));
    expect(named.size).toBeGreaterThanOrEqual(6);
    for (const name of named) {
      const file = `${name.replace(/@.*$/, "@")}.service`;
      expect({ name, unit: unitFiles.includes(file) }).toEqual({ name, unit: true });
    }
  });
});

function attempt(load: () => unknown): string {
  try {
    load();
    return "ok";
  } catch (err) {
    return (err as Error).message;
  }
}
