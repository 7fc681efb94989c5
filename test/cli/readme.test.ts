/**
 * The README's commands on the all-in-one testbed, as the README shows them:
 * the banner `npm start` prints (the README's copy must not drift from it),
 * the banner's commands to try, the sample `tml job run` output, and the
 * "Calling a server by hand" block, run as it is written.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { banner } from "../../testbed/banner.js";
import { docBlock, docBlocks, runBash } from "../support/doc-blocks.js";
import { startTestbed, type RunningTestbed } from "../support/testbed.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const README = join(REPO, "README.md");

let tb: RunningTestbed;
let readme: string;

/** Runs `script` with bash in the clone, with a contexts file of its own. */
function bash(script: string, env: Record<string, string> = {}) {
  const tml = { TML_CONFIG: join(tb.dir, "tml.json"), TML_SERVER: "", TML_TOKEN: "", NO_COLOR: "1" };
  return runBash(script, { cwd: REPO, env: { ...process.env, ...tml, ...env } });
}

/** The fenced block of the README that follows `marker`. */
function blockAfter(marker: string): string {
  const at = readme.indexOf(marker);
  expect(at).toBeGreaterThan(-1);
  return /```\n([\s\S]*?)```/.exec(readme.slice(at))![1];
}

beforeAll(async () => {
  readme = await readFile(README, "utf8");
  tb = await startTestbed({ supervisors: 2 });
}, 180_000);

afterAll(async () => {
  await tb?.stop();
}, 60_000);

describe("the README's quick start", () => {
  it("shows the banner npm start prints, on the default ports", () => {
    let printed = banner(tb.testbed);
    tb.testbed.servers().forEach((server, i) => {
      printed = printed.replaceAll(server.url, `http://127.0.0.1:${7700 + i}`);
    });
    printed = printed.replaceAll(tb.testbed.admin().passwordFile.replace(`${process.cwd()}/`, ""), ".treadmill/admin-password");
    expect(blockAfter("three commands to try in another\nterminal:").trim()).toBe(printed.trim());
  });

  it("runs the banner's commands as printed, and tml job run prints what the README's sample shows", async () => {
    const tryIt = banner(tb.testbed)
      .split("\n")
      .filter((line) => line.startsWith("  npx tml ") && !line.includes("tml console"))
      .map((line) => line.trim().replace(/\s+#.*$/, ""));
    expect(tryIt).toHaveLength(3);
    const login = await bash(tryIt[0]);
    const hello = await bash(tryIt[1]);
    const blinky = await bash(tryIt[2]);
    expect(login.stdout).toContain("Logged in to");
    expect(login.code).toBe(0);
    expect(blinky.stdout).toContain("blinky booted");
    expect(blinky.code).toBe(0);
    expect(hello.code).toBe(0);

    // Every line of the sample, ids and host names aside, is one tml printed;
    // of the passing states, tml prints those its watch saw (a quick one may pass unseen).
    const normal = (text: string) =>
      text
        .replace(/\r\n/g, "\n")
        .replace(/job [0-9a-f-]{36}/g, "job ID")
        .replace(/on host \S+/g, "on host HOST")
        .split("\n")
        .filter((line) => line !== "");
    const sample = normal(blockAfter("and exits\nwith the job's status:")).filter((line) => !line.startsWith("$ "));
    const printed = normal(hello.stderr + hello.stdout);
    const passing = /^--> (queued|assigned|running|terminating|initializing \((fetching-image|allocating|provisioning|booting)\))$/;
    expect(sample.filter((line) => !printed.includes(line) && !passing.test(line))).toEqual([]);
    expect(sample.filter((line) => passing.test(line))).toHaveLength(7);
  }, 120_000);
});

describe("the README's calls by hand", () => {
  it("runs the block as it is written: reflection, login, a host, a job watched to its end, Connect and metrics", async () => {
    const block = docBlock(await docBlocks(README), README, "readme", "by-hand").text;
    const result = await bash(`set -e\n${block}`, { C: tb.coordinatorUrl, PASSWORD_FILE: tb.testbed.admin().passwordFile });
    expect(result.code).toBe(0);
    expect(result.stdout).toContain("treadmill.coordinator.v1.JobService\n");
    expect(result.stdout).toContain("treadmill.coordinator.v1.JobService/SubmitJob\n");
    expect(result.stdout).toMatch(/"credential": "tmh_/);
    expect(result.stdout).toContain('"state": "JOB_STATE_FINALIZED"');
    expect(result.stdout).toContain('{"status":"SERVING"}');
    expect(result.stdout).toMatch(/^# HELP /m);
  }, 180_000);
});
