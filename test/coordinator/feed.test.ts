import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code } from "@connectrpc/connect";
import { EventService, type Event } from "../../gen/treadmill/coordinator/v1/event_service_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LeaseService } from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { type FeedCursor, type FeedEvent, readFeed, recordFeedEvent, stampFeed } from "../../coordinator/db/queries/feed.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { FAST, codeOf, insertImage, uniqueTag, waitUntil } from "../support/jobs.js";

const SYSTEM = { kind: "system" } as const;

describe("the event feed", () => {
  let c: TestCoordinator;
  let image: string;
  beforeAll(async () => {
    c = await startTestCoordinator({ config: { ...FAST, feedSweepIntervalMs: 50, feedRetentionMs: 60_000 } });
    image = (await insertImage(c.sql)).ref;
  });
  afterAll(async () => {
    await c?.stop();
  });

  /** Every event after `after` a system reader can read now. */
  async function readAll(after: FeedCursor): Promise<{ events: FeedEvent[]; cursor: FeedCursor }> {
    const events = [];
    let cursor = after;
    for (;;) {
      const read = await readFeed(c.sql, cursor, { viewer: SYSTEM, limit: 100 });
      events.push(...read.events);
      cursor = read.cursor;
      if (!read.full) return { events, cursor };
    }
  }

  /** Waits until the sequencer numbered every event committed so far; the newest cursor then. */
  async function settled(): Promise<bigint> {
    await waitUntil(async () => (await c.sql`select 1 from feed_pending limit 1`).length === 0, "the sequencer to number every event");
    return BigInt((await c.sql<{ last: string }[]>`select last_cursor::text as last from feed_state`)[0].last);
  }

  /** The event whose payload has n = `n`, once the sequencer numbered it. */
  function numbered(start: FeedCursor, n: string): Promise<FeedEvent> {
    return waitUntil(async () => (await readAll(start)).events.find((e) => e.payload.n === n), `event ${n} to be numbered`);
  }

  it("numbers events in the order their transactions commit, so an event written first but committed last comes after what a reader already saw", async () => {
    const start = (await readAll(0n)).cursor;
    const first = await c.sql.reserve();
    const second = await c.sql.reserve();
    let seenSecond: FeedEvent;
    try {
      await first`begin`;
      await second`begin`;
      await recordFeedEvent(first, { kind: "host.health", audience: "admins", payload: { n: "first" } });
      await recordFeedEvent(second, { kind: "host.health", audience: "admins", payload: { n: "second" } });
      await second`commit`;
      // A reader sees the second transaction's event while the first still runs.
      seenSecond = await numbered(start, "second");
      expect((await readAll(start)).events.map((e) => e.payload.n)).toEqual(["second"]);
      await first`commit`;
    } finally {
      first.release();
      second.release();
    }
    const seenFirst = await numbered(start, "first");
    // Written first (a smaller row id), numbered after what the reader had passed.
    const ids = await c.sql<{ n: string }[]>`select payload->>'n' as n from feed_events where payload ? 'n' and payload->>'n' in ('first', 'second') order by id`;
    expect(ids.map((r) => r.n)).toEqual(["first", "second"]);
    expect(seenFirst.cursor).toBeGreaterThan(seenSecond.cursor);
    const after = await readAll(seenSecond.cursor);
    expect(after.events.map((e) => e.payload.n)).toEqual(["first"]);
  });

  it("never shows a reader an event numbered before the cursor it already passed, under concurrent writers and sequencers", async () => {
    const start = (await readAll(0n)).cursor;
    const writers = 4;
    const perWriter = 40;
    let done = false;
    const seen: FeedCursor[] = [];
    const reading = (async () => {
      let cursor = start;
      while (!done || seen.length < writers * perWriter) {
        const read = await readFeed(c.sql, cursor, { viewer: SYSTEM, filter: { kinds: ["job.artifacts"] }, limit: 50 });
        for (const e of read.events) {
          // Nothing may arrive that sorts before what was already passed.
          expect(e.cursor).toBeGreaterThan(cursor);
          seen.push(e.cursor);
        }
        cursor = read.cursor;
      }
    })();
    // Sequencers of other replicas, besides the coordinator's own.
    const sequencing = Array.from({ length: 2 }, async () => {
      while (!done) await stampFeed(c.sql, 7);
    });
    await Promise.all(
      Array.from({ length: writers }, async (_, w) => {
        for (let i = 0; i < perWriter; i++) {
          await c.sql.begin(async (tx) => {
            await recordFeedEvent(tx, { kind: "job.artifacts", audience: "admins", payload: { w, i } });
            // A transaction that outlasts others' commits.
            if (i % 5 === 0) await tx`select pg_sleep(0.005)`;
          });
        }
      }),
    );
    done = true;
    await Promise.all([reading, ...sequencing]);
    expect(seen).toHaveLength(writers * perWriter);
    expect(new Set(seen).size).toBe(writers * perWriter);
  }, 60_000);

  it("streams every event once and in order from one replica while both replicas number events", async () => {
    const other = await startTestCoordinator({ config: FAST, db: c.db });
    try {
      const admin = await c.createUser({ role: "admin" });
      const stream = other.client(EventService, admin.token).watchEvents({ filter: { kinds: ["job.artifacts"] } });
      const writers = 4;
      const perWriter = 50;
      const got: Event[] = [];
      let writing: Promise<unknown> | undefined;
      for await (const r of stream) {
        got.push(...r.events);
        // The first answer says the stream is at the head: write now, through both replicas' databases alike.
        writing ??= Promise.all(
          Array.from({ length: writers }, async (_, w) => {
            for (let i = 0; i < perWriter; i++) {
              await (w % 2 === 0 ? c.sql : other.sql).begin((tx) => recordFeedEvent(tx, { kind: "job.artifacts", audience: "admins", payload: { w, i } }));
            }
          }),
        );
        if (got.length >= writers * perWriter) break;
      }
      await writing;
      expect(new Set(got.map((e) => `${e.payload?.w}/${e.payload?.i}`)).size).toBe(writers * perWriter);
      for (let i = 1; i < got.length; i++) expect(got[i].cursor).toBeGreaterThan(got[i - 1].cursor);
      expect(got).toHaveLength(writers * perWriter);
    } finally {
      await other.stop();
    }
  }, 60_000);

  it("shows a user the events of their own jobs and host health, never another user's job, and lets an admin see both", async () => {
    const alice = await c.createUser();
    const bob = await c.createUser();
    const admin = await c.createUser({ role: "admin" });
    const host = await c.createHost();
    const head = await settled();
    const { job } = await c.client(JobService, alice.token).submitJob({ spec: { image, hosts: { tags: uniqueTag() }, tags: { team: "red" } } });
    await c.client(JobService, alice.token).cancelJob({ jobId: job!.id });
    await c.sql`update hosts set health = 'quarantined', health_reason = 'test' where id = ${host.id}`;
    // What another part of the coordinator records for a job: the job's owner, labels and lease come with it.
    await c.sql.begin((tx) => recordFeedEvent(tx, { kind: "job.results", jobId: job!.id, payload: { job_id: job!.id, state: "results" } }));
    await settled();
    const kindsFor = async (token: string) => {
      const { events } = await c.client(EventService, token).listEvents({ afterCursor: head, pageSize: 1000 });
      // Other tests' hosts may change meanwhile: only this test's job and host.
      return events
        .filter((e) => e.jobId === job!.id || e.hostId === host.id)
        .map((e) => `${e.kind}:${e.jobId || e.hostId}:${String(e.payload?.state ?? e.payload?.health)}`);
    };
    const aliceSees = [`job.state:${job!.id}:queued`, `job.state:${job!.id}:finalized`, `host.health:${host.id}:quarantined`, `job.results:${job!.id}:results`];
    expect(await kindsFor(alice.token)).toEqual(aliceSees);
    expect(await kindsFor(bob.token)).toEqual([`host.health:${host.id}:quarantined`]);
    expect(await kindsFor(admin.token)).toEqual(aliceSees);
    // A filter cannot widen what a user sees.
    const bobsWatch = c.client(EventService, bob.token).watchEvents({ afterCursor: head, filter: { jobIds: [job!.id] } });
    for await (const r of bobsWatch) {
      expect(r.events).toEqual([]);
      break;
    }
    expect(await codeOf(c.client(EventService, bob.token).listEvents({ filter: { ownerUserId: alice.id } }))).toBe("PermissionDenied");
    const { events } = await c.client(EventService, admin.token).listEvents({ afterCursor: head, filter: { ownerUserId: alice.id, labels: { team: "red" } } });
    expect(events.map((e) => e.payload?.state)).toEqual(["queued", "finalized", "results"]);
    expect(events[0].payload).toMatchObject({ schema: "treadmill.event.v1", kind: "job.state", job_id: job!.id, labels: { team: "red" } });
  });

  it("tells a lease's holder, and not another user, each change of its state, and a job's stage changes", async () => {
    const alice = await c.createUser();
    const bob = await c.createUser();
    const tags = uniqueTag();
    await c.createHost({ tags });
    const head = await settled();
    const leases = c.client(LeaseService, alice.token);
    const { lease } = await leases.createLease({ hosts: { tags }, duration: { seconds: 3600n } });
    await leases.releaseLease({ leaseId: lease!.id });
    const { job } = await c.client(JobService, alice.token).submitJob({ spec: { image, hosts: { tags: uniqueTag() } } });
    // A stage change alone (the supervisor's reports write it; here by hand).
    await c.sql`update jobs set stage = 'fetching_image' where id = ${job!.id}`;
    await settled();
    const { events } = await c.client(EventService, alice.token).listEvents({ afterCursor: head, filter: { kinds: ["lease.state", "job.stage"] } });
    const states = events.filter((e) => e.kind === "lease.state").map((e) => [e.leaseId, e.payload?.previous_state ?? null, e.payload?.state]);
    expect(states[0]).toEqual([lease!.id, null, expect.any(String)]);
    expect(states[states.length - 1]).toEqual([lease!.id, expect.any(String), "ended"]);
    expect(events.filter((e) => e.kind === "lease.state").pop()!.payload).toMatchObject({ end_reason: "released", schema: "treadmill.event.v1" });
    expect(events.filter((e) => e.kind === "job.stage").map((e) => [e.jobId, e.payload?.state, e.payload?.stage])).toEqual([[job!.id, "queued", "fetching_image"]]);
    const bobs = await c.client(EventService, bob.token).listEvents({ afterCursor: head, filter: { kinds: ["lease.state", "job.stage"] } });
    expect(bobs.events).toEqual([]);
  });

  it("refuses a caller without a token before reading its request", async () => {
    expect(await codeOf(c.client(EventService).listEvents({ afterCursor: -1n }))).toBe("Unauthenticated");
    const stream = c.client(EventService).watchEvents({ filter: { kinds: ["nope"] } });
    expect(await codeOf((async () => { for await (const _ of stream) break; })())).toBe("Unauthenticated");
  });

  it("says on /metrics how many events wait for a cursor and the newest cursor given", async () => {
    const last = async () => Number((await c.sql<{ last: string }[]>`select last_cursor::text as last from feed_state`)[0].last);
    const before = await last();
    const text = await (await fetch(`${c.url}/metrics`)).text();
    const after = await last();
    const value = (state: string) => Number(new RegExp(`^treadmill_coordinator_feed_events\\{[^}]*state="${state}"[^}]*\\} (\\S+)$`, "m").exec(text)?.[1]);
    expect(before).toBeGreaterThan(0);
    expect(value("last_cursor")).toBeGreaterThanOrEqual(before);
    expect(value("last_cursor")).toBeLessThanOrEqual(after);
    expect(value("pending")).toBeGreaterThanOrEqual(0);
    expect(value("swept_cursor")).toBeGreaterThanOrEqual(0);
  });

  it("answers a negative cursor or an unknown kind with INVALID_ARGUMENT naming the field", async () => {
    const user = await c.createUser();
    const events = c.client(EventService, user.token);
    const bad = await events.listEvents({ afterCursor: -1n }).catch((e: unknown) => e as Error);
    expect(bad).toMatchObject({ code: Code.InvalidArgument });
    expect((bad as Error).message).toContain("after_cursor");
    const kind = await events.listEvents({ filter: { kinds: ["job.nope"] } }).catch((e: unknown) => e as Error);
    expect(kind).toMatchObject({ code: Code.InvalidArgument });
    expect((kind as Error).message).toContain("filter.kinds");
  });

  it("deletes events past retention and answers a cursor before them with OUT_OF_RANGE that says so", async () => {
    const admin = await c.createUser({ role: "admin" });
    const events = c.client(EventService, admin.token);
    const hostEvents = async (after: bigint) => (await events.listEvents({ afterCursor: after, filter: { kinds: ["host.health"] } })).events;
    const [first, second] = [await c.createHost(), await c.createHost()];
    await c.sql`update hosts set health = 'retired' where id = ${first.id}`;
    const before = (await waitUntil(async () => (await hostEvents(0n)).find((e) => e.hostId === first.id), "the first event to be numbered")).cursor;
    await c.sql`update hosts set health = 'retired' where id = ${second.id}`;
    const fresh = await waitUntil(async () => (await hostEvents(before)).find((e) => e.hostId === second.id), "the second event to be numbered");
    // Age both past the retention; the sweep (every 50 ms) deletes them.
    await c.sql`update feed_events set at = now() - interval '2 minutes' where cursor <= ${fresh.cursor.toString()}::bigint`;
    await waitUntil(async () => (await c.sql`select 1 from feed_events where cursor <= ${fresh.cursor.toString()}::bigint`).length === 0, "the sweep to delete old events");
    const err = await events.listEvents({ afterCursor: before }).catch((e: unknown) => e as Error);
    expect(err).toMatchObject({ code: Code.OutOfRange });
    expect((err as Error).message).toContain(`cursor ${before} is older than the feed's retention`);
    const watch = await (async () => {
      for await (const _ of events.watchEvents({ afterCursor: before })) return undefined;
    })().catch((e: unknown) => e as Error);
    expect(watch).toMatchObject({ code: Code.OutOfRange });
    // The last cursor deleted is still good: nothing after it was deleted.
    const [{ swept }] = await c.sql<{ swept: string }[]>`select swept_cursor::text as swept from feed_state`;
    expect(BigInt(swept)).toBe(fresh.cursor);
    const { cursor } = await events.listEvents({ afterCursor: fresh.cursor });
    expect(cursor).toBeGreaterThanOrEqual(fresh.cursor);
  });

  it("streams events as they commit after a head position sent at once", async () => {
    const user = await c.createUser();
    const stream = c.client(EventService, user.token).watchEvents({ filter: { kinds: ["job.state"] } });
    const got: Event[] = [];
    let jobId = "";
    for await (const r of stream) {
      if (jobId === "") {
        expect(r.events).toEqual([]);
        expect(r.cursor).toBeGreaterThan(0n);
        jobId = (await c.client(JobService, user.token).submitJob({ spec: { image, hosts: { tags: uniqueTag() } } })).job!.id;
        await c.client(JobService, user.token).cancelJob({ jobId });
        continue;
      }
      got.push(...r.events);
      if (got.length >= 2) break;
    }
    expect(got.map((e) => [e.jobId, e.payload?.state])).toEqual([
      [jobId, "queued"],
      [jobId, "finalized"],
    ]);
  });
});
