/**
 * `tml reserve` and `tml lease` against a real coordinator (its lease
 * keeper sweeping every 100 ms, grace periods down to 200 ms) with an image
 * store, a log server and two process-driver supervisors: lab-1 (pool=lab)
 * and lab-2 (pool=solo). The holder is the admin unless a test says bob, a
 * plain user (the policy's limits apply to him: at most 3 hours a lease).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { join } from "node:path";
import { startTestCoordinator } from "../support/coordinator.js";
import { busyboxRootfs, eventually, spawnTml, startTml, startWorld, tml, type CliWorld } from "./harness.js";

const POLICY = {
  leaseGraceMinMs: 200,
  leaseSweepIntervalMs: 100,
  leaseKeepaliveIntervalMs: 100,
  leaseMaxDurationMs: 3 * 3_600_000,
};

let world: CliWorld;
let admin: string;
let bob: { env: Record<string, string> };
const hostIds: Record<string, string> = {};

/** `tml args...` as bob. */
const asBob = (args: string[]) => tml("/nonexistent/bob.json", args, bob);

/** The id on the line `--> lease ID: ...` that `tml reserve` starts with. */
const leaseIdOf = (lines: string[]) => /--> lease (\S+):/.exec(lines.join("\n"))![1];

async function leaseRow(id: string) {
  const [row] = await world.coordinator.sql<{ state: string; end_reason: string | null; ended_at: Date | null; keepalive_at: Date }[]>`
    select state, end_reason, ended_at, keepalive_at from leases where id = ${id}`;
  return row;
}

async function jobRow(id: string) {
  const [row] = await world.coordinator.sql<{ state: string; reason: string | null; exit_status: string | null; assigned_at: Date | null }[]>`
    select state, reason, exit_status, assigned_at from jobs where id = ${id}`;
  return row;
}

/** Releases `ids` (as the admin), whatever a test's assertions did: the next test needs the hosts free. */
async function releaseAll(...ids: string[]): Promise<void> {
  for (const id of ids) if (id) await tml(admin, ["lease", "release", id]);
}

const ended = (id: string, reason: string) => eventually(`lease ${id} ended ${reason}`, async () => (await leaseRow(id)).end_reason === reason, 30_000);

beforeAll(async () => {
  world = await startWorld({ coordinatorConfig: POLICY });
  await world.startStores();
  hostIds["lab-1"] = (await world.startSupervisor("lab-1", { pool: "lab" })).hostId;
  hostIds["lab-2"] = (await world.startSupervisor("lab-2", { pool: "solo" })).hostId;
  admin = await world.adminConfig("admin");
  const rootfs = await busyboxRootfs(join(world.dir, "echo-rootfs"), ["sh", "echo", "sleep"]);
  const pushed = await tml(admin, ["image", "push", rootfs, "--name", "test/echo:1", "--public", "--entrypoint", 'sh -c "echo ran-$TREADMILL_PARAM_TAG; sleep ${TREADMILL_PARAM_SLEEP:-0}"']);
  if (pushed.code !== 0) throw new Error(`pushing test/echo failed: ${pushed.stderr}`);
  const user = await world.coordinator.createUser({ name: "bob" });
  bob = { env: { TML_SERVER: world.url, TML_TOKEN: user.token } };
}, 180_000);

afterAll(async () => {
  await world?.stop();
}, 60_000);

describe("tml reserve in the foreground", () => {
  it("holds the lease, says how to use it, runs jobs inside it with --lease, and releases it on Ctrl-C, canceling its jobs", async () => {
    const reserve = startTml(admin, ["reserve", "--tag", "pool=lab", "--for", "1h", "--grace", "2s"]);
    await reserve.waitForLine(/--> active on lab-1 until /);
    const id = leaseIdOf(reserve.lines);
    expect(reserve.lines).toContainEqual(`--> run jobs in it:   tml job run --lease ${id} IMAGE`);
    expect(reserve.lines).toContainEqual(expect.stringContaining(`--> release it:       Ctrl-C here, or tml lease release ${id}`));

    const job = await tml(admin, ["job", "run", "--lease", id, "test/echo:1", "--param", "TAG=inside"]);
    expect(job.stdout).toContain("ran-inside");
    expect(job.code).toBe(0);
    const sleeper = (await tml(admin, ["job", "run", "--detach", "--lease", id, "test/echo:1", "--param", "SLEEP=600"])).stdout.trim();
    await eventually("the long job running in the lease", async () => (await jobRow(sleeper)).state === "running");
    expect((await tml(admin, ["job", "get", sleeper])).stdout).toMatch(new RegExp(`^Lease:\\s+${id}$`, "m"));
    const get = await tml(admin, ["lease", "get", id]);
    expect(get.stdout).toMatch(/^State:\s+active$/m);
    expect(get.stdout).toMatch(new RegExp(`^lab-1\\s+${sleeper}$`, "m"));
    expect(get.stdout).toMatch(/^TIME\s+EVENT\s+STATE\s+MESSAGE$/m);

    reserve.interrupt();
    const result = await reserve.result;
    expect(result.stderr).toContain(`--> lease ${id} ended: released by admin`);
    expect(result.code).toBe(0);
    expect((await leaseRow(id)).end_reason).toBe("released");
    await eventually("the job inside the lease canceled", async () => {
      const row = await jobRow(sleeper);
      return row.state === "finalized" && row.reason === "canceled";
    });
    const [host] = await world.coordinator.sql`select lease_id from hosts where id = ${hostIds["lab-1"]}`;
    expect(host.lease_id).toBeNull();
  }, 120_000);

  it("killed (SIGKILL), leaves its lease to end lost after the grace period, and the queued job waiting for the host gets it then", async () => {
    const reserve = spawnTml(admin, ["reserve", "--tag", "pool=lab", "--for", "1h", "--grace", "2s"]);
    await reserve.waitForLine(/--> active on lab-1 until /);
    const id = leaseIdOf(reserve.lines);
    const queued = await asBob(["job", "run", "--detach", "--tag", "pool=lab", "test/echo:1", "--param", "TAG=after"]);
    expect(queued.code).toBe(0);
    const jobId = queued.stdout.trim();
    expect((await jobRow(jobId)).state).toBe("queued");
    const killedAt = Date.now();
    reserve.child.kill("SIGKILL");
    await ended(id, "lost");
    const lease = await leaseRow(id);
    // The grace period counts from the last keepalive, which the killed tml sent at most 100 ms before.
    expect(lease.ended_at!.getTime() - killedAt).toBeGreaterThanOrEqual(1500);
    await eventually("bob's job to run once the lease is lost", async () => (await jobRow(jobId)).exit_status === "success");
    expect((await jobRow(jobId)).assigned_at!.getTime()).toBeGreaterThanOrEqual(lease.ended_at!.getTime());
  }, 120_000);

  it("shows its holder an admin's revocation with the reason, and exits 3", async () => {
    const reserve = startTml("/nonexistent/bob.json", ["reserve", "--tag", "pool=solo", "--for", "30m"], bob);
    await reserve.waitForLine(/--> active on lab-2 until /);
    const id = leaseIdOf(reserve.lines);
    const all = await tml(admin, ["lease", "list", "--all", "--state", "active"]);
    expect(all.stdout).toMatch(new RegExp(`^${id}\\s+bob\\s+active\\s+lab-2\\s`, "m"));
    const revoked = await tml(admin, ["lease", "revoke", id, "--reason", "rack maintenance"]);
    expect(revoked.stdout).toContain(`Lease ${id} ended: revoked by admin admin: rack maintenance`);
    const result = await reserve.result;
    expect(result.stderr).toContain(`--> lease ${id} ended: revoked by admin admin: rack maintenance`);
    expect(result.code).toBe(3);
    const mine = await asBob(["lease", "list"]);
    expect(mine.stdout).toMatch(new RegExp(`^${id}\\s+ended \\(revoked\\)\\s+lab-2\\s`, "m"));
  }, 60_000);
});

describe("tml reserve with two coordinator replicas", () => {
  it("keeps its lease when the replica it holds it through stops: the keepalive resumes on the next, past the grace period", async () => {
    const replica = await startTestCoordinator({ db: world.coordinator.db, config: { ...POLICY, host: "127.0.0.1" }, logServer: false });
    const env = { TML_SERVER: `${replica.url},${world.url}`, TML_TOKEN: world.adminToken };
    const reserve = startTml("/nonexistent/replicas.json", ["reserve", "--tag", "pool=solo", "--for", "1h", "--grace", "1s"], { env });
    let id = "";
    try {
      await reserve.waitForLine(/--> active on lab-2 until /);
      id = leaseIdOf(reserve.lines);
      const stoppedAt = Date.now();
      await replica.stop();
      await reserve.waitForLine(/--> lost the coordinator \(.*\); reconnecting: the lease lasts 1s without a keepalive/);
      // Renewed through the other replica after a whole grace period from the loss: never lost meanwhile.
      await eventually("the keepalive to resume on the other replica", async () => (await leaseRow(id)).keepalive_at.getTime() > stoppedAt + 1000, 30_000);
      expect((await leaseRow(id)).state).toBe("active");
      reserve.interrupt();
      const result = await reserve.result;
      expect(result.stderr).toContain(`--> lease ${id} ended: released by admin`);
      expect(result.code).toBe(0);
    } finally {
      await releaseAll(id);
    }
  }, 60_000);
});

describe("tml lease", () => {
  it("extends within policy, and refuses past a booking of its host or past the policy saying the latest end it could have", async () => {
    const mine = await asBob(["reserve", "--detach", "--wait", "--tag", "pool=solo", "--for", "1h", "--grace", "10m"]);
    expect(mine.code).toBe(0);
    const id = mine.stdout.trim();
    const ahead = await tml(admin, ["reserve", "--detach", "--host", "lab-2", "--at", "+2h", "--for", "1h"]);
    expect(ahead.code).toBe(0);
    const booking = ahead.stdout.trim();

    try {
      const extended = await asBob(["lease", "extend", id, "--by", "30m"]);
      expect(extended.stdout).toMatch(new RegExp(`^Lease ${id} now ends at \\S+ \\S+ \\(in 1h30m\\)\\.$`, "m"));
      const overlapping = await asBob(["lease", "extend", id, "--by", "1h"]);
      expect(overlapping.code).toBe(6);
      expect(overlapping.stderr).toMatch(new RegExp(`Lease ${id} cannot end later than \\S+ \\S+ \\(host lab-2 is booked from \\S+\\): extend it by at most 30m\\.`));
      const pastPolicy = await asBob(["lease", "extend", id, "--by", "5h"]);
      expect(pastPolicy.code).toBe(3);
      expect(pastPolicy.stderr).toMatch(/cannot end later than \S+ \S+ \(lease policy: at most 3h from its start\): extend it by at most 1h30m\./);
    } finally {
      await releaseAll(id, booking);
    }
  }, 60_000);

  it("is another user's to neither read, renew, extend, release nor run jobs in", async () => {
    const created = await tml(admin, ["reserve", "--detach", "--tag", "pool=solo", "--for", "30m", "--grace", "10m"]);
    const id = created.stdout.trim();
    try {
      for (const args of [
        ["lease", "get", id],
        ["lease", "renew", id],
        ["lease", "extend", id, "--by", "10m"],
        ["lease", "release", id],
        ["console", "--lease", id],
      ]) {
        const result = await asBob(args);
        expect({ args, code: result.code }).toEqual({ args, code: 5 });
        expect(result.stderr).toMatch(/not found/i);
      }
      const job = await asBob(["job", "run", "--detach", "--lease", id, "test/echo:1"]);
      expect(job.code).not.toBe(0);
      expect((await leaseRow(id)).state).not.toBe("ended");
    } finally {
      await releaseAll(id);
    }
  }, 60_000);

  it("renew keeps a detached lease alive, and exits 6 once the lease has ended, which ends a CI renew loop", async () => {
    const created = await tml(admin, ["reserve", "--detach", "--wait", "--tag", "pool=solo", "--for", "30m", "--grace", "10m"]);
    const id = created.stdout.trim();
    expect(created.stderr).toContain(`Lease ${id} is active. Renew it at least every 10m (\`tml lease renew ${id}\`)`);
    const before = (await leaseRow(id)).keepalive_at.getTime();
    const renewed = await tml(admin, ["lease", "renew", id]);
    expect(renewed.stdout).toMatch(new RegExp(`^Lease ${id} renewed \\(active\\); without another keepalive it ends at \\S+ \\S+ \\(in 10m\\)\\.$`, "m"));
    expect((await leaseRow(id)).keepalive_at.getTime()).toBeGreaterThan(before);
    const released = await tml(admin, ["lease", "release", id]);
    expect(released.stdout).toContain(`Lease ${id} ended: released by admin`);
    const after = await tml(admin, ["lease", "renew", id]);
    expect(after.code).toBe(6);
    expect(after.stderr).toContain("has ended (released");
  }, 60_000);

  it("provisions a lease reserved with --image with a session job running that image and its parameters", async () => {
    const created = await tml(admin, ["reserve", "--detach", "--wait", "--tag", "pool=solo", "--for", "30m", "--grace", "10m", "--image", "test/echo:1", "--param", "SLEEP=600", "--param", "TAG=session"]);
    expect(created.code).toBe(0);
    const id = created.stdout.trim();
    try {
      let session = "";
      await eventually("the session job running in the lease", async () => {
        const lease = JSON.parse((await tml(admin, ["lease", "get", id, "-o", "json"])).stdout) as { leaseHosts: { jobId: string }[] };
        session = lease.leaseHosts[0]?.jobId ?? "";
        return session !== "" && (await jobRow(session)).state === "running";
      });
      const get = await tml(admin, ["lease", "get", id]);
      expect(get.stdout).toMatch(/^Image:\s+test\/echo:1 \(sha256:[0-9a-f]{64}\)$/m);
      expect(get.stdout).toMatch(new RegExp(`^lab-2\\s+${session}$`, "m"));
      const job = await tml(admin, ["job", "get", session]);
      expect(job.stdout).toMatch(/^Parameters:\s+.*SLEEP=600/m);
      expect(job.stdout).toMatch(new RegExp(`^Lease:\\s+${id}$`, "m"));
      await releaseAll(id);
      await eventually("the session job canceled with its lease", async () => (await jobRow(session)).reason === "canceled");
    } finally {
      await releaseAll(id);
    }
  }, 60_000);

  it("says that no job runs in a lease for its console, and draws the lease on the calendar", async () => {
    const created = await tml(admin, ["reserve", "--detach", "--wait", "--tag", "pool=solo", "--for", "2h", "--grace", "10m"]);
    const id = created.stdout.trim();
    try {
      const console = await tml(admin, ["console", "--lease", id]);
      expect(console.code).toBe(6);
      expect(console.stderr).toContain(`No job runs on any host of lease ${id} now: start one with \`tml job run --lease ${id} IMAGE\``);
      const elsewhere = await tml(admin, ["console", "--lease", id, "--host", "lab-1"]);
      expect(elsewhere.code).toBe(2);
      expect(elsewhere.stderr).toContain(`Host lab-1 is not one of lease ${id}'s hosts (lab-2)`);

      const calendar = await tml(admin, ["lease", "list", "--calendar", "--tag", "pool=solo", "--hours", "6"]);
      expect(calendar.code).toBe(0);
      // 6 hours at 15 minutes a column: the 2 hours of the lease are its first 8 or 9 columns.
      expect(calendar.stdout).toMatch(/^lab-2 {2}#{8,9}\.{15,16}$/m);
      expect(calendar.stdout).toMatch(new RegExp(`^lab-2\\s+lease\\s+${id}\\s+admin\\s`, "m"));
      const json = JSON.parse((await tml(admin, ["lease", "list", "--calendar", "--tag", "pool=solo", "-o", "json"])).stdout) as { hosts: { hostName: string; entries: { id: string }[] }[] };
      expect(json.hosts.map((h) => h.hostName)).toEqual(["lab-2"]);
      expect(json.hosts[0].entries.map((e) => e.id)).toContain(id);
    } finally {
      await releaseAll(id);
    }
  }, 60_000);
});
