/**
 * Snapshot operations (table `snapshots`, migration 0005) and the images
 * they register (table `images`): the statements of
 * coordinator/jobs/snapshots.ts, their only writer. SnapshotJob inserts an
 * operation PENDING; the supervisor's SnapshotResult registers the image and
 * ends it SUCCEEDED, or ends it FAILED; a read that finds its host gone for
 * good ends it FAILED. 'treadmill_snapshots' (payload a host id) tells the
 * replica holding that host's stream to send TakeSnapshot.
 */
import type { Sql, TransactionSql } from "postgres";
import type { DbState } from "./jobs.js";

type Db = Sql | TransactionSql;

export interface SnapshotRow {
  id: string;
  job_id: string;
  attempt: number;
  host_id: string;
  owner_id: string;
  name: string;
  tag: string;
  state: "pending" | "succeeded" | "failed";
  message: string;
  manifest_digest: string;
  upload_service_id: string;
  upload_url: string;
  upload_site: string;
  annotations: Record<string, string>;
  request_id: string | null;
  created_at: Date;
  finished_at: Date | null;
}

/** Where a snapshot's image is uploaded: an image cache or store. */
export interface UploadTarget {
  id: string;
  url: string;
  site: string;
}

/** A new operation, PENDING. */
export interface NewSnapshot {
  id: string;
  jobId: string;
  attempt: number;
  hostId: string;
  ownerId: string;
  name: string;
  tag: string;
  target: UploadTarget;
  annotations: Record<string, string>;
  requestId: string | null;
}

export async function snapshot(sql: Db, id: string, options: { lock?: boolean } = {}): Promise<SnapshotRow | undefined> {
  const [row] = options.lock
    ? await sql<SnapshotRow[]>`select * from snapshots where id = ${id} for update`
    : await sql<SnapshotRow[]>`select * from snapshots where id = ${id}`;
  return row;
}

/** The operation if it is the host's, its row locked (a SnapshotResult). */
export async function lockSnapshotOfHost(tx: Db, id: string, hostId: string): Promise<SnapshotRow | undefined> {
  const [row] = await tx<SnapshotRow[]>`select * from snapshots where id = ${id} and host_id = ${hostId} for update`;
  return row;
}

/** The caller's operation made with `requestId`, if any (SnapshotJob's idempotency). */
export async function snapshotOfRequest(
  sql: Db,
  ownerId: string,
  requestId: string,
): Promise<Pick<SnapshotRow, "id" | "job_id" | "name" | "tag"> | undefined> {
  const [row] = await sql<Pick<SnapshotRow, "id" | "job_id" | "name" | "tag">[]>`
    select id, job_id, name, tag from snapshots where owner_id = ${ownerId} and request_id = ${requestId}`;
  return row;
}

/** Inserts a PENDING operation; a second pending one to the same name:tag violates `snapshots_pending_name_idx`. */
export async function insertSnapshot(tx: Db, s: NewSnapshot): Promise<void> {
  await tx`
    insert into snapshots (id, job_id, attempt, host_id, owner_id, name, tag, upload_service_id, upload_url, upload_site,
      annotations, request_id)
    values (${s.id}, ${s.jobId}, ${s.attempt}, ${s.hostId}, ${s.ownerId}, ${s.name}, ${s.tag}, ${s.target.id}, ${s.target.url},
      ${s.target.site}, ${tx.json(s.annotations)}, ${s.requestId})`;
}

/** Tells the replica holding the host's stream to send its pending snapshots. */
export async function notifySnapshots(tx: Db, hostId: string): Promise<void> {
  await tx`select pg_notify('treadmill_snapshots', ${hostId})`;
}

export async function failSnapshotRow(tx: Db, id: string, message: string): Promise<void> {
  await tx`update snapshots set state = 'failed', message = ${message}, finished_at = now() where id = ${id}`;
}

export async function succeedSnapshot(tx: Db, id: string, manifestDigest: string): Promise<void> {
  await tx`
    update snapshots set state = 'succeeded', manifest_digest = ${manifestDigest}, message = '', finished_at = now()
    where id = ${id}`;
}

/** The job's state, for a snapshot's timeline event. */
export async function jobStateOf(tx: Db, jobId: string): Promise<DbState | undefined> {
  const [job] = await tx<{ state: DbState }[]>`select state from jobs where id = ${jobId}`;
  return job?.state;
}

/** What the image of a snapshot inherits from its job: the base image's media types, owner and annotations. */
export async function snapshotBase(
  tx: Db,
  jobId: string,
): Promise<{ media_types: string[]; owner_id: string; annotations: Record<string, string> | null } | undefined> {
  const [base] = await tx<{ media_types: string[]; owner_id: string; annotations: Record<string, string> | null }[]>`
    select j.media_types, j.owner_id,
      (select i.annotations from images i where i.digest = j.manifest_digest order by i.created_at limit 1) as annotations
    from jobs j where j.id = ${jobId}`;
  return base;
}

/** A snapshot's image for the catalog, private. */
export interface SnapshotImage {
  name: string;
  tag: string;
  digest: string;
  mediaTypes: string[];
  size: bigint;
  ownerId: string;
  holderId: string;
  location: UploadTarget;
  annotations: Record<string, string>;
  jobId: string;
}

/** Registers the image; false when `name:tag` was taken meanwhile. */
export async function registerSnapshotImage(tx: Db, i: SnapshotImage): Promise<boolean> {
  const location = [{ service: i.location.id, url: i.location.url, site: i.location.site }];
  const inserted = await tx`
    insert into images (name, tag, digest, media_types, size, owner_id, holder_id, visibility, locations, annotations, source_job_id,
      created_at, updated_at)
    values (${i.name}, ${i.tag}, ${i.digest}, ${i.mediaTypes}, ${i.size.toString()}::bigint, ${i.ownerId},
      ${i.holderId}, 'private',
      ${tx.json(location as never)}, ${tx.json(i.annotations)}, ${i.jobId}, now(), now())
    on conflict (name, tag) do nothing
    returning name`;
  return inserted.length > 0;
}

/** The host a snapshot would be taken on. */
export async function snapshotHost(tx: Db, hostId: string): Promise<{ name: string; driver_kind: string; site: string } | undefined> {
  const [host] = await tx<{ name: string; driver_kind: string; site: string }[]>`
    select name, driver_kind, site from hosts where id = ${hostId}`;
  return host;
}

/** Whether the host is gone for good: detached longer than `graceMs`; undefined when it does not exist. */
export async function hostGoneFor(tx: Db, hostId: string, graceMs: number): Promise<{ name: string; gone: boolean } | undefined> {
  const [host] = await tx<{ name: string; gone: boolean }[]>`
    select name, attach_session is null
      and coalesce(detached_at, now()) < now() - ${graceMs} * interval '1 millisecond' as gone
    from hosts where id = ${hostId}`;
  return host;
}

export async function imageExists(tx: Db, name: string, tag: string): Promise<boolean> {
  const [taken] = await tx`select 1 from images where name = ${name} and tag = ${tag}`;
  return taken !== undefined;
}

/** The site's live image cache with the fewest streams. */
export async function liveSiteCache(tx: Db, site: string): Promise<UploadTarget | undefined> {
  const [cache] = await tx<UploadTarget[]>`
    select s.id, s.url, s.site from services s
    where s.kind = 'image_cache' and s.site = ${site} and not s.draining
      and s.last_heartbeat_at > now() - (3 * s.heartbeat_interval_ms) * interval '1 millisecond'
    order by s.active_streams, s.url limit 1`;
  return cache;
}

/** The first store (by the image's age, then location order) holding `manifestDigest`. */
export async function firstStoreOf(tx: Db, manifestDigest: string): Promise<UploadTarget | undefined> {
  const [store] = await tx<UploadTarget[]>`
    select l->>'service' as id, l->>'url' as url, coalesce(l->>'site', '') as site
    from images i, jsonb_array_elements(i.locations) with ordinality as x(l, n)
    where i.digest = ${manifestDigest} and coalesce(l->>'url', '') <> ''
      and coalesce(l->>'service', '') ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
    order by i.created_at, x.n limit 1`;
  return store;
}

/** The host's pending operations, with their jobs' owners (who hold what the supervisor uploads). */
export function pendingSnapshotsOfHost(sql: Db, hostId: string): Promise<(SnapshotRow & { job_owner_id: string })[]> {
  return sql<(SnapshotRow & { job_owner_id: string })[]>`
    select s.*, j.owner_id as job_owner_id from snapshots s join jobs j on j.id = s.job_id
    where s.host_id = ${hostId} and s.state = 'pending' order by s.id`;
}
