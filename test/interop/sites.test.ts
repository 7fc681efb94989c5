/**
 * Sites as network namespaces, end to end (issue #20 item 3): the launcher
 * of docs/sites-netns.md (`npm run site -- --sites 2`) and the doc's blocks
 * run as they are written, at each of the two sites: a job through the
 * site's cache, supervisor and log server, the image fetched once per site,
 * a console and a forwarded port through the site's proxy, the log read
 * from the site's log server, firmware on the site's simulated board, and
 * what reaches what. Then the launcher's own life: what a dead launcher
 * left is removed at start, a second launcher runs beside the first (or is
 * refused its subnet or run id), and SIGTERM removes everything.
 */
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { existsSync, readFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import type { SitesInfo } from "../../testbed/sites/launcher.js";
import { docBlock, docBlocks, runBash, type DocBlock } from "../support/doc-blocks.js";
import { waitUntil } from "../support/wait.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const DOC = join(REPO, "docs", "sites-netns.md");

let blocks: DocBlock[];
let dir: string;
let bins: string;
let launcher: Launcher;
let info: SitesInfo;
let stale: string[];
let staleId: string;
let leftExited: Promise<NodeJS.Signals | null>;

const block = (kind: string, name: string) => docBlock(blocks, DOC, kind, name).text;

/** A `step=` or `example=` block of the doc as a script at `site`, after the run's variables (the doc's `vars` and `step=env`). */
function script(name: string): string {
  const kind = name === "image" ? "step" : "example";
  return `set -euo pipefail\n${block("vars", "vars")}\n${block("step", "env")}\n${block(kind, name)}`;
}

/** The environment of a block run at `site`: the doc's variables, tml on PATH, `extra` (JOB). */
function envAt(site: string, extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return { ...process.env, PATH: `${bins}:${process.env.PATH ?? ""}`, TREADMILL: REPO, DIR: dir, SITE: site, NO_COLOR: "1", ...extra };
}

/** Runs a block at `site` to its end. */
function run(name: string, site: string, extra: Record<string, string> = {}) {
  return runBash(script(name), { cwd: dir, env: envAt(site, extra) });
}

/** Processes whose command line names the run's directory: the launcher's, wherever they run. */
function processesOfRun(runDir: string): number[] {
  const pids: number[] = [];
  for (const entry of execFileSync("ls", ["/proc"], { encoding: "utf8" }).split("\n")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${entry}/cmdline`, "utf8").includes(runDir)) pids.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

/** A launcher run by bash (its output kept), and what it wrote to `<dir>/sites.json` once up. */
interface Launcher {
  child: ChildProcess;
  exited: Promise<number | null>;
  output: () => string;
  info: SitesInfo;
}

/** Runs `script` (a launcher's command line) and resolves once it says it is up. */
async function launch(script: string, runDir: string): Promise<Launcher> {
  // A process group of its own: a launcher that never came up is stopped with its shell and npm.
  const child = spawn("bash", ["-c", `set -euo pipefail\n${script}`], {
    cwd: REPO,
    env: { ...process.env, TREADMILL: REPO, DIR: runDir },
    stdio: ["ignore", "pipe", "pipe"],
    detached: true,
  });
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  let output = "";
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      process.kill(-child.pid!, "SIGTERM");
      reject(new Error(`the launcher was not up within 240 s:\n${output}`));
    }, 240_000);
    const onData = (b: Buffer) => {
      output += b.toString();
      if (output.includes("Treadmill sites are up")) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", onData);
    void exited.then(() => {
      clearTimeout(timer);
      reject(new Error(`the launcher exited before it was up:\n${output}`));
    });
  });
  const started = JSON.parse(await readFile(join(runDir, "sites.json"), "utf8")) as SitesInfo;
  return { child, exited, output: () => output, info: started };
}

/** Whether anything of run `runId` is left: namespaces, veths, its route, its record. */
function leftOf(runId: string, subnet: string): string[] {
  const left: string[] = [];
  if (execFileSync("ip", ["netns", "list"], { encoding: "utf8" }).includes(`tm-${runId}-`)) left.push("namespaces");
  if (execFileSync("ip", ["link"], { encoding: "utf8" }).includes(`tm${runId}`)) left.push("veths");
  if (execFileSync("ip", ["-4", "route"], { encoding: "utf8" }).includes(subnet)) left.push("route");
  if (existsSync(`/run/treadmill/sites/${runId}`)) left.push("record");
  return left;
}

/** Waits until the doc's `job-state` block says the job runs. */
async function waitRunning(job: string, site: string): Promise<void> {
  await waitUntil(async () => (await run("job-state", site, { JOB: job })).stdout.includes("JOB_STATE_RUNNING"), `job ${job} running`, 60_000);
}

/** Sends one line to 127.0.0.1:`port` and resolves with what comes back once it holds the line. */
function echoOnce(port: number, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1");
    let got = "";
    socket.on("data", (d: Buffer) => {
      got += d.toString();
      if (got.includes(line)) {
        socket.destroy();
        resolve(got);
      }
    });
    socket.on("error", reject);
    socket.on("close", () => reject(new Error(`closed after ${JSON.stringify(got)}`)));
    socket.write(`${line}\n`);
  });
}

beforeAll(async () => {
  blocks = (await docBlocks(DOC)).filter((b) => b.lang === "sh");
  dir = await mkdtemp(join(tmpdir(), "treadmill-sites-test-"));
  bins = await mkdtemp(join(tmpdir(), "treadmill-sites-bin-"));
  await symlink(join(REPO, "bin", "tml.js"), join(bins, "tml"));
  // What a launcher killed outright leaves: its record (a pid that is gone), a namespace with a
  // process in it, and the user's veth; and a namespace no record names. The launcher removes all at its start.
  staleId = randomBytes(3).toString("hex");
  stale = [`tm-${staleId}-centre`, `tm-${randomBytes(3).toString("hex")}-site-1`];
  for (const ns of stale) execFileSync("ip", ["netns", "add", ns]);
  execFileSync("ip", ["link", "add", `tm${staleId}u`, "type", "veth", "peer", "name", `tm${staleId}ur`]);
  await mkdir(`/run/treadmill/sites/${staleId}`, { recursive: true });
  await writeFile(`/run/treadmill/sites/${staleId}/owner`, "999999999 0\n");
  const left = spawn("ip", ["netns", "exec", stale[0], "tail", "-f", "/dev/null"], { stdio: "ignore" });
  leftExited = new Promise((resolve) => left.once("exit", (_code, signal) => resolve(signal)));
  launcher = await launch(`${block("vars", "vars")}\n${block("process", "sites")}`, dir);
  info = launcher.info;
  const image = await run("image", "site-1");
  if (image.code !== 0) throw new Error(`pushing the image failed: ${image.stderr}`);
}, 300_000);

afterAll(async () => {
  if (launcher && launcher.child.exitCode === null && launcher.child.signalCode === null) {
    process.kill(info.pid, "SIGTERM");
    await launcher.exited;
  }
  for (const ns of stale ?? []) {
    try {
      execFileSync("ip", ["netns", "del", ns], { stdio: "ignore" });
    } catch {
      // removed by the launcher, as it should be
    }
  }
  await rm(dir, { recursive: true, force: true });
  await rm(bins, { recursive: true, force: true });
}, 120_000);

describe("sites in network namespaces (docs/sites-netns.md)", () => {
  it("starts a centre with two coordinators and two sites, each a namespace of its own, after removing what a dead launcher left", async () => {
    expect(info.coordinatorUrls).toHaveLength(2);
    expect(info.sites.map((s) => s.name)).toEqual(["site-1", "site-2"]);
    const namespaces = execFileSync("ip", ["netns", "list"], { encoding: "utf8" });
    for (const ns of [info.router, info.centre.ns, ...info.sites.map((s) => s.ns)]) expect(namespaces).toContain(ns);
    for (const ns of stale) expect(namespaces).not.toContain(ns);
    expect(await leftExited).toBe("SIGKILL");
    expect(execFileSync("ip", ["link"], { encoding: "utf8" })).not.toContain(`tm${staleId}`);
    expect(await readdir("/run/treadmill/sites")).not.toContain(staleId);
    expect(launcher.output()).toContain(`export TML_CONFIG=${info.tmlConfig}`);
  });

  it("runs two jobs at each site, and each site's cache fetched the image from the store exactly once", async () => {
    const count = (text: string, procedure: string) => Number(new RegExp(`${procedure}",code="OK"[^}]*} (\\d+)`).exec(text)?.[1] ?? 0);
    for (const [index, site] of info.sites.entries()) {
      for (let i = 1; i <= 2; i++) {
        const job = await run("job", site.name);
        expect(job.stderr).toMatch(/--> job \S+ succeeded \(exit code 0\)/);
        expect(job.stderr).toContain(`--> on host ${site.processHost}`);
        expect(job.stdout).toContain(`hello from ${site.name}`);
        expect(job.code).toBe(0);
        // The sites run one after the other: the store's downloads (one layer) grow by one at
        // each site's first job and not at its second, and the site's cache served both jobs.
        const fetches = await run("fetches", site.name);
        expect(fetches.code).toBe(0);
        expect(count(fetches.stdout, "ImageStoreService/GetBlob")).toBe(index + 1);
        expect(count(fetches.stdout, "ImageCacheService/Fetch")).toBe(i);
      }
    }
  }, 180_000);

  it("opens each job's console through its site's proxy, and reads its log from its site's log server", async () => {
    for (const site of info.sites) {
      const submitted = await run("console-job", site.name);
      expect(submitted.code).toBe(0);
      const job = submitted.stdout.trim();
      await waitRunning(job, site.name);
      // The doc's `tml console "$JOB"`, typed into: a line goes in, the job's answer comes back.
      const console = spawn("bash", ["-c", script("console")], { cwd: dir, env: envAt(site.name, { JOB: job }), stdio: ["pipe", "pipe", "pipe"] });
      let screen = "";
      console.stderr!.on("data", (d: Buffer) => (screen += d.toString()));
      const exited = new Promise<number | null>((resolve) => console.once("exit", (code) => resolve(code)));
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no answer on the console of ${job}:\n${screen}`)), 30_000);
        console.stdout!.on("data", (d: Buffer) => {
          screen += d.toString();
          if (screen.includes(`echoed: ping from ${site.name}`)) {
            clearTimeout(timer);
            resolve();
          }
        });
        console.stdin!.write(`ping from ${site.name}\n`);
      });
      console.stdin!.end();
      expect(await exited).toBe(0);

      const logs = await run("logs", site.name, { JOB: job });
      expect(logs.code).toBe(0);
      // The job's log servers (the doc's jq line): its site's, and no other.
      expect(logs.stdout.split("\n").filter((line) => line.startsWith("https://"))).toEqual([site.logServerUrl]);
      expect(logs.stdout).toContain(`echoed: ping from ${site.name}`);
    }
  }, 180_000);

  it("forwards a local port through each site's proxy to a port a job there exposes", async () => {
    for (const site of info.sites) {
      const submitted = await run("port-job", site.name);
      expect(submitted.code).toBe(0);
      const job = submitted.stdout.trim();
      await waitRunning(job, site.name);
      const forward = spawn("bash", ["-c", `${script("port-forward")}`], { cwd: dir, env: envAt(site.name, { JOB: job }), stdio: ["ignore", "pipe", "pipe"], detached: true });
      const forwardExited = new Promise<void>((resolve) => forward.once("exit", () => resolve()));
      try {
        const local = await new Promise<number>((resolve, reject) => {
          let said = "";
          const timer = setTimeout(() => reject(new Error(`tml port-forward did not listen: ${said}`)), 30_000);
          const onData = (d: Buffer) => {
            said += d.toString();
            const m = /Forwarding [\d.]+:(\d+) ->/.exec(said);
            if (m) {
              clearTimeout(timer);
              resolve(Number(m[1]));
            }
          };
          forward.stdout!.on("data", onData);
          forward.stderr!.on("data", onData);
        });
        // The job's nc may not listen yet when the first tunnel reaches it: a closed connection is tried again.
        const echoed = await waitUntil(async () => {
          try {
            return await echoOnce(local, `through the proxy of ${site.name}`);
          } catch {
            return undefined;
          }
        }, `an echo through the proxy of ${site.name}`, 30_000);
        expect(echoed).toContain(`through the proxy of ${site.name}`);
      } finally {
        process.kill(-forward.pid!, "SIGINT");
        await forwardExited;
        await runBash(`tml job cancel ${job}`, { cwd: dir, env: envAt(site.name) });
      }
    }
  }, 180_000);

  it("runs firmware on each site's simulated board through the board driver", async () => {
    for (const site of info.sites) {
      const blinky = await run("blinky", site.name);
      expect(blinky.stderr).toMatch(/--> job \S+ succeeded \(exit code 0\)/);
      expect(blinky.stderr).toContain(`--> on host ${site.boardHost}`);
      expect(blinky.stdout).toContain("blinky on the board");
      expect(blinky.code).toBe(0);
    }
  }, 120_000);

  it("lets the user reach a site's proxy and log server but not its hosts, the centre reach no site, and a site reach the centre", async () => {
    for (const site of info.sites) {
      const reach = await run("isolation", site.name);
      expect(reach.code).toBe(0);
      expect(reach.stdout.trim().split("\n")).toEqual([
        "user to the site's proxy: reachable",
        "user to the site's log server: reachable",
        "user to the site's hosts: unreachable",
        "the site to its hosts: reachable",
        "the centre to the site: unreachable",
        "the site to the centre: reachable",
      ]);
    }
  }, 120_000);

  it("refuses the subnet or the run id of a run still running, and makes nothing", async () => {
    for (const [flag, value, why] of [
      ["--subnet", info.subnet.replace(/\.0\/24$/, ""), `subnet ${info.subnet} overlaps`],
      ["--run-id", info.runId, `run ${info.runId} is running`],
    ]) {
      const otherDir = join(tmpdir(), `treadmill-sites-refused-${randomBytes(3).toString("hex")}`);
      const refused = await runBash(`npm run site -- --sites 1 --dir "${otherDir}" ${flag} ${value}`, { cwd: REPO, env: process.env });
      expect(refused.code).toBe(1);
      expect(refused.stdout + refused.stderr).toContain(why);
      expect(existsSync(otherDir)).toBe(false);
      expect(leftOf(info.runId, info.subnet)).toEqual(["namespaces", "veths", "route", "record"]);
    }
  }, 60_000);

  it("runs a second launcher beside the first under other names and addresses, and a second signal removes it at once", async () => {
    const otherDir = await mkdtemp(join(tmpdir(), "treadmill-sites-test-"));
    try {
      const other = await launch(`npm run site -- --sites 1 --coordinators 1 --dir "$DIR"`, otherDir);
      expect(other.info.runId).not.toBe(info.runId);
      expect(other.info.subnet).not.toBe(info.subnet);
      const job = await runBash(`tml job run example/sh --site site-1 --param script="echo hello from the other run"`, {
        cwd: otherDir,
        env: envAt("site-1", { TML_CONFIG: other.info.tmlConfig }),
      });
      // The other run has its own coordinator, which has no such image: it answers, and the first run is untouched.
      expect(job.stderr).toMatch(/image example\/sh/);
      expect(leftOf(info.runId, info.subnet)).toEqual(["namespaces", "veths", "route", "record"]);
      // Two signals: the first begins the orderly stop, the second ends the launcher, whose exit hook removes everything at once.
      // (A signal sent while the same one is pending merges with it: the second waits until the first is taken.)
      process.kill(other.info.pid, "SIGTERM");
      await waitUntil(() => other.output().includes('"msg":"stopping"'), "the other launcher stopping", 10_000);
      process.kill(other.info.pid, "SIGTERM");
      expect(await other.exited).toBe(130);
      expect(leftOf(other.info.runId, other.info.subnet)).toEqual([]);
      expect(processesOfRun(otherDir)).toEqual([]);
      expect(leftOf(info.runId, info.subnet)).toEqual(["namespaces", "veths", "route", "record"]);
    } finally {
      await rm(otherDir, { recursive: true, force: true });
    }
  }, 300_000);

  it("stops every process on SIGTERM and removes its namespaces, veths, routes and rules", async () => {
    expect(processesOfRun(dir).length).toBeGreaterThan(10);
    process.kill(info.pid, "SIGTERM");
    expect(await launcher.exited).toBe(0);
    expect(leftOf(info.runId, info.subnet)).toEqual([]);
    expect(processesOfRun(dir)).toEqual([]);
  }, 120_000);
});
