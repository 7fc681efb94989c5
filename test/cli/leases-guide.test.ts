/**
 * docs/leases.md as it is written: its command blocks run in order against
 * the all-in-one testbed (two process hosts tagged driver=process, a
 * simulated board tagged board=sim, a proxy for consoles), its coordinator's
 * lease keeper sweeping every 100 ms. `tml reserve` in the foreground runs
 * as its own process and is interrupted as Ctrl-C would; the CI block runs
 * as a process group that is killed as a cancelled pipeline's is, its grace
 * period and renew interval cut from 2m and 30s to 6s and 0.5s (the only
 * change to the guide's text; a `tml lease renew` starts in well under a
 * second, but a loaded CI machine once let 2 s pass between two).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdir, symlink } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { FinalizeReason, JobEventKind } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { docBlock, docBlocks, execLast, runBash, type DocBlock } from "../support/doc-blocks.js";
import { watchLines, type LineWatcher } from "../support/process.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";
import { eventually, tml } from "./harness.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GUIDE = join(REPO, "docs", "leases.md");

let tb: RunningTestbed;
let blocks: DocBlock[];
let config: string;
let bins: string;
const children: ChildProcess[] = [];

function env(extra: Record<string, string> = {}, configFile = config): NodeJS.ProcessEnv {
  return { ...process.env, PATH: `${bins}:${process.env.PATH}`, TML_CONFIG: configFile, NO_COLOR: "1", TML_SERVER: "", TML_TOKEN: "", ...extra };
}

const text = (name: string) => docBlock(blocks, GUIDE, "leases", name).text;

function guide(name: string, extra: Record<string, string> = {}) {
  return runBash(`set -eo pipefail\n${text(name)}`, { cwd: tb.dir, env: env(extra) });
}

/** Starts `script` with bash in a process group of its own, as a terminal or a CI runner would. */
function start(script: string): { child: ChildProcess; watcher: LineWatcher; exited: Promise<number | string> } {
  const child = spawn("bash", ["-c", script], { cwd: tb.dir, env: env(), stdio: ["ignore", "pipe", "pipe"], detached: true });
  children.push(child);
  const exited = new Promise<number | string>((resolve) => child.once("close", (code, signal) => resolve(code ?? signal ?? "unknown")));
  return { child, watcher: watchLines(child, exited), exited };
}

interface LeaseJson {
  id: string;
  state: string;
  endReason: string;
  description: string;
  endReachedTime?: string;
  statusMessage: string;
}

async function lease(id: string, configFile = config): Promise<LeaseJson> {
  return JSON.parse((await tml(configFile, ["lease", "get", id, "-o", "json"])).stdout) as LeaseJson;
}

beforeAll(async () => {
  blocks = await docBlocks(GUIDE);
  tb = await startTestbed({ supervisors: 2, coordinatorConfig: { leaseGraceMinMs: 200, leaseSweepIntervalMs: 100, leaseKeepaliveIntervalMs: 100 } });
  config = join(tb.dir, "tml.json");
  const login = await tml(config, ["login", tb.coordinatorUrl, "--user", "admin", "--password-stdin"], { input: `${tb.testbed.admin().password}\n` });
  if (login.code !== 0) throw new Error(`login failed: ${login.stderr}`);
  bins = join(tb.dir, "bin");
  await mkdir(bins);
  await symlink(join(REPO, "bin", "tml.js"), join(bins, "tml"));
}, 180_000);

afterAll(async () => {
  for (const child of children) {
    try {
      process.kill(-child.pid!, "SIGKILL");
    } catch {
      // already gone
    }
  }
  await tb?.stop();
}, 60_000);

describe("docs/leases.md's command blocks", () => {
  it("interactively: reserve holds a host, jobs and a console run in it, it is extended, and Ctrl-C releases it", async () => {
    const reserve = start(execLast(`set -eo pipefail\n${text("reserve")}`));
    await reserve.watcher.waitForLine(/--> active on \S+ until /, 60_000);
    const id = /--> lease (\S+):/.exec(reserve.watcher.lines.join("\n"))![1];

    const use = await guide("use");
    expect({ code: use.code, stderr: use.code === 0 ? "" : use.stderr }).toEqual({ code: 0, stderr: "" });
    expect(use.stdout).toContain("hello from treadmill");
    expect(use.stdout).toContain("inside the lease");
    expect(use.stdout).toContain(`Lease ${id} now ends at `);
    expect(use.stdout).toMatch(/^State:\s+active$/m);
    const shell = /^([0-9a-f-]{36})$/m.exec(use.stdout)![1];
    expect(use.stdout).toMatch(new RegExp(`^\\S+\\s+${shell}$`, "m"));

    process.kill(reserve.child.pid!, "SIGINT");
    expect(await reserve.exited).toBe(0);
    expect(reserve.watcher.lines).toContainEqual(expect.stringContaining(`--> lease ${id} ended: released by admin`));
    // The shell still running in it was canceled with it.
    const job = await tb.waitFinalized(shell);
    expect(job.finalizeReason).toBe(FinalizeReason.CANCELED);
    expect(job.timeline.filter((e) => e.kind === JobEventKind.LEASE).map((e) => e.message)).toContainEqual(expect.stringContaining(id));
  }, 180_000);

  it("booking ahead: the board's booking shows on the calendar from its start, and release ends it", async () => {
    const ahead = await guide("ahead");
    expect({ code: ahead.code, stderr: ahead.code === 0 ? "" : ahead.stderr }).toEqual({ code: 0, stderr: "" });
    // 6 hours at 15 minutes a column: booked from +2h (column 8) for an hour.
    expect(ahead.stdout).toMatch(/^board-1 {2}\.{7,8}~{4,5}\.{11,12}$/m);
    expect(ahead.stdout).toMatch(/^board-1\s+lease\s+\S+\s+admin\s+.*\swaiting$/m);
    expect(ahead.stdout).toMatch(/Lease \S+ ended: released by admin/);
  }, 60_000);

  it("in CI: the pipeline's jobs run in the lease, and once the pipeline is killed the board comes back after the grace period", async () => {
    const ci = text("ci");
    expect(ci).toContain("--grace 2m");
    expect(ci).toContain("sleep 30");
    const pipeline = start(`set -eo pipefail\n${ci.replace("--grace 2m", "--grace 6s").replace("sleep 30", "sleep 0.5")}`);
    await pipeline.watcher.waitForLine(/--> job \S+ succeeded/, 90_000);
    expect(pipeline.watcher.lines).toContainEqual(expect.stringContaining("blinky booted"));
    const listed = JSON.parse((await tml(config, ["lease", "list", "--state", "active", "-o", "json"])).stdout) as LeaseJson[];
    const id = listed.find((l) => l.description === "CI local")!.id;

    // A cancelled pipeline: every process of it killed at once, no trap runs.
    process.kill(-pipeline.child.pid!, "SIGKILL");
    await pipeline.exited;
    const waiting = await tml(config, ["job", "run", "--detach", "--tag", "board=sim", "example/blinky"]);
    expect(waiting.code).toBe(0);
    const next = waiting.stdout.trim();
    await eventually("the lease to end lost", async () => (await lease(id)).endReason === "LEASE_END_REASON_LOST", 30_000);
    const job = await tb.waitFinalized(next);
    expect(job.exitCode).toBe(0);
    const endedAt = Date.parse((await lease(id)).endReachedTime!);
    const started = JSON.parse((await tml(config, ["job", "get", next, "-o", "json"])).stdout) as { startTime: string };
    expect(Date.parse(started.startTime)).toBeGreaterThanOrEqual(endedAt);
  }, 180_000);

  it("admins: list every user's active leases and revoke one, whose holder is shown why", async () => {
    const alice = join(tb.dir, "alice.json");
    expect((await tml(config, ["user", "create", "alice", "--password-stdin"], { input: "alice's password\n" })).code).toBe(0);
    expect((await tml(alice, ["login", tb.coordinatorUrl, "--user", "alice", "--password-stdin"], { input: "alice's password\n" })).code).toBe(0);
    const reserved = await tml(alice, ["reserve", "--detach", "--wait", "--tag", "driver=process", "--for", "30m", "--grace", "10m"]);
    expect(reserved.code).toBe(0);
    const id = reserved.stdout.trim();

    const result = await guide("admin", { LEASE: id });
    expect({ code: result.code, stderr: result.code === 0 ? "" : result.stderr }).toEqual({ code: 0, stderr: "" });
    expect(result.stdout).toMatch(new RegExp(`^${id}\\s+alice\\s+active\\s`, "m"));
    expect(result.stdout).toContain(`Lease ${id} ended: revoked by admin admin: rack maintenance at 15:00`);
    const seen = await tml(alice, ["lease", "get", id]);
    expect(seen.stdout).toMatch(/^State:\s+ended \(revoked by admin admin: rack maintenance at 15:00\)$/m);
  }, 60_000);
});
