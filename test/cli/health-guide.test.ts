/**
 * docs/health.md as it is written: its command blocks run in order against a
 * coordinator with an image store, a log server and two process-driver
 * supervisors (runner-1, runner-2, both tagged rack=a): real health jobs
 * burn the hosts in, a quarantine refuses a job with its reason, a return
 * runs the check again, a retire keeps the host's history.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { execFile } from "node:child_process";
import { mkdir, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { docBlock, docBlocks, runBash, type DocBlock } from "../support/doc-blocks.js";
import { waitUntil } from "../support/wait.js";
import { busyboxRootfs, startWorld, tml, type CliWorld } from "./harness.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GUIDE = join(REPO, "docs", "health.md");

let world: CliWorld;
let blocks: DocBlock[];
let work: string;
let config: string;
let bins: string;
const hosts: Record<string, string> = {};

function guide(name: string) {
  const env = { ...process.env, PATH: `${bins}:${process.env.PATH}`, TML_CONFIG: config, NO_COLOR: "1" };
  return runBash(`set -eo pipefail\n${docBlock(blocks, GUIDE, "health", name).text}`, { cwd: work, env });
}

async function healthOf(name: string): Promise<{ health: string; health_reason: string }> {
  const [row] = await world.coordinator.sql<{ health: string; health_reason: string }[]>`
    select health, health_reason from hosts where name = ${name}`;
  return row;
}
const healthy = (name: string) => waitUntil(async () => (await healthOf(name)).health === "healthy", `${name} healthy`, 60_000);

beforeAll(async () => {
  blocks = await docBlocks(GUIDE);
  world = await startWorld();
  await world.startStores();
  for (const n of ["1", "2"]) hosts[`runner-${n}`] = (await world.startSupervisor(`runner-${n}`, { rack: "a", runner: n })).hostId;
  config = await world.adminConfig("health");
  bins = join(world.dir, "bin");
  await mkdir(bins);
  await symlink(join(REPO, "bin", "tml.js"), join(bins, "tml"));
  work = join(world.dir, "work");
  await busyboxRootfs(join(work, "check-rootfs"), ["sh", "echo", "test"]);
  const rootfs = await busyboxRootfs(join(work, "hello-rootfs"), ["sh", "echo"]);
  // The files the per-driver examples push: a qcow2 disk and a firmware file.
  await promisify(execFile)("qemu-img", ["create", "-q", "-f", "qcow2", join(work, "boot-check.qcow2"), "16M"]);
  await writeFile(join(work, "selftest.bin"), Buffer.alloc(4096, 0x5a));
  const pushed = await tml(config, ["image", "push", rootfs, "--name", "example/hello:latest", "--entrypoint", "echo hello"]);
  if (pushed.code !== 0) throw new Error(`pushing example/hello failed: ${pushed.stderr}`);
}, 180_000);

afterAll(async () => {
  await world?.stop();
}, 60_000);

describe("docs/health.md's command blocks", () => {
  it("define a check: both hosts of its selector run their burn-in as health jobs and become healthy", async () => {
    const result = await guide("define");
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/^NAME\s+IMAGE\s+HOSTS/m);
    expect(result.stdout).toMatch(/smoke\s+checks\/smoke:v1\s+rack=a/);
    await healthy("runner-1");
    await healthy("runner-2");
    const timeline = await world.coordinator.sql`
      select health from host_health_events where host_id = ${hosts["runner-1"]} order by id`;
    expect(timeline.map((r) => r.health)).toEqual(["checking", "healthy"]);

    const jobs = await guide("jobs");
    expect(jobs.code).toBe(0);
    const rows = jobs.stdout.split("\n").filter((l) => l.includes("checks/smoke:v1"));
    expect(rows).toHaveLength(2);
    for (const row of rows) expect(row).toMatch(/\ssucceeded\s.*\shealth\s/);
  }, 120_000);

  it("quarantine refuses a job with the host's reason, --queue-anyway queues it, and return checks the host and runs it", async () => {
    const result = await guide("quarantine");
    expect(result.code).toBe(0);
    expect(result.stderr).toContain("runner-1 quarantined (quarantined by user:admin: flaky network)");
    expect(result.stderr).toContain("run again with --queue-anyway to queue it");
    expect(result.stdout).toContain("refused: no host can run it now");
    expect(result.stdout).toMatch(/Host runner-1 returned: checking/);
    const queued = /^([0-9a-f-]{36})$/m.exec(result.stdout)![1];
    await healthy("runner-1");
    await waitUntil(async () => {
      const [row] = await world.coordinator.sql`select state, exit_status from jobs where id = ${queued}`;
      return row.state === "finalized" && row.exit_status === "success";
    }, "the queued job to run once runner-1 is back", 60_000);
  }, 120_000);

  it("run, update and get a check, retire a host keeping its history, delete the check", async () => {
    const result = await guide("manage");
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/Host runner-1 is being checked: checking/);
    expect(result.stdout).toMatch(/Every jobs:\s+100/);
    expect(result.stdout).toMatch(/Quarantine after:\s+2 infrastructure failures in a row/);
    expect(result.stdout).toMatch(/Host runner-2 retired: retired \(retired by user:admin: replaced by rev C\)/);
    expect(result.stdout).toContain("Health check smoke deleted.");
    await healthy("runner-1");
    expect((await healthOf("runner-2")).health).toBe("retired");
    const [{ n }] = await world.coordinator.sql`
      select count(*)::int as n from job_hosts where host_id = ${hosts["runner-2"]}`;
    expect(n).toBeGreaterThan(0);
  }, 120_000);

  it("define a check for each driver as the per-driver sections show them", async () => {
    for (const name of ["driver-process", "driver-qemu", "driver-board"]) {
      const result = await guide(name);
      expect({ name, code: result.code, stderr: result.stderr.includes("Error") ? result.stderr : "" }).toEqual({ name, code: 0, stderr: "" });
    }
    const checks = await world.coordinator.sql`select name, driver_kind, host_tags from health_checks order by name`;
    expect(checks).toEqual([
      { name: "nrf52", driver_kind: "board", host_tags: { board: "nrf52840dk" } },
      { name: "runner", driver_kind: "process", host_tags: { pool: "ci" } },
      { name: "vm-boot", driver_kind: "qemu", host_tags: {} },
    ]);
    // None applies to the guide's hosts: runner-1 stays healthy.
    expect((await healthOf("runner-1")).health).toBe("healthy");
  }, 120_000);
});
