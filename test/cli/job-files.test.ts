/**
 * Job files, re-runs and retries (issue #23, items 4 and 5) through `tml`
 * against a real coordinator with an image store, a log server and two
 * process-driver supervisors, lab-1 and lab-2 (both pool=lab). The image
 * test/sh:1 runs its `script` parameter with sh.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { busyboxRootfs, eventually, startWorld, tml, type CliWorld } from "./harness.js";

let world: CliWorld;
let admin: string;
const hostIds: Record<string, string> = {};

interface JobJson {
  id: string;
  state: string;
  attempt: number;
  exitStatus?: string;
  flaky?: boolean;
  spec: { tags?: Record<string, string>; parameters?: { name: string; value?: string; secret?: boolean }[] };
  rerunOfJobId?: string;
  rerunJobIds?: string[];
  timeline?: { kind: string; message: string; attempt: number; hostId?: string }[];
}

async function getJob(id: string): Promise<JobJson> {
  const got = await tml(admin, ["job", "get", id, "-o", "json"]);
  if (got.code !== 0) throw new Error(`tml job get ${id} exited ${got.code}: ${got.stderr}`);
  return JSON.parse(got.stdout) as JobJson;
}

async function file(name: string, text: string): Promise<string> {
  const path = join(world.dir, name);
  await writeFile(path, text);
  return path;
}

/** The host of each attempt of a job, from job_hosts. */
async function attemptHosts(jobId: string): Promise<Map<number, string>> {
  const rows = await world.coordinator.sql<{ attempt: number; host_id: string }[]>`
    select attempt, host_id from job_hosts where job_id = ${jobId} order by attempt`;
  return new Map(rows.map((r) => [r.attempt, r.host_id]));
}

beforeAll(async () => {
  world = await startWorld();
  await world.startStores();
  hostIds["lab-1"] = (await world.startSupervisor("lab-1", { pool: "lab" })).hostId;
  hostIds["lab-2"] = (await world.startSupervisor("lab-2", { pool: "lab" })).hostId;
  admin = await world.adminConfig("admin");
  const rootfs = await busyboxRootfs(join(world.dir, "sh-rootfs"), ["sh", "echo", "test", "cat", "sleep"]);
  const pushed = await tml(admin, ["image", "push", rootfs, "--name", "test/sh:1", "--public", "--entrypoint", 'eval "$TREADMILL_PARAM_script"']);
  if (pushed.code !== 0) throw new Error(`pushing test/sh failed: ${pushed.stderr}`);
}, 180_000);

afterAll(async () => {
  await world?.stop();
}, 60_000);

describe("tml job run -f", () => {
  it("submits one job per combination of a 2x2 matrix with variables, follows them together and exits 1 when one fails", async () => {
    const path = await file(
      "matrix.yaml",
      [
        "image: test/sh:${tag}",
        "description: ${suite} on ${board}",
        "hosts: {tags: {pool: lab}}",
        "variables: {tag: '1'}",
        "labels: {commit: '${commit}'}",
        "matrix:",
        "  board: [a, b]",
        "  suite: [smoke, full]",
        "parameters:",
        '  script: echo "${suite} on ${board}"; test "${board}/${suite}" != b/full',
        "",
      ].join("\n"),
    );
    const run = await tml(admin, ["job", "run", "-f", path, "--set", "commit=abc123"]);
    expect(run.code).toBe(1);
    const finals = run.stdout.trim().split("\n");
    expect(finals).toHaveLength(4);
    for (const [combo, outcome] of [
      ["board=a suite=smoke", "succeeded"],
      ["board=a suite=full", "succeeded"],
      ["board=b suite=smoke", "succeeded"],
      ["board=b suite=full", "failed"],
    ]) {
      expect(finals).toContainEqual(expect.stringMatching(new RegExp(`^${combo}\\s+[0-9a-f-]{36}\\s+${outcome}`)));
    }
    // A line per job as it went, on stderr.
    expect(run.stderr).toMatch(/--> board=b suite=full\s+\S+\s+submitted/);
    expect(run.stderr).toContain("1 of 4 jobs did not succeed.");
    // The matrix keys are labels, with the file's own.
    const listed = await tml(admin, ["job", "list", "--label", "commit=abc123", "--label", "board=b", "-o", "json"]);
    const jobs = JSON.parse(listed.stdout) as JobJson[];
    expect(jobs.map((j) => j.spec.tags).sort((x, y) => x!.suite.localeCompare(y!.suite))).toEqual([
      { commit: "abc123", board: "b", suite: "full" },
      { commit: "abc123", board: "b", suite: "smoke" },
    ]);
  }, 120_000);

  it("exits 0 when every job of the matrix succeeds", async () => {
    const path = await file("ok.yaml", "image: test/sh:1\nhosts: {tags: {pool: lab}}\nmatrix: {n: [1, 2]}\nparameters: {script: 'echo job ${n}'}\n");
    const run = await tml(admin, ["job", "run", "-f", path]);
    expect({ code: run.code, stderr: run.code === 0 ? "" : run.stderr }).toEqual({ code: 0, stderr: "" });
    expect(run.stdout).toMatch(/^n=1\s+\S+\s+succeeded/m);
  }, 60_000);

  it("prints data as tml job run does: one job as an object, a matrix's jobs as a list", async () => {
    const one = await tml(admin, ["job", "run", "-f", await file("one.yaml", "image: test/sh:1\nhosts: {tags: {pool: lab}}\nparameters: {script: 'true'}\n"), "--detach", "-o", "json"]);
    expect((JSON.parse(one.stdout) as JobJson).id).toMatch(/^[0-9a-f-]{36}$/);
    const path = await file("two.yaml", "image: test/sh:1\nhosts: {tags: {pool: lab}}\nmatrix: {n: [1, 2]}\nparameters: {script: 'exit ${n}'}\n");
    const two = await tml(admin, ["job", "run", "-f", path, "-o", "json"]);
    expect(two.code).toBe(1);
    const jobs = JSON.parse(two.stdout) as JobJson[];
    expect(jobs.map((j) => [j.spec.tags, j.state, j.exitStatus])).toEqual([
      [{ n: "1" }, "JOB_STATE_FINALIZED", "EXIT_STATUS_FAILURE"],
      [{ n: "2" }, "JOB_STATE_FINALIZED", "EXIT_STATUS_FAILURE"],
    ]);
  }, 60_000);

  it("refuses a file with an undefined variable, naming it and its line, and submits nothing", async () => {
    const path = await file("bad.yaml", "image: test/sh:1\nparameters:\n  script: echo ${nope}\n");
    const before = (await world.coordinator.sql<{ n: number }[]>`select count(*)::int as n from jobs`)[0].n;
    const run = await tml(admin, ["job", "run", "-f", path]);
    expect(run.code).toBe(2);
    expect(run.stderr).toContain(`In ${path}:3: parameters.script: variable \${nope} is not defined`);
    const bad = await tml(admin, ["job", "run", "-f", await file("bad2.yaml", "image: test/sh:1\nhosts:\n  count: two\n")]);
    expect(bad.stderr).toContain("bad2.yaml:3: hosts.count: expected an integer");
    expect((await world.coordinator.sql<{ n: number }[]>`select count(*)::int as n from jobs`)[0].n).toBe(before);
  });
});

describe("tml job get -o yaml", () => {
  it("prints a job as a file that tml job run -f submits again as the same spec, secrets as placeholders", async () => {
    const run = await tml(admin, [
      "job",
      "run",
      "--detach",
      "test/sh:1",
      "--tag",
      "pool=lab",
      "--param",
      "script=echo saved ${x} $TREADMILL_PARAM_N",
      "--param",
      "N=7",
      "--secret",
      "TOKEN=hunter2",
      "--label",
      "ci=pr-9",
      "--description",
      "saved job",
      "--timeout",
      "5m",
      "--restarts",
      "1",
      "--expose",
      "web=8080",
    ]);
    expect(run.code).toBe(0);
    const id = run.stdout.trim();
    const yaml = await tml(admin, ["job", "get", id, "-o", "yaml"]);
    expect(yaml.code).toBe(0);
    expect(yaml.stdout).not.toContain("hunter2");
    expect(yaml.stdout).toContain("TOKEN: ${secret:TOKEN}");
    expect(yaml.stdout).toContain("secret values are not shown");
    // A literal ${ in a value is escaped, not read as a variable.
    expect(yaml.stdout).toContain("echo saved $${x} $TREADMILL_PARAM_N");
    const saved = await file("saved.yaml", yaml.stdout);

    const missing = await tml(admin, ["job", "run", "-f", saved, "--detach"]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toContain("secret TOKEN has no value: give it with --secret TOKEN=VALUE");

    const again = await tml(admin, ["job", "run", "-f", saved, "--detach", "--secret", "TOKEN=hunter2"]);
    expect(again.code).toBe(0);
    const [a, b] = await Promise.all([getJob(id), getJob(again.stdout.trim())]);
    expect(b.spec).toEqual(a.spec);
    const secrets = await world.coordinator.sql<{ value: string }[]>`select value from job_secrets where job_id = ${b.id}`;
    expect(secrets.map((s) => s.value)).toEqual(["hunter2"]);
  }, 60_000);
});

describe("tml job rerun", () => {
  it("runs a job again with its spec and kept secret, a parameter changed, linked both ways with a RERUN event on each", async () => {
    const first = await tml(admin, [
      "job",
      "run",
      "test/sh:1",
      "--tag",
      "pool=lab",
      "--param",
      'script=echo "suite=$TREADMILL_PARAM_SUITE secret=$(cat $TREADMILL_SECRETS_DIR/KEY)"',
      "--param",
      "SUITE=smoke",
      "--secret",
      "KEY=s3cret",
    ]);
    expect(first.code).toBe(0);
    expect(first.stdout).toContain("suite=smoke secret=s3cret");
    const oldId = /--> job (\S+) submitted/.exec(first.stderr)![1];

    const rerun = await tml(admin, ["job", "rerun", oldId, "--set", "SUITE=full", "--follow"]);
    expect({ code: rerun.code, stderr: rerun.code === 0 ? "" : rerun.stderr }).toMatchObject({ code: 0 });
    // The secret value was kept on the coordinator and reached the new job's workload.
    expect(rerun.stdout).toContain("suite=full secret=s3cret");
    const newId = /--> job (\S+) re-runs job/.exec(rerun.stderr)![1];

    const [old, next] = await Promise.all([getJob(oldId), getJob(newId)]);
    expect(next.rerunOfJobId).toBe(oldId);
    expect(old.rerunJobIds).toEqual([newId]);
    expect(old.timeline!.filter((e) => e.kind === "JOB_EVENT_KIND_RERUN").map((e) => e.message)).toEqual([`re-run as job ${newId} by admin`]);
    expect(next.timeline!.filter((e) => e.kind === "JOB_EVENT_KIND_RERUN").map((e) => e.message)).toEqual([`re-runs job ${oldId}`]);
    expect(next.spec.parameters).toEqual(
      old.spec.parameters!.map((p) => (p.name === "SUITE" ? { ...p, value: "full" } : p)),
    );
    // Never the secret's value in an answer.
    expect(JSON.stringify([old, next])).not.toContain("s3cret");
  }, 90_000);

  it("refuses a re-run of a job whose image is gone from the catalog, saying so", async () => {
    const rootfs = await busyboxRootfs(join(world.dir, "gone-rootfs"), ["sh"]);
    expect((await tml(admin, ["image", "push", rootfs, "--name", "test/gone:1", "--entrypoint", "true"])).code).toBe(0);
    const run = await tml(admin, ["job", "run", "test/gone:1", "--tag", "pool=lab"]);
    expect(run.code).toBe(0);
    const id = /--> job (\S+) submitted/.exec(run.stderr)![1];
    expect((await tml(admin, ["image", "rm", "test/gone:1"])).code).toBe(0);
    const rerun = await tml(admin, ["job", "rerun", id]);
    expect(rerun.code).toBe(5);
    expect(rerun.stderr).toMatch(new RegExp(`image test/gone:1 \\(sha256:[0-9a-f]{64}\\) of job ${id} is no longer in the catalog`));
  }, 60_000);

  it("does not hand another user's secret values to an admin's re-run: the admin gives them again", async () => {
    const dave = await world.coordinator.createUser({ name: "dave" });
    const asDave = { env: { TML_SERVER: world.url, TML_TOKEN: dave.token } };
    const run = await tml("/nonexistent/dave.json", ["job", "run", "--detach", "test/sh:1", "--tag", "pool=lab", "--param", "script=true", "--secret", "KEY=daves"], asDave);
    expect(run.code).toBe(0);
    const id = run.stdout.trim();
    const refused = await tml(admin, ["job", "rerun", id]);
    expect(refused.code).toBe(6);
    expect(refused.stderr).toContain(`Not possible now: the value of secret parameter KEY of job ${id} is its owner's: give it again in parameters.`);
    const given = await tml(admin, ["job", "rerun", id, "--secret", "KEY=admins"]);
    expect(given.code).toBe(0);
    const [secret] = await world.coordinator.sql<{ value: string }[]>`select value from job_secrets where job_id = ${given.stdout.trim()}`;
    expect(secret.value).toBe("admins");
    // Dave re-runs his own with his kept value.
    const own = await tml("/nonexistent/dave.json", ["job", "rerun", id], asDave);
    expect(own.code).toBe(0);
    const [kept] = await world.coordinator.sql<{ value: string }[]>`select value from job_secrets where job_id = ${own.stdout.trim()}`;
    expect(kept.value).toBe("daves");
  }, 60_000);

  it("refuses another user's job as CancelJob does", async () => {
    const run = await tml(admin, ["job", "run", "--detach", "test/sh:1", "--tag", "pool=lab", "--param", "script=true"]);
    const user = await world.coordinator.createUser({ name: "carol" });
    const denied = await tml("/nonexistent/carol.json", ["job", "rerun", run.stdout.trim()], { env: { TML_SERVER: world.url, TML_TOKEN: user.token } });
    expect(denied.code).toBe(4);
    expect(denied.stderr).toContain("belongs to another user");
  }, 60_000);
});

describe("retries", () => {
  it("retries a failed workload on the other host, with a RETRIED event naming the attempt, the cause and the host", async () => {
    const path = await file(
      "retry.yaml",
      [
        "image: test/sh:1",
        "hosts: {tags: {pool: lab}}",
        "retry: {on: [workload-failure], max: 1, other_host: true}",
        "parameters:",
        '  script: echo "attempt $TREADMILL_ATTEMPT"; test "$TREADMILL_ATTEMPT" -ge 2',
        "",
      ].join("\n"),
    );
    const run = await tml(admin, ["job", "run", "-f", path]);
    expect({ code: run.code, stderr: run.code === 0 ? "" : run.stderr }).toMatchObject({ code: 0 });
    expect(run.stdout).toContain("attempt 2");
    const id = /--> job (\S+) submitted/.exec(run.stderr)![1];
    expect((await tml(admin, ["job", "get", id])).stdout).toMatch(/^Retry:\s+workload-failure: up to 1, on another host$/m);
    const job = await getJob(id);
    expect(job.attempt).toBe(2);
    expect(job.exitStatus).toBe("EXIT_STATUS_SUCCESS");
    // A failure a retry made good is a flaky job.
    expect(job.flaky).toBe(true);
    const hosts = await attemptHosts(id);
    expect(hosts.size).toBe(2);
    expect(hosts.get(2)).not.toBe(hosts.get(1));
    const retried = job.timeline!.filter((e) => e.kind === "JOB_EVENT_KIND_RETRIED");
    expect(retried).toHaveLength(1);
    expect(retried[0].attempt).toBe(2);
    expect(retried[0].hostId).toBe(hosts.get(1));
    expect(retried[0].message).toContain(`on host ${Object.keys(hostIds).find((name) => hostIds[name] === hosts.get(1))} `);
    expect(retried[0].message).toMatch(
      new RegExp(`^attempt 1 ended workload_exited on host lab-[12] \\(workload failure\\): .*retrying as attempt 2 on another host \\(0 workload failure retries left\\)$`),
    );
  }, 90_000);

  it("stops retrying once the condition's budget is spent, and the restart policy's budget is not used for it", async () => {
    const path = await file(
      "budget.yaml",
      "image: test/sh:1\nhosts: {tags: {pool: lab}}\nrestarts: 3\nretry: {on: [workload-failure], max: 2}\nparameters: {script: 'exit 3'}\n",
    );
    const run = await tml(admin, ["job", "run", "-f", path]);
    expect(run.code).toBe(1);
    const id = /--> job (\S+) submitted/.exec(run.stderr)![1];
    const job = await getJob(id);
    // Two retries, then the third failure finalizes: a workload failure is never restarted.
    expect(job.attempt).toBe(3);
    expect(job.exitStatus).toBe("EXIT_STATUS_FAILURE");
    expect(job.flaky ?? false).toBe(false);
    expect(job.timeline!.filter((e) => e.kind === "JOB_EVENT_KIND_RETRIED").map((e) => e.attempt)).toEqual([2, 3]);
    expect(job.timeline!.filter((e) => e.kind === "JOB_EVENT_KIND_RESTARTED")).toEqual([]);
    const [row] = await world.coordinator.sql<{ retries: Record<string, number> }[]>`select retries from jobs where id = ${id}`;
    expect(row.retries).toEqual({ workload_failure: 2 });
  }, 90_000);

  it("waits in the queue for another host when the only other one is busy, then runs there", async () => {
    // lab-2 busy with a long job: the retry (other_host) of a job that failed on lab-1 waits for it.
    const blocker = await tml(admin, ["job", "run", "--detach", "test/sh:1", "--tag", "pool=lab", "--param", "script=sleep 600"]);
    const blockerId = blocker.stdout.trim();
    await eventually("the blocker running", async () => (await getJob(blockerId)).state === "JOB_STATE_RUNNING");
    const path = await file(
      "wait.yaml",
      "image: test/sh:1\nhosts: {tags: {pool: lab}}\nretry: {on: [workload-failure], max: 1, other_host: true}\nparameters: {script: 'test \"$TREADMILL_ATTEMPT\" -ge 2'}\n",
    );
    const submitted = await tml(admin, ["job", "run", "-f", path, "--detach"]);
    const id = submitted.stdout.trim();
    await eventually("the retry queued", async () => {
      const j = await getJob(id);
      return j.attempt === 2 && j.state === "JOB_STATE_QUEUED";
    });
    const firstHost = (await attemptHosts(id)).get(1);
    expect((await tml(admin, ["job", "cancel", blockerId, "--wait"])).code).toBe(0);
    const done = await tml(admin, ["job", "wait", id, "--timeout", "60s"]);
    expect(done.code).toBe(0);
    const hosts = await attemptHosts(id);
    expect(hosts.get(2)).not.toBe(firstHost);
    expect([hostIds["lab-1"], hostIds["lab-2"]]).toContain(hosts.get(2));
  }, 120_000);
});
