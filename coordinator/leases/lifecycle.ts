/**
 * The steps of a lease's life that both LeaseService and the lease keeper
 * take (docs/leases.md): booking hosts for a REQUESTED lease (-> WAITING)
 * and activating a WAITING one whose start has come and whose hosts are
 * free (-> ACTIVE, with its session job when it has an image; a booked host
 * gone out of service meanwhile is replaced first). Each runs in the
 * caller's transaction with the lease row locked; both may book, which needs
 * `lockBookings`, taken before that lock.
 */
import { create, toJson } from "@bufbuild/protobuf";
import type { TransactionSql } from "postgres";
import { JobSpecSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import type { CoordinatorContext } from "../context.js";
import { audit } from "../db/queries/audit.js";
import { recordEvent } from "../db/queries/events.js";
import { imageForJob, insertJob, notifySchedule } from "../db/queries/jobs.js";
import {
  type LeaseRow,
  activateLease,
  bookHosts,
  type MovableBooking,
  bookingsOfBusyHosts,
  bookingsOutOfService,
  dropBookings,
  leaseWaits,
  loadLease,
  namedHostsBusy,
  recordLeaseEvents,
  selectorOf,
} from "../db/queries/leases.js";
import { uuidv7 } from "../shared/common.js";

/** The media types a lease's hosts must run: its image's (none for a bare lease or a vanished image). */
async function mediaOf(tx: TransactionSql, lease: LeaseRow): Promise<string[]> {
  if (lease.manifest_digest === null) return [];
  return (await imageForJob(tx, lease.owner_id, { digest: lease.manifest_digest }))?.media_types ?? [];
}

/**
 * Books hosts for REQUESTED lease `lease` over [max(start, now), end); it
 * becomes WAITING. Returns false (and says why on the lease) when the
 * calendar has no room.
 */
export async function bookLease(tx: TransactionSql, lease: LeaseRow, now: Date): Promise<boolean> {
  const from = lease.starts_at > now ? lease.starts_at : now;
  const hosts = await bookHosts(tx, lease.id, selectorOf(lease, await mediaOf(tx, lease)), from, lease.ends_at);
  if (hosts === undefined) {
    const what = lease.host_names.length > 0 ? `host ${lease.host_names.join(", ")}` : `${lease.host_count} matching host${lease.host_count === 1 ? "" : "s"}`;
    const busy = lease.host_names.length > 0 ? await namedHostsBusy(tx, lease.host_names, from, lease.ends_at) : [];
    // Its own window, not `from`: the message changes (and goes on the timeline) only when the reason does.
    const window = `${lease.starts_at.toISOString()} to ${lease.ends_at.toISOString()}`;
    const booked = busy.length > 0 ? ` (booked: ${busy.join(", ")})` : "";
    await leaseWaits(tx, lease, `no room in the calendar: ${what} not free from ${window}${booked}; retried until ${(lease.deadline_at ?? lease.ends_at).toISOString()}`);
    return false;
  }
  const waiting = lease.starts_at > now ? `waiting for its start at ${lease.starts_at.toISOString()}` : "";
  await tx`update leases set state = 'waiting', status_message = ${waiting} where id = ${lease.id}`;
  const names = await tx<{ id: string; name: string }[]>`select id, name from hosts where id = any(${hosts}::uuid[])`;
  const nameOf = new Map(names.map((h) => [h.id, h.name]));
  await recordLeaseEvents(
    tx,
    lease.id,
    hosts.map((id) => ({ kind: "booked" as const, state: "waiting" as const, hostId: id, message: `host ${nameOf.get(id)} booked from ${from.toISOString()}` })),
  );
  if (waiting !== "") await recordLeaseEvents(tx, lease.id, [{ kind: "waiting", state: "waiting", message: waiting }]);
  await audit(tx, {
    kind: "lease.book",
    actor: "system",
    userId: lease.owner_id,
    message: `lease ${lease.id} booked ${hosts.map((id) => nameOf.get(id)).join(", ")}`,
    details: { leaseId: lease.id, hosts, from: from.toISOString(), to: lease.ends_at.toISOString() },
  });
  return true;
}

/**
 * Activates WAITING lease `lease` when none of its hosts runs a job, and
 * submits its session job when it has an image; otherwise records which
 * host it waits for. Returns whether it became ACTIVE.
 */
export async function activate(tx: TransactionSql, ctx: Pick<CoordinatorContext, "clock">, lease: LeaseRow, actor: string): Promise<boolean> {
  if (!(await rebook(tx, lease, await bookingsOutOfService(tx, lease.id)))) return false;
  let { busy } = await activateLease(tx, lease, actor);
  // A lease for any matching host takes one that is free now rather than wait for the one it booked.
  if (busy.length > 0 && (await rebook(tx, lease, await bookingsOfBusyHosts(tx, lease.id, busy), { freeNow: true, partial: true }))) {
    ({ busy } = await activateLease(tx, lease, actor));
  }
  if (busy.length > 0) {
    const what = busy.map((b) => `host ${b.name} still runs ${b.job ? `job ${b.job}` : "a job"}`).join("; ");
    await leaseWaits(tx, lease, `waiting for its hosts to be free: ${what}`);
    return false;
  }
  if (lease.image !== "") await submitSessionJob(tx, ctx, (await loadLease(tx, lease.id))!);
  return true;
}

/**
 * Moves the bookings `moving` of lease `lease` (on hosts gone out of service
 * since they were booked, or still busy with another job) onto other
 * matching hosts free over the rest of its window -- with `freeNow`, only
 * hosts free at this moment -- and says so on its timeline. A lease by host
 * names keeps them: its holder asked for those. Returns whether every
 * booking moved (with `partial`: whether any did); when not, says why on the
 * lease unless `partial`, and the keeper tries again at its next sweep.
 */
async function rebook(tx: TransactionSql, lease: LeaseRow, moving: MovableBooking[], options: { freeNow?: boolean; partial?: boolean } = {}): Promise<boolean> {
  if (lease.host_names.length > 0 || moving.length === 0) return !options.partial;
  const [{ now }] = await tx<{ now: Date }[]>`select now() as now`;
  const from = lease.starts_at > now ? lease.starts_at : now;
  const selector = { ...selectorOf(lease, await mediaOf(tx, lease)), hostCount: 1 };
  const moved: { from: MovableBooking; to: string }[] = [];
  for (const booking of moving) {
    const [to] = (await bookHosts(tx, lease.id, selector, from, lease.ends_at, [booking.host_index], { freeNow: options.freeNow })) ?? [];
    if (to !== undefined) moved.push({ from: booking, to });
    else if (!options.partial) break;
  }
  if (moved.length > 0) {
    await dropBookings(
      tx,
      lease.id,
      moved.map((m) => m.from.host_id),
    );
    const names = await tx<{ id: string; name: string }[]>`select id, name from hosts where id = any(${moved.map((m) => m.to)}::uuid[])`;
    const nameOf = new Map(names.map((h) => [h.id, h.name]));
    await recordLeaseEvents(
      tx,
      lease.id,
      moved.map((m) => ({ kind: "booked" as const, state: lease.state, hostId: m.to, message: `host ${nameOf.get(m.to)} booked in place of host ${m.from.name} (${m.from.why})` })),
    );
    const what = moved.map((m) => `host ${m.from.name} is ${m.from.why}`).join("; ");
    await audit(tx, {
      kind: "lease.book",
      actor: "system",
      userId: lease.owner_id,
      message: `lease ${lease.id}: ${what}; booked ${moved.map((m) => nameOf.get(m.to)).join(", ")} instead`,
      details: { leaseId: lease.id, replaced: moved.map((m) => m.from.host_id), hosts: moved.map((m) => m.to) },
    });
  }
  if (options.partial) return moved.length > 0;
  if (moved.length < moving.length) {
    const what = moving.map((g) => `host ${g.name} is ${g.why}`).join("; ");
    await leaseWaits(tx, lease, `${what}, and no other matching host is free until ${lease.ends_at.toISOString()}`);
    return false;
  }
  return true;
}

/**
 * The session job of an ACTIVE lease with an image: owned by its holder,
 * on all its hosts, inside it (jobs.lease_id), until the lease's end.
 */
async function submitSessionJob(tx: TransactionSql, ctx: Pick<CoordinatorContext, "clock">, lease: LeaseRow): Promise<void> {
  const image = lease.manifest_digest === null ? undefined : await imageForJob(tx, lease.owner_id, { digest: lease.manifest_digest });
  if (!image || !image.allowed) {
    await recordLeaseEvents(tx, lease.id, [
      { kind: "job", state: "active", message: `no session job: image ${lease.image} is gone or no longer visible to the holder; the hosts are bare` },
    ]);
    return;
  }
  const [{ now }] = await tx<{ now: Date }[]>`select now() as now`;
  const timeoutMs = Math.max(1000, lease.ends_at.getTime() - now.getTime());
  const id = uuidv7(ctx.clock());
  const spec = create(JobSpecSchema, {
    image: lease.image,
    hosts: { hostCount: lease.host_count },
    parameters: lease.parameters.map((p) => ({ name: p.name, value: p.value, secret: false })),
    jobTimeout: { seconds: BigInt(Math.ceil(timeoutMs / 1000)) },
    queueTimeout: { seconds: BigInt(Math.ceil(timeoutMs / 1000)) },
    description: `session of lease ${lease.id}`,
    leaseId: lease.id,
  });
  await insertJob(tx, {
    id,
    ownerId: lease.owner_id,
    spec: toJson(JobSpecSchema, spec),
    priority: 0,
    digest: image.digest,
    holderId: image.holder_id,
    mediaTypes: image.media_types,
    hostCount: lease.host_count,
    requiredTags: {},
    requiredSite: null,
    requiredDriver: null,
    maxRestarts: 0,
    queueTimeoutMs: timeoutMs,
    jobTimeoutMs: timeoutMs,
    requestId: null,
    secrets: new Map(),
    leaseId: lease.id,
  });
  await tx`update leases set session_job_id = ${id} where id = ${lease.id}`;
  await recordEvent(tx, {
    jobId: id,
    kind: "submitted",
    state: "queued",
    attempt: 1,
    actor: "system",
    ownerId: lease.owner_id,
    message: `session of lease ${lease.id}: image ${image.name}:${image.tag} (${image.digest})`,
  });
  await recordLeaseEvents(tx, lease.id, [{ kind: "job", state: "active", message: `session job ${id} submitted (image ${lease.image})` }]);
  await notifySchedule(tx);
}
