/**
 * docs/events.md as it is written: its command blocks run with bash against
 * two coordinator replicas on one database (TML_SERVER names both). The
 * follow block runs as a process that is killed with SIGKILL; the resume
 * block then starts after the last cursor it wrote while one replica is
 * down, and goes on across a restart of that replica and the stop of the
 * other. Every job.state event of the jobs made meanwhile must be in the
 * file exactly once, in cursor order.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, symlink } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { sweepFeed } from "../../coordinator/db/queries/feed.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { docBlock, docBlocks, execLast, runBash, type DocBlock } from "../support/doc-blocks.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { createTestDatabase, type TestDatabase } from "../support/db.js";
import { FAST, insertImage, uniqueTag, waitUntil } from "../support/jobs.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const GUIDE = join(REPO, "docs", "events.md");

let db: TestDatabase;
let a: TestCoordinator;
let b: TestCoordinator;
let dir: string;
let bins: string;
let blocks: DocBlock[];
let user: { id: string; token: string };
let image: string;
const children: ChildProcess[] = [];

function env(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return { ...extra, ...process.env, PATH: `${bins}:${process.env.PATH}`, TML_CONFIG: join(dir, "tml.json"), NO_COLOR: "1", TML_SERVER: `${a.url},${b.url}`, TML_TOKEN: user.token };
}

const text = (name: string) => docBlock(blocks, GUIDE, "events", name).text;

/** Starts a guide block as a process (the shell exec's its command): what a terminal or a CI runner would run. */
function start(name: string): { child: ChildProcess; exited: Promise<unknown>; stderr: () => string } {
  const child = spawn("bash", ["-c", execLast(text(name))], { cwd: dir, env: env(), stdio: ["ignore", "ignore", "pipe"] });
  children.push(child);
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  return { child, exited: new Promise((resolve) => child.once("close", resolve)), stderr: () => stderr };
}

async function logLines(): Promise<string[]> {
  const content = await readFile(join(dir, "events.log"), "utf8").catch(() => "");
  return content.split("\n").filter((l) => l !== "");
}

/** Waits until the sequencer numbered every event committed so far (what tml events shows next). */
function settled(): Promise<unknown> {
  return waitUntil(async () => (await db.sql`select 1 from feed_pending limit 1`).length === 0, "the sequencer to number every event");
}

/** Makes a job through `c` and cancels it: two job.state events (queued, finalized). */
async function jobThrough(c: TestCoordinator, made: string[]): Promise<void> {
  const jobs = c.client(JobService, user.token);
  const { job } = await jobs.submitJob({ spec: { image, hosts: { tags: uniqueTag() } } });
  await jobs.cancelJob({ jobId: job!.id });
  made.push(job!.id);
}

describe("docs/events.md", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    a = await startTestCoordinator({ config: FAST, db });
    b = await startTestCoordinator({ config: FAST, db });
    user = await a.createUser();
    image = (await insertImage(a.sql)).ref;
    blocks = await docBlocks(GUIDE);
    dir = await mkdtemp(join(tmpdir(), "tml-events-"));
    bins = join(dir, "bin");
    await mkdir(bins);
    await symlink(join(REPO, "bin", "tml.js"), join(bins, "tml"));
  });
  afterAll(async () => {
    for (const child of children) child.kill("SIGKILL");
    await b?.stop();
    await a?.stop();
    await db?.drop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("prints the feed's job events, and host health as JSON lines, as the guide shows", async () => {
    const made: string[] = [];
    await jobThrough(a, made);
    const host = await a.createHost();
    await a.sql`update hosts set health = 'quarantined', health_reason = 'three failures' where id = ${host.id}`;
    await settled();
    const list = await runBash(`set -eo pipefail\n${text("list")}`, { cwd: dir, env: env() });
    expect(list).toMatchObject({ code: 0 });
    const lines = list.stdout.trimEnd().split("\n");
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(new RegExp(`^\\d+  \\S+  job\\.state  job ${made[0]}  queued$`));
    expect(lines[1]).toMatch(new RegExp(`job\\.state  job ${made[0]}  queued -> finalized \\(canceled\\)$`));
    const hosts = await runBash(`set -eo pipefail\n${text("hosts")}`, { cwd: dir, env: env() });
    expect(hosts).toMatchObject({ code: 0 });
    const events = hosts.stdout.trimEnd().split("\n").map((l) => JSON.parse(l) as { kind: string; hostId: string; payload: Record<string, unknown> });
    expect(events.map((e) => [e.kind, e.hostId, e.payload.health, e.payload.previous_health])).toEqual([["host.health", host.id, "quarantined", "unknown"]]);
    expect(events[0].payload.schema).toBe("treadmill.event.v1");
  }, 60_000);

  it("resumes a killed follower after its last cursor and gets every event once, across a replica's restart and the other's stop", async () => {
    const made: string[] = [];
    const follower = start("follow");
    // The follower starts at the head: wait until it is there (it prints what comes next).
    await waitUntil(async () => {
      await jobThrough(made.length % 2 === 0 ? a : b, made);
      return (await logLines()).length >= 4;
    }, "the follower to print events", 60_000);
    follower.child.kill("SIGKILL");
    await follower.exited;
    // The jobs made before the follower reached the head are not its to print.
    const firstQueued = (await logLines()).find((l) => l.endsWith("  queued"))!.split(/ +/)[4];
    made.splice(0, made.indexOf(firstQueued));
    // Events while nobody follows, and one replica down.
    const port = new URL(a.url).port;
    await a.stop();
    for (let i = 0; i < 3; i++) await jobThrough(b, made);
    const resumed = start("resume");
    for (let i = 0; i < 3; i++) await jobThrough(b, made);
    await waitUntil(async () => (await logLines()).filter((l) => made.includes(l.split(/ +/)[4])).length >= made.length * 2, "the resumed follower to catch up on the other replica", 60_000).catch((err: Error) => {
      throw new Error(`${err.message}; its stderr: ${resumed.stderr()}`);
    });
    // The first replica comes back on its address; the one the follower uses stops.
    a = await startTestCoordinator({ config: { ...FAST, port: Number(port) }, db });
    await b.stop();
    for (let i = 0; i < 3; i++) await jobThrough(a, made);
    await waitUntil(async () => (await logLines()).filter((l) => made.includes(l.split(/ +/)[4])).length >= made.length * 2, "the follower to move to the restarted replica", 60_000);
    resumed.child.kill("SIGKILL");
    await resumed.exited;
    const lines = await logLines();
    const seen = lines.filter((l) => made.includes(l.split(/ +/)[4])).map((l) => {
      const [cursor, , kind, , jobId, ...rest] = l.split(/ +/);
      expect(kind).toBe("job.state");
      return { cursor, key: `${jobId} ${rest[rest.length - 1] === "queued" ? "queued" : "finalized"}` };
    });
    const expected = made.flatMap((id) => [`${id} queued`, `${id} finalized`]);
    expect(seen.map((s) => s.key).sort()).toEqual(expected.sort());
    const cursors = seen.map((s) => BigInt(s.cursor));
    for (let i = 1; i < cursors.length; i++) expect(cursors[i]).toBeGreaterThan(cursors[i - 1]);
    // b is stopped; afterAll stops it again (idempotent) and a.
    b = a;
  }, 180_000);

  it("says a cursor older than the retention is expired, as the guide shows", async () => {
    const old = (await a.sql<{ c: string }[]>`select min(cursor)::text as c from feed_events`)[0].c;
    await a.sql`update feed_events set at = now() - interval '8 days' where cursor <= ${old}::bigint + 1`;
    expect(await sweepFeed(a.sql, new Date(Date.now() - 7 * 24 * 3600_000), 1000)).toBe(2);
    const expired = await runBash(text("expired"), { cwd: dir, env: env({ OLD_CURSOR: old }) });
    expect(expired.code).toBe(2);
    expect(expired.stderr).toContain(`cursor ${old} is older than the feed's retention (events up to ${BigInt(old) + 1n} were deleted); start again without after_cursor (the head) or with 0 (the oldest event kept)`);
  }, 60_000);
});
