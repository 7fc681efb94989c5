/**
 * The scheduler with leases (issue #22; docs/leases.md), end to end through
 * a coordinator, real PostgreSQL and scripted supervisors: a booked host is
 * backfilled only by jobs that end before its booking, a leased host takes
 * its lease's jobs alone, and SubmitJob's checks of spec.lease_id. The
 * lease rows are written here directly, as the lease service writes them
 * (leases, lease_hosts, hosts.lease_id and booked_from).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { randomUUID } from "node:crypto";
import { ConnectError } from "@connectrpc/connect";
import type { TransactionSql } from "postgres";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import type { ScriptedSupervisor } from "../support/scripted-supervisor.js";
import { FAST, type SpecInit, attach, codeOf, insertImage, jobInState, passProbe, jobRow, uniqueTag } from "../support/jobs.js";

const MINUTE = 60_000;

describe("the scheduler with leases", () => {
  let c: TestCoordinator;
  let image: string;
  const open: ScriptedSupervisor[] = [];
  let probeRun: () => Promise<void>;

  beforeAll(async () => {
    // The health keeper sweeps hourly: a test sets a host's health by hand.
    c = await startTestCoordinator({ config: { ...FAST, healthSweepIntervalMs: 3_600_000 } });
    image = (await insertImage(c.sql)).ref;
    probeRun = await passProbe(c, image, open);
  });
  afterAll(async () => {
    await Promise.all(open.map((s) => s.close()));
    await c?.stop();
  });

  async function hostWith(tags: Record<string, string>) {
    const host = await c.createHost({ tags });
    const s = await attach(c, host);
    open.push(s);
    return { host, s };
  }
  async function submit(token: string, spec: SpecInit): Promise<string> {
    const { job } = await c.client(JobService, token).submitJob({ spec: { image, ...spec } });
    return job!.id;
  }
  const hostsOf = async (jobId: string) =>
    (await c.sql<{ host_id: string }[]>`select host_id from job_hosts where job_id = ${jobId} order by host_index`).map((r) => r.host_id);

  /**
   * A lease of `hosts` for `ownerId` over [now + startMs, now + endMs),
   * ACTIVE (its hosts held) or WAITING (booked), and the hosts' columns as
   * the lease service keeps them; the scheduler is woken.
   */
  async function lease(ownerId: string, hosts: { id: string }[], state: "active" | "waiting" | "ended", startMs: number, endMs: number) {
    const id = randomUUID();
    await c.sql.begin(async (tx) => {
      await tx`
        insert into leases (id, owner_id, state, host_count, starts_at, ends_at, grace_ms, activated_at, end_reason, status_message, ended_at)
        values (${id}, ${ownerId}, ${state}, ${hosts.length}, now() + ${startMs} * interval '1 millisecond',
          now() + ${endMs} * interval '1 millisecond', 60000, ${state === "active" ? new Date() : null},
          ${state === "ended" ? "revoked" : null}, ${state === "ended" ? "the board is needed for a demo" : ""},
          ${state === "ended" ? new Date() : null})`;
      await tx`
        insert into lease_hosts (lease_id, host_id, host_index, starts_at, ends_at, open)
        select ${id}, h.id, h.i - 1, l.starts_at, l.ends_at, ${state !== "ended"}
        from unnest(${hosts.map((h) => h.id)}::uuid[]) with ordinality as h(id, i), leases l where l.id = ${id}`;
      await syncHosts(tx, hosts);
    });
    return id;
  }
  /** Ends lease `id` as the lease service does: its bookings closed, its hosts returned. */
  async function endLease(id: string) {
    await c.sql.begin(async (tx) => {
      await tx`update leases set state = 'ended', end_reason = 'released', ended_at = now() where id = ${id}`;
      const hosts = await tx<{ id: string }[]>`update lease_hosts set open = false where lease_id = ${id} returning host_id as id`;
      await syncHosts(tx, hosts);
    });
  }
  async function syncHosts(tx: TransactionSql, hosts: { id: string }[]) {
    await tx`
      update hosts h set
        booked_from = (select min(lh.starts_at) from lease_hosts lh where lh.host_id = h.id and lh.open),
        lease_id = (select lh.lease_id from lease_hosts lh join leases l on l.id = lh.lease_id
                    where lh.host_id = h.id and lh.open and l.state = 'active' limit 1)
      where h.id = any(${hosts.map((h) => h.id)}::uuid[])`;
    await tx`select pg_notify('treadmill_schedule', '')`;
  }

  it("backfills a booked host with a job that ends before the booking starts, and keeps a longer job off it", async () => {
    const booker = await c.createUser();
    const user = await c.createUser();
    const tag = uniqueTag();
    const { host, s } = await hostWith(tag);
    await lease(booker.id, [host], "waiting", 30 * MINUTE, 150 * MINUTE);
    // The long job is ahead in the queue, and would run into the booking.
    const long = await submit(user.token, { hosts: { tags: tag }, jobTimeout: { seconds: 3600n } });
    const short = await submit(user.token, { hosts: { tags: tag }, jobTimeout: { seconds: 600n } });
    await s.startJob(short);
    expect(await hostsOf(short)).toEqual([host.id]);
    await s.exit(short, 1);
    await jobInState(c.sql, short, "finalized");
    await probeRun();
    expect((await jobRow(c.sql, long)).state).toBe("queued");
    await c.client(JobService, user.token).cancelJob({ jobId: long });
  });

  it("keeps every job outside a lease off a host the lease holds, and gives the host back when the lease ends", async () => {
    const holder = await c.createUser();
    const other = await c.createUser();
    const tag = uniqueTag();
    const { host, s } = await hostWith(tag);
    const id = await lease(holder.id, [host], "active", -MINUTE, 60 * MINUTE);
    const outside = await submit(other.token, { hosts: { tags: tag }, priority: 100, jobTimeout: { seconds: 60n } });
    const holders = await submit(holder.token, { hosts: { tags: tag }, jobTimeout: { seconds: 60n } });
    await probeRun();
    expect((await jobRow(c.sql, outside)).state).toBe("queued");
    expect((await jobRow(c.sql, holders)).state).toBe("queued");
    await endLease(id);
    await s.startJob(outside);
    expect(await hostsOf(outside)).toEqual([host.id]);
    await s.exit(outside, 1);
    await s.startJob(holders);
    await s.exit(holders, 1);
  });

  it("places a job inside an active lease on the lease's host ahead of the queue, and waits for a lease not active yet", async () => {
    const holder = await c.createUser();
    const other = await c.createUser();
    const tag = uniqueTag();
    const { host, s } = await hostWith(tag);
    // Booked from a minute ahead, not active yet (the lease keeper would activate a lease whose start has come on a free host).
    const id = await lease(holder.id, [host], "waiting", MINUTE, 60 * MINUTE);
    const outside = await submit(other.token, { hosts: { tags: tag }, priority: 100, jobTimeout: { seconds: 120n } });
    const { job } = await c.client(JobService, holder.token).submitJob({ spec: { image, leaseId: id, hosts: { tags: tag } } });
    expect(job!.leaseId).toBe(id);
    await probeRun();
    expect((await jobRow(c.sql, job!.id)).state).toBe("queued");
    expect((await jobRow(c.sql, outside)).state).toBe("queued");
    // It becomes active: its job goes first; the job outside stays off its host.
    await c.sql.begin(async (tx) => {
      await tx`update leases set state = 'active', activated_at = now() where id = ${id}`;
      await syncHosts(tx, [host]);
    });
    await s.startJob(job!.id);
    expect(await hostsOf(job!.id)).toEqual([host.id]);
    await s.exit(job!.id, 1);
    const second = await submit(holder.token, { leaseId: id });
    await s.startJob(second);
    await s.exit(second, 1);
    await probeRun();
    expect((await jobRow(c.sql, outside)).state).toBe("queued");
    const { jobs } = await c.client(JobService, holder.token).listJobs({ filter: { leaseId: id } });
    expect(jobs.map((j) => j.id).sort()).toEqual([job!.id, second].sort());
    await c.client(JobService, other.token).cancelJob({ jobId: outside });
  });

  it("runs a lease's jobs on its host while a health check due on the host waits for the lease's end", async () => {
    const holder = await c.createUser();
    const tag = uniqueTag();
    const { host, s } = await hostWith(tag);
    const id = await lease(holder.id, [host], "active", -MINUTE, 60 * MINUTE);
    await c.sql`update hosts set health = 'checking' where id = ${host.id}`;
    const inside = await submit(holder.token, { leaseId: id, jobTimeout: { seconds: 60n } });
    await s.startJob(inside);
    expect(await hostsOf(inside)).toEqual([host.id]);
    await s.exit(inside, 1);
    await jobInState(c.sql, inside, "finalized");
  });

  it("refuses a job inside a lease that is malformed, unknown, another user's, ended or too small, and cuts its timeout to the lease's end", async () => {
    const holder = await c.createUser();
    const other = await c.createUser();
    const admin = await c.createUser({ role: "admin" });
    const tag = uniqueTag();
    const { host } = await hostWith(tag);
    const id = await lease(holder.id, [host], "waiting", 60 * MINUTE, 90 * MINUTE);
    const submitAs = (token: string, spec: SpecInit) => c.client(JobService, token).submitJob({ spec: { image, ...spec } });
    const message = async (call: Promise<unknown>) => {
      try {
        await call;
        return "OK";
      } catch (err) {
        return ConnectError.from(err).rawMessage;
      }
    };

    expect(await codeOf(c.client(JobService, holder.token).listJobs({ filter: { leaseId: "L1" } }))).toBe("InvalidArgument");
    expect(await codeOf(submitAs(holder.token, { leaseId: "L1" }))).toBe("InvalidArgument");
    expect(await message(submitAs(holder.token, { leaseId: "L1" }))).toBe("spec.lease_id must be a lower-case uuid");
    expect(await codeOf(submitAs(holder.token, { leaseId: randomUUID() }))).toBe("NotFound");
    expect(await codeOf(submitAs(other.token, { leaseId: id }))).toBe("NotFound");
    expect(await message(submitAs(other.token, { leaseId: id }))).toBe(`lease ${id} not found`);
    expect(await codeOf(submitAs(holder.token, { leaseId: id, hosts: { hostCount: 2 } }))).toBe("InvalidArgument");
    expect(await message(submitAs(holder.token, { leaseId: id, hosts: { hostCount: 2 } }))).toBe(
      `spec.hosts.host_count is 2, more than the 1 host of lease ${id}`,
    );
    const ended = await lease(holder.id, [host], "ended", -60 * MINUTE, -MINUTE);
    expect(await codeOf(submitAs(holder.token, { leaseId: ended }))).toBe("FailedPrecondition");
    expect(await message(submitAs(holder.token, { leaseId: ended }))).toBe(
      `lease ${ended} has ended (revoked: the board is needed for a demo): submit the job outside it or to another lease`,
    );

    // The lease ends in 90 minutes: a job asking for a day gets no more than that; an admin may use it too.
    const { job } = await submitAs(holder.token, { leaseId: id, jobTimeout: { seconds: 86_400n } });
    const [{ timeout }] = await c.sql<{ timeout: number }[]>`select job_timeout_ms::float8 as timeout from jobs where id = ${job!.id}`;
    expect(timeout).toBeLessThanOrEqual(90 * MINUTE);
    expect(timeout).toBeGreaterThan(85 * MINUTE);
    expect(Number(job!.spec!.jobTimeout!.seconds)).toBe(Math.floor(timeout / 1000));
    const { job: admins } = await submitAs(admin.token, { leaseId: id, jobTimeout: { seconds: 60n } });
    expect(admins!.leaseId).toBe(id);
    expect(Number(admins!.spec!.jobTimeout!.seconds)).toBe(60);
    await c.client(JobService, holder.token).cancelJob({ jobId: job!.id });
    await c.client(JobService, admin.token).cancelJob({ jobId: admins!.id });
  });
});
