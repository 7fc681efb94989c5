import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { JobEventKind, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import {
  LeaseEndReason,
  LeaseEventKind,
  LeaseExtensionLimitSchema,
  LeaseKind,
  LeaseService,
  LeaseState,
  type Lease,
} from "../../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { createHoldLease } from "../../coordinator/db/queries/leases.js";
import { uuidv7 } from "../../coordinator/shared/common.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, attach, codeOf, insertImage, jobInState, uniqueTag, waitUntil } from "../support/jobs.js";

const HOUR = 3600n;

describe("leases", () => {
  let c: TestCoordinator;
  let image: string;
  let admin: { id: string; name: string; token: string };
  let user: { id: string; name: string; token: string };
  let other: { id: string; name: string; token: string };
  const open: ScriptedSupervisor[] = [];

  beforeAll(async () => {
    c = await startTestCoordinator({
      config: { ...FAST, leaseSweepIntervalMs: 50, leaseGraceMinMs: 50, leaseKeepaliveIntervalMs: 50, leaseMaxDurationMs: 4 * 3600_000, leaseMaxConcurrentPerUser: 3, leaseMaxHostHoursPerDay: 10, leasePolicyOverrides: ["tier=small;max-duration=1h;max-concurrent=1"] },
    });
    image = (await insertImage(c.sql)).ref;
    admin = await c.createUser({ role: "admin" });
    user = await c.createUser();
    other = await c.createUser();
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  const leases = (token = user.token) => c.client(LeaseService, token);

  async function hostWith(tags: Record<string, string>, options: { attached?: boolean } = {}) {
    const host = await c.createHost({ tags });
    if (options.attached) open.push(await attach(c, host));
    return host;
  }
  async function hostRow(id: string) {
    const [row] = await c.sql<{ lease_id: string | null; booked_from: Date | null }[]>`select lease_id, booked_from from hosts where id = ${id}`;
    return row;
  }
  function leaseIn(id: string, state: LeaseState, token = user.token): Promise<Lease> {
    return waitUntil(async () => {
      const { lease } = await leases(token).getLease({ leaseId: id });
      return lease!.state === state ? lease! : undefined;
    }, `lease ${id} to be ${LeaseState[state]}`);
  }
  const hours = (n: bigint) => ({ seconds: n * HOUR });

  it("gives a free host at once: the lease is ACTIVE, the host is its, and releasing it returns the host", async () => {
    const tag = uniqueTag();
    const host = await hostWith(tag, { attached: true });
    const { lease } = await leases().createLease({ hosts: { tags: tag }, duration: hours(1n), description: "debugging" });
    expect(lease!.state).toBe(LeaseState.ACTIVE);
    expect(lease!.leaseHosts.map((h) => h.hostName)).toEqual([host.name]);
    expect(lease!.ownerUsername).toBe(user.name);
    expect((await hostRow(host.id)).lease_id).toBe(lease!.id);
    expect((await hostRow(host.id)).booked_from).not.toBeNull();
    const [n] = await c.sql<{ n: number }[]>`select count(*)::int as n from hosts where lease_id is not null`;
    expect(n.n).toBeGreaterThanOrEqual(1);
    const metrics = await (await fetch(`${c.url}/metrics`)).text();
    expect(metrics).toContain(`treadmill_coordinator_leases{state="hosts",component="coordinator"} ${n.n}\n`);

    const { lease: released } = await leases().releaseLease({ leaseId: lease!.id });
    expect(released!.state).toBe(LeaseState.ENDED);
    expect(released!.endReason).toBe(LeaseEndReason.RELEASED);
    expect(await hostRow(host.id)).toEqual({ lease_id: null, booked_from: null });
    // Idempotent: releasing again answers the ended lease.
    expect((await leases().releaseLease({ leaseId: lease!.id })).lease!.endReason).toBe(LeaseEndReason.RELEASED);
    const { lease: read } = await leases().getLease({ leaseId: lease!.id });
    expect(read!.timeline.map((e) => LeaseEventKind[e.kind])).toEqual(["REQUESTED", "BOOKED", "ACTIVE", "ENDED"]);
    const [audit] = await c.sql<{ n: number }[]>`select count(*)::int as n from audit_events where kind like 'lease.%' and details->>'leaseId' = ${lease!.id}`;
    expect(audit.n).toBeGreaterThanOrEqual(3);
  });

  it("is idempotent by request_id", async () => {
    const tag = uniqueTag();
    await hostWith(tag);
    const a = await leases().createLease({ hosts: { tags: tag }, duration: hours(1n), requestId: "r-1" });
    const b = await leases().createLease({ hosts: { tags: tag }, duration: hours(1n), requestId: "r-1" });
    expect(b.lease!.id).toBe(a.lease!.id);
    await leases().releaseLease({ leaseId: a.lease!.id });
  });

  it("hides a lease from another user: get, renew, extend, release and watch answer NOT_FOUND", async () => {
    const tag = uniqueTag();
    await hostWith(tag);
    const { lease } = await leases().createLease({ hosts: { tags: tag }, duration: hours(1n) });
    const id = lease!.id;
    const them = leases(other.token);
    expect(await codeOf(them.getLease({ leaseId: id }))).toBe("NotFound");
    expect(await codeOf(them.renewLease({ leaseId: id }))).toBe("NotFound");
    expect(await codeOf(them.extendLease({ leaseId: id, by: hours(1n) }))).toBe("NotFound");
    expect(await codeOf(them.releaseLease({ leaseId: id }))).toBe("NotFound");
    expect(await codeOf((async () => { for await (const _ of them.watchLease({ leaseId: id })) break; })())).toBe("NotFound");
    expect((await them.listLeases({})).leases.map((l) => l.id)).not.toContain(id);
    expect(await codeOf(them.revokeLease({ leaseId: id, reason: "mine now" }))).toBe("PermissionDenied");
    expect((await leases().getLease({ leaseId: id })).lease!.state).toBe(LeaseState.ACTIVE);
    await leases().releaseLease({ leaseId: id });
  });

  it("refuses bad requests with the field named", async () => {
    const tag = uniqueTag();
    await hostWith(tag);
    const refusal = async (p: Promise<unknown>) => {
      const err = await p.then(() => undefined, (e: unknown) => ConnectError.from(e));
      return err ? `${Code[err.code]}: ${err.rawMessage}` : "accepted";
    };
    expect(await refusal(leases().createLease({ hosts: { tags: tag } }))).toBe("InvalidArgument: duration is required");
    expect(await refusal(leases().createLease({ hosts: { tags: tag }, duration: { seconds: 10n } }))).toBe("InvalidArgument: duration must be at least 1 minute");
    expect(await refusal(leases().createLease({ hosts: { tags: tag }, duration: hours(1n), gracePeriod: { seconds: 999_999n } }))).toMatch(/^InvalidArgument: grace_period must be between/);
    expect(await refusal(leases().createLease({ hosts: { tags: tag }, duration: hours(5n) }))).toMatch(/^ResourceExhausted: lease policy: duration 5h is over the maximum of 4h/);
    expect(await refusal(leases().createLease({ hosts: { tags: tag, hostCount: 2 }, duration: hours(1n) }))).toMatch(/^FailedPrecondition: 1 host in service matches the selector; the lease needs 2/);
    expect(await refusal(leases().createLease({ hostNames: ["no-such-host"], duration: hours(1n) }))).toBe("NotFound: host no-such-host not found");
    expect(await refusal(leases().createLease({ hostNames: ["Bad Name"], duration: hours(1n) }))).toMatch(/^InvalidArgument: host_names\[0\] must match/);
    expect(await refusal(leases().createLease({ hostNames: ["a", "b"], hosts: { tags: tag }, duration: hours(1n) }))).toBe(
      "InvalidArgument: hosts must be empty when host_names is set (or give only their count)",
    );
    expect(await refusal(leases().createLease({ hostNames: ["a", "a"], duration: hours(1n) }))).toBe('InvalidArgument: host_names[1] "a" is repeated');
    expect(await refusal(leases().createLease({ hosts: { tags: tag }, duration: hours(1n), image: "no-such-image:v1" }))).toBe("NotFound: image no-such-image:v1 not found");
    expect(await refusal(leases().createLease({ hosts: { tags: tag }, duration: hours(1n), startTime: { seconds: BigInt(Math.floor(Date.now() / 1000) - 3600) } }))).toBe("InvalidArgument: start_time must not be in the past");
    expect(await refusal(leases().getLease({ leaseId: "nope" }))).toBe("InvalidArgument: lease_id must be a lower-case uuid");
    expect(await refusal(leases().revokeLease({ leaseId: "nope", reason: "x" }))).toBe("PermissionDenied: this call is for admins only");
    expect(await refusal(leases(admin.token).createLease({ hosts: { tags: tag }, duration: { seconds: 10n ** 12n } }))).toBe(
      "InvalidArgument: duration must be at most 31622400000 ms",
    );
    const now = BigInt(Math.floor(Date.now() / 1000));
    expect(await refusal(leases().getLeaseCalendar({ from: { seconds: now }, to: { seconds: now - 60n } }))).toBe("InvalidArgument: to must be after from");
    expect(await refusal(leases().getLeaseCalendar({ from: { seconds: now }, to: { seconds: now + 15n * 86400n } }))).toBe(
      "InvalidArgument: the window (from to to) must be at most 14 days",
    );
    expect(await refusal(leases().getLeaseCalendar({ hosts: { hostCount: 2 } }))).toBe(
      "InvalidArgument: hosts.host_count must be 0: the calendar shows every matching host",
    );
    // An admin is exempt from the duration limit.
    const { lease } = await leases(admin.token).createLease({ hosts: { tags: tag }, duration: hours(5n) });
    await leases(admin.token).releaseLease({ leaseId: lease!.id });
  });

  it("ends a lease LOST when no keepalive arrives for its grace period, and a keepalive stream holds it", async () => {
    const tag = uniqueTag();
    const held = await hostWith(tag);
    const lost = await hostWith(tag);
    const grace = { seconds: 0n, nanos: 300_000_000 };
    const { lease: kept } = await leases().createLease({ hostNames: [held.name], duration: hours(1n), gracePeriod: grace });
    const abort = new AbortController();
    const stream = leases().watchLease({ leaseId: kept!.id, keepalive: true }, { signal: abort.signal });
    const first = await stream[Symbol.asyncIterator]().next();
    expect(first.value!.lease!.state).toBe(LeaseState.ACTIVE);
    const { lease: dropped } = await leases().createLease({ hostNames: [lost.name], duration: hours(1n), gracePeriod: grace });
    const ended = await leaseIn(dropped!.id, LeaseState.ENDED);
    expect(ended.endReason).toBe(LeaseEndReason.LOST);
    expect(ended.statusMessage).toBe("no keepalive for 300ms");
    // The held one outlived the lost one's grace and more, and is still there.
    expect((await leases().getLease({ leaseId: kept!.id })).lease!.state).toBe(LeaseState.ACTIVE);
    expect(await codeOf(leases().renewLease({ leaseId: dropped!.id }))).toBe("FailedPrecondition");
    abort.abort();
    const gone = await leaseIn(kept!.id, LeaseState.ENDED);
    expect(gone.endReason).toBe(LeaseEndReason.LOST);
    // A holder coming back to an ended lease is shown it ended, and the stream ends.
    const after: LeaseState[] = [];
    for await (const m of leases().watchLease({ leaseId: kept!.id, keepalive: true })) after.push(m.lease!.state);
    expect(after).toEqual([LeaseState.ENDED]);
    const { lease: timeline } = await leases().getLease({ leaseId: kept!.id });
    expect(timeline!.timeline.filter((e) => e.kind === LeaseEventKind.KEEPALIVE).map((e) => e.message)).toEqual([
      `keepalive stream opened by ${user.name}`,
      "keepalive stream closed; lost after 300ms without a keepalive",
    ]);
  });

  it("streams the lease's changes with WatchLease and ends the stream once the lease has ended", async () => {
    const tag = uniqueTag();
    await hostWith(tag);
    const { lease } = await leases().createLease({ hosts: { tags: tag }, duration: hours(1n) });
    const seen: string[] = [];
    const watching = (async () => {
      for await (const m of leases().watchLease({ leaseId: lease!.id })) {
        for (const e of m.events) seen.push(LeaseEventKind[e.kind]);
        if (seen.length === 3) await leases().extendLease({ leaseId: lease!.id, by: hours(1n) });
        if (seen.includes("EXTENDED") && !seen.includes("ENDED")) await leases().releaseLease({ leaseId: lease!.id });
      }
    })();
    await watching;
    expect(seen).toEqual(["REQUESTED", "BOOKED", "ACTIVE", "EXTENDED", "ENDED"]);
  });

  it("cancels every job inside a lease when it ends, and says why on the job's timeline", async () => {
    const tag = uniqueTag();
    await hostWith(tag);
    const { lease } = await leases().createLease({ hosts: { tags: tag }, duration: hours(1n) });
    // A job inside the lease, queued (its host has no supervisor attached).
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image, leaseId: lease!.id } });
    await leases(admin.token).revokeLease({ leaseId: lease!.id, reason: "rack maintenance" });
    const row = await jobInState(c.sql, job!.id, "finalized");
    expect(row.reason).toBe("canceled");
    const { job: read } = await c.client(JobService, user.token).getJob({ jobId: job!.id });
    const note = read!.timeline.find((e) => e.kind === JobEventKind.LEASE);
    expect(note?.message).toBe(`lease ${lease!.id} revoked: revoked by admin ${admin.name}: rack maintenance`);
    const { lease: ended } = await leases().getLease({ leaseId: lease!.id });
    expect(ended!.endReason).toBe(LeaseEndReason.REVOKED);
    expect(ended!.statusMessage).toBe(`revoked by admin ${admin.name}: rack maintenance`);
  });

  it("takes another matching host that frees first rather than wait for the busy one it booked", async () => {
    const tag = uniqueTag();
    const key = Object.keys(tag)[0];
    const first = await c.createHost({ tags: { ...tag, which: "first" } });
    const second = await c.createHost({ tags: { ...tag, which: "second" } });
    const [s1, s2] = [await attach(c, first), await attach(c, second)];
    open.push(s1, s2);
    const jobs = c.client(JobService, other.token);
    // The first host's job ends sooner by its timeout: the lease books it.
    const { job: soon } = await jobs.submitJob({ spec: { image, hosts: { tags: { ...tag, which: "first" } }, jobTimeout: { seconds: 600n } } });
    const { job: late } = await jobs.submitJob({ spec: { image, hosts: { tags: { ...tag, which: "second" } }, jobTimeout: { seconds: 3600n } } });
    await s1.startJob(soon!.id);
    await s2.startJob(late!.id);
    const { lease } = await leases().createLease({ hosts: { tags: { [key]: tag[key] } }, duration: hours(1n) });
    expect(lease).toMatchObject({ state: LeaseState.WAITING, leaseHosts: [{ hostName: first.name }] });
    // The second host frees first: the lease moves there and is ACTIVE, the first host's job runs on.
    await s2.exit(late!.id, 1, 0);
    const active = await leaseIn(lease!.id, LeaseState.ACTIVE);
    expect(active.leaseHosts.map((h) => h.hostName)).toEqual([second.name]);
    expect((await hostRow(second.id)).lease_id).toBe(lease!.id);
    expect(await hostRow(first.id)).toEqual({ lease_id: null, booked_from: null });
    const { lease: read } = await leases().getLease({ leaseId: lease!.id });
    expect(read!.timeline.map((e) => e.message)).toContain(`host ${second.name} booked in place of host ${first.name} (still running job ${soon!.id})`);
    await leases().releaseLease({ leaseId: lease!.id });
    await s1.exit(soon!.id, 1, 0);
  });

  it("waits for a host that still runs a job, says so, and becomes ACTIVE when the job ends", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = await attach(c, host);
    open.push(s);
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image, hosts: { tags: tag } } });
    await s.startJob(job!.id);
    await jobInState(c.sql, job!.id, "assigned");
    const { lease } = await leases().createLease({ hostNames: [host.name], duration: hours(1n) });
    expect(lease!.state).toBe(LeaseState.WAITING);
    expect(lease!.statusMessage).toBe(`waiting for its hosts to be free: host ${host.name} still runs job ${job!.id}`);
    expect((await hostRow(host.id)).lease_id).toBeNull();
    // Another user's calendar shows the job as busy time without saying whose.
    const cal = await leases(other.token).getLeaseCalendar({ hosts: { tags: tag } });
    expect(cal.hosts[0].entries.map((e) => [e.kind, e.id, e.ownerUsername])).toEqual([
      ["job", "", ""],
      ["lease", lease!.id, user.name],
    ]);
    await s.exit(job!.id, 1, 0);
    const active = await leaseIn(lease!.id, LeaseState.ACTIVE);
    expect(active.statusMessage).toBe("");
    expect((await hostRow(host.id)).lease_id).toBe(lease!.id);
    await leases().releaseLease({ leaseId: lease!.id });
  });

  it("books a host ahead: WAITING until its start, then REQUESTED leases for an overlapping window wait until their deadline and end UNSERVED", async () => {
    const tag = uniqueTag();
    const host = await hostWith(tag);
    const start = new Date(Date.now() + 3600_000);
    const { lease: ahead } = await leases().createLease({
      hosts: { tags: tag },
      duration: hours(2n),
      startTime: { seconds: BigInt(Math.floor(start.getTime() / 1000)) },
    });
    expect(ahead!.state).toBe(LeaseState.WAITING);
    expect(ahead!.statusMessage).toMatch(/^waiting for its start at /);
    expect((await hostRow(host.id)).booked_from?.getTime()).toBe(Math.floor(start.getTime() / 1000) * 1000);
    expect((await hostRow(host.id)).lease_id).toBeNull();
    // A lease now for 2 hours overlaps it: no room; its deadline passes.
    const deadline = new Date(Date.now() + 1500);
    const { lease: late } = await leases().createLease({
      hosts: { tags: tag },
      duration: hours(2n),
      deadline: { seconds: BigInt(Math.floor(deadline.getTime() / 1000)), nanos: (deadline.getTime() % 1000) * 1e6 },
    });
    expect(late!.state).toBe(LeaseState.REQUESTED);
    expect(late!.statusMessage).toMatch(/^no room in the calendar: 1 matching host not free from /);
    const ended = await leaseIn(late!.id, LeaseState.ENDED);
    expect(ended.endReason).toBe(LeaseEndReason.UNSERVED);
    expect(ended.statusMessage).toMatch(/^not served by .*: no room in the calendar/);
    // Retried at every sweep, said once.
    expect(ended.timeline.map((e) => LeaseEventKind[e.kind])).toEqual(["REQUESTED", "WAITING", "ENDED"]);
    // A lease now that ends before the booking starts fits.
    const { lease: before } = await leases().createLease({ hosts: { tags: tag }, duration: { seconds: 1800n } });
    expect(before!.state).toBe(LeaseState.ACTIVE);
    // Extending it into the booking is refused with the latest end it could have.
    const err = await leases()
      .extendLease({ leaseId: before!.id, by: hours(1n) })
      .then(() => undefined, (e: unknown) => ConnectError.from(e));
    expect(err?.code).toBe(Code.FailedPrecondition);
    const [limit] = err!.findDetails(LeaseExtensionLimitSchema);
    expect(timestampDate(limit.maxEndTime!).getTime()).toBe(Math.floor(start.getTime() / 1000) * 1000);
    expect(limit.reason).toBe(`host ${host.name} is booked from ${new Date(Math.floor(start.getTime() / 1000) * 1000).toISOString()}`);
    // Within the room it has, the extension is made, once per request id.
    const by = { seconds: 600n };
    const once = await leases().extendLease({ leaseId: before!.id, by, requestId: "x-1" });
    const twice = await leases().extendLease({ leaseId: before!.id, by, requestId: "x-1" });
    expect(twice.lease!.endTime).toEqual(once.lease!.endTime);
    expect(timestampDate(once.lease!.endTime!).getTime() - timestampDate(before!.endTime!).getTime()).toBe(600_000);
    // The calendar shows both on the host's row.
    const cal = await leases(other.token).getLeaseCalendar({ hosts: { tags: tag } });
    expect(cal.hosts.map((h) => h.hostName)).toEqual([host.name]);
    expect(cal.hosts[0].entries.map((e) => [e.kind, e.id, e.ownerUsername])).toEqual(
      expect.arrayContaining([
        ["lease", before!.id, user.name],
        ["lease", ahead!.id, user.name],
      ]),
    );
    await leases().releaseLease({ leaseId: before!.id });
    await leases().releaseLease({ leaseId: ahead!.id });
    expect(await hostRow(host.id)).toEqual({ lease_id: null, booked_from: null });
  });

  it("refuses an extension beyond the policy's maximum duration with the limit in the error's detail", async () => {
    const tag = uniqueTag();
    await hostWith(tag);
    const { lease } = await leases().createLease({ hosts: { tags: tag }, duration: hours(3n) });
    const err = await leases()
      .extendLease({ leaseId: lease!.id, by: hours(2n) })
      .then(() => undefined, (e: unknown) => ConnectError.from(e));
    expect(err?.code).toBe(Code.ResourceExhausted);
    const [limit] = err!.findDetails(LeaseExtensionLimitSchema);
    expect(timestampDate(limit.maxEndTime!).getTime()).toBe(timestampDate(lease!.startTime!).getTime() + 4 * 3600_000);
    expect(limit.reason).toBe("lease policy: at most 4h from its start");
    await leases().releaseLease({ leaseId: lease!.id });
  });

  it("lists the caller's leases newest first, by state, a page at a time; admins see everyone's with all_users", async () => {
    const tag = uniqueTag();
    await hostWith(tag);
    await hostWith(tag);
    const mine = await c.createUser();
    const a = (await leases(mine.token).createLease({ hosts: { tags: tag }, duration: hours(1n) })).lease!;
    const b = (await leases(mine.token).createLease({ hosts: { tags: tag }, duration: hours(1n) })).lease!;
    await leases(mine.token).releaseLease({ leaseId: a.id });
    const page1 = await leases(mine.token).listLeases({ pageSize: 1 });
    expect(page1.leases.map((l) => l.id)).toEqual([b.id]);
    const page2 = await leases(mine.token).listLeases({ pageSize: 1, pageToken: page1.nextPageToken });
    expect(page2.leases.map((l) => l.id)).toEqual([a.id]);
    expect((await leases(mine.token).listLeases({ states: [LeaseState.ACTIVE] })).leases.map((l) => l.id)).toEqual([b.id]);
    expect(await codeOf(leases(mine.token).listLeases({ allUsers: true }))).toBe("PermissionDenied");
    expect((await leases(admin.token).listLeases({ allUsers: true, pageSize: 1000 })).leases.map((l) => l.id)).toEqual(expect.arrayContaining([a.id, b.id]));
    await leases(mine.token).releaseLease({ leaseId: b.id });
  });
  /** Tomorrow at `hour`:00 UTC, as a Timestamp (a fixed time of day: per-day sums do not depend on when the test runs). */
  function tomorrowAt(hour: number) {
    const d = new Date();
    d.setUTCDate(d.getUTCDate() + 1);
    d.setUTCHours(hour, 0, 0, 0);
    return { seconds: BigInt(d.getTime() / 1000) };
  }

  it("holds a user to the policy's concurrent leases and host-hours a day", async () => {
    const tag = uniqueTag();
    await hostWith(tag);
    await hostWith(tag);
    const u = await c.createUser();
    const mine = leases(u.token);
    const made: string[] = [];
    for (let i = 0; i < 3; i++) made.push((await mine.createLease({ hosts: { tags: tag }, duration: hours(1n), startTime: tomorrowAt(2 + i) })).lease!.id);
    const refusal = async (p: Promise<unknown>) => {
      const err = await p.then(() => undefined, (e: unknown) => ConnectError.from(e));
      return err ? `${Code[err.code]}: ${err.rawMessage}` : "accepted";
    };
    expect(await refusal(mine.createLease({ hosts: { tags: tag }, duration: hours(1n), startTime: tomorrowAt(6) }))).toBe(
      "ResourceExhausted: lease policy: at most 3 leases per user at once; you have 3",
    );
    await mine.releaseLease({ leaseId: made.pop()! });
    // 2 host-hours booked (the released lease ended before its start: none); 2 hosts for 3 hours, then 4, make 10: the limit.
    const big = (await mine.createLease({ hosts: { tags: tag, hostCount: 2 }, duration: hours(3n), startTime: tomorrowAt(8) })).lease!;
    expect(big.state).toBe(LeaseState.WAITING);
    await mine.extendLease({ leaseId: big.id, by: hours(1n) });
    await mine.releaseLease({ leaseId: made.pop()! });
    const day = new Date(Number(tomorrowAt(0).seconds) * 1000).toISOString().slice(0, 10);
    expect(await refusal(mine.createLease({ hosts: { tags: tag }, duration: hours(2n), startTime: tomorrowAt(14) }))).toBe(
      `ResourceExhausted: lease policy: at most 10 host-hours a day per user; ${day} would have 11.0`,
    );
    for (const id of [...made, big.id]) await mine.releaseLease({ leaseId: id });
  });

  it("provisions an active lease with an image through a session job inside it, whose timeout follows the lease's end", async () => {
    const media = "application/x-treadmill-session-test";
    const img = (await insertImage(c.sql, { mediaTypes: [media] })).ref;
    const host = await c.createHost({ tags: uniqueTag(), mediaTypes: [media] });
    const { lease } = await leases().createLease({ hostNames: [host.name], duration: hours(1n), image: img, parameters: [{ name: "MODE", value: "debug" }] });
    expect(lease!.state).toBe(LeaseState.ACTIVE);
    expect(lease!.manifestDigest).toMatch(/^sha256:/);
    const [job] = await c.sql<{ id: string; lease_id: string; host_count: number; job_timeout_ms: number; owner_id: string }[]>`
      select id, lease_id, host_count, job_timeout_ms::float8 as job_timeout_ms, owner_id from jobs where lease_id = ${lease!.id}`;
    expect([job.host_count, job.owner_id]).toEqual([1, user.id]);
    expect(job.job_timeout_ms).toBeGreaterThan(3600_000 - 60_000);
    const { job: read } = await c.client(JobService, user.token).getJob({ jobId: job.id });
    expect(read!.spec!.leaseId).toBe(lease!.id);
    expect(read!.spec!.parameters.map((p) => [p.name, p.value])).toEqual([["MODE", "debug"]]);
    const { lease: withJob } = await leases().getLease({ leaseId: lease!.id });
    expect(withJob!.timeline.find((e) => e.kind === LeaseEventKind.JOB)?.message).toBe(`session job ${job.id} submitted (image ${img})`);
    await leases().extendLease({ leaseId: lease!.id, by: { seconds: 600n } });
    const [after] = await c.sql<{ job_timeout_ms: number }[]>`select job_timeout_ms::float8 as job_timeout_ms from jobs where id = ${job.id}`;
    expect(after.job_timeout_ms).toBe(job.job_timeout_ms + 600_000);
    await leases().releaseLease({ leaseId: lease!.id });
    expect((await jobInState(c.sql, job.id, "finalized")).reason).toBe("canceled");
  });

  it("keeps a failed job's hosts as an ACTIVE hold lease, cut short by a booking of the host, and cancels the job when it ends", async () => {
    const host = await c.createHost({ tags: uniqueTag() });
    const start = new Date(Date.now() + 30 * 60_000);
    const { lease: booking } = await leases(other.token).createLease({
      hostNames: [host.name],
      duration: hours(1n),
      startTime: { seconds: BigInt(Math.floor(start.getTime() / 1000)) },
    });
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image, hosts: { tags: { none: uniqueTag().t } } }, queueAnyway: true });
    const hold = await c.sql.begin((tx) =>
      createHoldLease(tx, { id: uuidv7(), ownerId: user.id, jobId: job!.id, hostIds: [host.id], holdMs: 3600_000, graceMs: 300_000 }),
    );
    const { lease } = await leases().getLease({ leaseId: hold!.id });
    expect([LeaseKind[lease!.kind], LeaseState[lease!.state], lease!.heldJobId]).toEqual(["HOLD", "ACTIVE", job!.id]);
    expect(timestampDate(lease!.endTime!).getTime()).toBe(Math.floor(start.getTime() / 1000) * 1000);
    expect(lease!.timeline[0].message).toMatch(/\(cut to the start of the next booking\)$/);
    expect((await hostRow(host.id)).lease_id).toBe(hold!.id);
    const [row] = await c.sql<{ lease_id: string }[]>`select lease_id from jobs where id = ${job!.id}`;
    expect(row.lease_id).toBe(hold!.id);
    await leases().releaseLease({ leaseId: hold!.id });
    expect((await jobInState(c.sql, job!.id, "finalized")).reason).toBe("canceled");
    expect((await hostRow(host.id)).lease_id).toBeNull();
    expect((await hostRow(host.id)).booked_from?.getTime()).toBe(Math.floor(start.getTime() / 1000) * 1000);
    await leases(other.token).releaseLease({ leaseId: booking!.id });
  });
  it("applies a per-selector override of the policy to the leases asking for its hosts, by selector or by name, and to no other", async () => {
    const t = uniqueTag().t;
    const small = await hostWith({ tier: "small", t });
    await hostWith({ tier: "small", t });
    const u = await c.createUser();
    const mine = leases(u.token);
    const refusal = async (p: Promise<unknown>) => {
      const err = await p.then(() => undefined, (e: unknown) => ConnectError.from(e));
      return err ? `${Code[err.code]}: ${err.rawMessage}` : "accepted";
    };
    expect(await refusal(mine.createLease({ hosts: { tags: { tier: "small", t } }, duration: hours(2n) }))).toBe(
      "ResourceExhausted: lease policy for tier=small: duration 2h is over the maximum of 1h",
    );
    const { lease } = await mine.createLease({ hosts: { tags: { tier: "small", t } }, duration: hours(1n) });
    expect(await refusal(mine.createLease({ hostNames: [small.name], duration: hours(1n), startTime: tomorrowAt(3) }))).toBe(
      "ResourceExhausted: lease policy for tier=small: at most 1 lease per user at once; you have 1",
    );
    // Hosts outside the selector keep the global limits.
    const tag = uniqueTag();
    await hostWith(tag);
    const { lease: elsewhere } = await mine.createLease({ hosts: { tags: tag }, duration: hours(2n) });
    expect(elsewhere!.state).toBe(LeaseState.ACTIVE);
    await mine.releaseLease({ leaseId: lease!.id });
    await mine.releaseLease({ leaseId: elsewhere!.id });
  });
  it("writes a job that starts inside a lease on the lease's timeline and tells its watchers which job runs on which host", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = await attach(c, host);
    open.push(s);
    const { lease } = await leases().createLease({ hostNames: [host.name], duration: hours(1n) });
    const seen: { jobs: string[]; events: string[] }[] = [];
    const abort = new AbortController();
    const stream = leases().watchLease({ leaseId: lease!.id }, { signal: abort.signal })[Symbol.asyncIterator]();
    await stream.next();
    const { job } = await c.client(JobService, user.token).submitJob({ spec: { image, leaseId: lease!.id } });
    await s.startJob(job!.id);
    await s.report(job!.id, 1, JobState.RUNNING);
    for (;;) {
      const next = await stream.next();
      if (next.done) throw new Error("the stream ended before the job's entry");
      const m = next.value;
      seen.push({ jobs: m.lease!.leaseHosts.map((h) => h.jobId), events: m.events.map((e) => e.message) });
      if (m.events.some((e) => e.kind === LeaseEventKind.JOB)) break;
    }
    expect(seen[seen.length - 1]).toEqual({ jobs: [job!.id], events: [`job ${job!.id} running on ${host.name}`] });
    abort.abort();
    await leases().releaseLease({ leaseId: lease!.id });
  });
  it("moves a booking off a host that went out of service before the lease's start onto another matching host", async () => {
    const tag = uniqueTag();
    const first = await hostWith(tag);
    const second = await hostWith(tag);
    const { lease } = await leases().createLease({
      hosts: { tags: tag },
      duration: hours(1n),
      startTime: { seconds: BigInt(Math.floor(Date.now() / 1000) + 2) },
    });
    expect(lease!.state).toBe(LeaseState.WAITING);
    const booked = lease!.leaseHosts[0].hostName;
    const [gone, other] = booked === first.name ? [first, second] : [second, first];
    await c.sql`update hosts set health = 'quarantined', health_reason = 'test' where id = ${gone.id}`;
    const active = await leaseIn(lease!.id, LeaseState.ACTIVE);
    expect(active.leaseHosts.map((h) => h.hostName)).toEqual([other.name]);
    expect(active.timeline.filter((e) => e.kind === LeaseEventKind.BOOKED).map((e) => e.message)).toEqual([
      expect.stringMatching(new RegExp(`^host ${gone.name} booked from `)),
      `host ${other.name} booked in place of host ${gone.name} (quarantined)`,
    ]);
    expect(await hostRow(gone.id)).toEqual({ lease_id: null, booked_from: null });
    expect((await hostRow(other.id)).lease_id).toBe(lease!.id);
    await leases().releaseLease({ leaseId: lease!.id });
  });
  it("gives the board to the next queued job once its holder's keepalive has been gone for the grace period", async () => {
    const tag = uniqueTag();
    const host = await c.createHost({ tags: tag });
    const s = await attach(c, host);
    open.push(s);
    const holder = new AbortController();
    const { lease } = await leases().createLease({ hosts: { tags: tag }, duration: hours(1n), gracePeriod: { seconds: 0n, nanos: 300_000_000 } });
    const stream = leases().watchLease({ leaseId: lease!.id, keepalive: true }, { signal: holder.signal })[Symbol.asyncIterator]();
    await stream.next();
    const { job } = await c.client(JobService, other.token).submitJob({ spec: { image, hosts: { tags: tag } } });
    // A later job placed elsewhere proves a scheduling pass has seen the first: the leased board took nothing.
    const elsewhere = uniqueTag();
    const free = await c.createHost({ tags: elsewhere });
    const s2 = await attach(c, free);
    open.push(s2);
    const { job: later } = await c.client(JobService, other.token).submitJob({ spec: { image, hosts: { tags: elsewhere } } });
    await s2.startJob(later!.id);
    expect((await c.sql`select state from jobs where id = ${job!.id}`)[0].state).toBe("queued");
    holder.abort();
    await s.startJob(job!.id);
    const { lease: lost } = await leases().getLease({ leaseId: lease!.id });
    expect(lost!.endReason).toBe(LeaseEndReason.LOST);
    const [assigned] = await c.sql<{ at: Date }[]>`select assigned_at as at from jobs where id = ${job!.id}`;
    expect(assigned.at.getTime()).toBeGreaterThanOrEqual(timestampDate(lost!.endReachedTime!).getTime());
  });
});
