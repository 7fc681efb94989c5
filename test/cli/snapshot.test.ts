import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { join } from "node:path";
import { busyboxRootfs, eventually, startWorld, tml, type CliWorld } from "./harness.js";

let world: CliWorld;
let config: string;

beforeAll(async () => {
  world = await startWorld();
  await world.startStores();
  await world.startSupervisor("snap-runner");
  config = await world.adminConfig();
  const root = await busyboxRootfs(join(world.dir, "rootfs"), ["sh", "sleep"], ["tmp", "data"]);
  const push = await tml(config, ["image", "push", root, "--name", "cli/sh:1", "--entrypoint", '["/bin/sh","-c","eval \\"$TREADMILL_PARAM_script\\""]']);
  expect(push.code).toBe(0);
}, 120_000);

afterAll(async () => {
  await world?.stop();
}, 60_000);

describe("tml job snapshot", () => {
  it("snapshots a running job with --wait, showing progress, and the image runs with its files", async () => {
    const run = await tml(config, ["job", "run", "cli/sh:1", "--detach", "--param", "script=echo kept-by-snapshot > /data/kept; echo ready; sleep 120"]);
    expect(run.code).toBe(0);
    const jobId = run.stdout.trim();
    await eventually("the job to say ready", async () => (await tml(config, ["job", "logs", jobId!])).stdout.includes("ready"));

    const snap = await tml(config, ["job", "snapshot", jobId!, "cli/snap:1", "--wait"]);
    expect(snap.stderr).toMatch(/--> uploading 100%/);
    expect(snap.stdout).toContain(`Job ${jobId} is now image cli/snap:1`);
    expect(snap.code).toBe(0);
    // The name is taken now: a conflict (exit 6) with one sentence.
    const again = await tml(config, ["job", "snapshot", jobId!, "cli/snap:1"]);
    expect(again.code).toBe(6);
    expect(again.stderr).toContain("cli/snap:1 already exists");

    await tml(config, ["job", "cancel", jobId!, "--wait"]);
    const check = await tml(config, ["job", "run", "cli/snap:1", "--param", "script=read line < /data/kept; echo got:$line"]);
    expect(check.stdout).toContain("got:kept-by-snapshot");
    expect(check.code).toBe(0);
    // A finished job cannot be snapshotted (exit 6); a bad name is the user's mistake (exit 2).
    expect((await tml(config, ["job", "snapshot", jobId!, "cli/snap:2"])).code).toBe(6);
    expect((await tml(config, ["job", "snapshot", jobId!, "Bad Name:1"])).code).toBe(2);
    expect((await tml(config, ["job", "snapshot", jobId!])).code).toBe(2);
  }, 180_000);
});
