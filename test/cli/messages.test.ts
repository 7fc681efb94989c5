/**
 * Messages that once stood in a user's way (issue #18, defect 9): an empty
 * contexts file, and the last line of `tml job run` for a job killed from
 * outside.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { readdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { ConfigStore } from "../../cli/config.js";
import { ADMIN_PASSWORD, busyboxRootfs, eventually, startTml, startWorld, tml, type CliWorld } from "./harness.js";

let world: CliWorld;

beforeAll(async () => {
  world = await startWorld();
}, 120_000);

afterAll(async () => {
  await world?.stop();
}, 60_000);

describe("an empty contexts file", () => {
  it("reads as no contexts, whether empty or {}", async () => {
    for (const [name, text] of [["empty", ""], ["blank", "\n"], ["braces", "{}"]]) {
      const path = world.configFile(name);
      await writeFile(path, text);
      expect(await new ConfigStore(path).load()).toEqual({ contexts: {} });
    }
  });

  it("does not stand in the way of tml login, which fills it", async () => {
    const path = world.configFile("made-by-mktemp");
    await writeFile(path, "", { mode: 0o600 });
    const login = await tml(path, ["login", world.url, "--user", "admin", "--password-stdin"], { input: `${ADMIN_PASSWORD}\n` });
    expect(login.stderr).toBe("");
    expect(login.code).toBe(0);
    const saved = JSON.parse(await readFile(path, "utf8")) as { current: string; contexts: Record<string, { user: string }> };
    expect(saved.contexts[saved.current].user).toBe("admin");
    expect((await stat(path)).mode & 0o777).toBe(0o600);
  }, 60_000);
});

describe("tml job run's last line", () => {
  let config: string;

  beforeAll(async () => {
    await world.startStores();
    await world.startSupervisor("messages-1");
    config = await world.adminConfig("job-run");
    const root = await busyboxRootfs(join(world.dir, "rootfs"), ["sh"]);
    const push = await tml(config, ["image", "push", root, "--name", "example/waits:latest", "--entrypoint", "echo waiting-for-its-end; read x"]);
    expect(push.code).toBe(0);
  }, 120_000);

  it("says why a job whose sandbox was killed from outside failed, and that it is the infrastructure's failure", async () => {
    const run = startTml(config, ["job", "run", "example/waits"]);
    await run.waitForLine(/^waiting-for-its-end\r?$/);
    // The workload's top process is the supervisor's child: kill it as a stray `kill -9` would.
    let killed = 0;
    await eventually("the workload killed", async () => {
      for (const pid of await readdir("/proc")) {
        if (!/^\d+$/.test(pid)) continue;
        const [cmdline, status] = await Promise.all([readFile(`/proc/${pid}/cmdline`, "utf8"), readFile(`/proc/${pid}/status`, "utf8")]).catch(() => ["", ""]);
        if (cmdline.includes("waiting-for-its-end") && new RegExp(`^PPid:\\s+${process.pid}$`, "m").test(status)) {
          process.kill(Number(pid), "SIGKILL");
          killed++;
        }
      }
      return killed > 0;
    });
    const result = await run.result;
    expect(result.code).toBe(1);
    const last = result.stderr.trim().split("\n").at(-1);
    expect(last).toMatch(/^--> job \S+ internal-error: the job's sandbox was killed by SIGKILL, from outside the job .*\(an infrastructure failure\)$/);
  }, 120_000);
});
