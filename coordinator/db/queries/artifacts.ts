/**
 * The listing of jobs' artifacts (tables `artifact_sets` and
 * `job_artifacts`, migration 0023): the statements of
 * coordinator/jobs/artifacts.ts (the supervisors' reports, the RPCs, inputs
 * at submit and start) and of the retention keeper. A set is what one host
 * uploaded for one attempt, listed by one store manifest.
 */
import type { Sql, TransactionSql } from "postgres";

type Db = Sql | TransactionSql;

export interface ArtifactFileRow {
  name: string;
  size_bytes: string;
  digest: string;
  media_type: string;
}

/** An artifact as listed, with its set's manifest and store. */
export interface ArtifactRow extends ArtifactFileRow {
  job_id: string;
  attempt: number;
  manifest_digest: string;
  store_url: string;
  created_at: Date;
}

/** A set of one attempt on one host, as the access and the keeper need it. */
export interface ArtifactSetRow {
  id: string;
  job_id: string;
  attempt: number;
  owner_id: string;
  manifest_digest: string;
  store_url: string;
  total_bytes: string;
}

/**
 * Records a host's set of an attempt with its files; false (nothing written)
 * when the host's set of that attempt is recorded already (a repeated report).
 */
export async function insertArtifactSet(
  tx: Db,
  set: { id: string; jobId: string; attempt: number; hostId: string; ownerId: string; reportId: string; manifestDigest: string; storeUrl: string },
  files: { name: string; size: bigint; digest: string; mediaType: string }[],
): Promise<boolean> {
  const total = files.reduce((sum, f) => sum + f.size, 0n);
  const inserted = await tx`
    insert into artifact_sets (id, job_id, attempt, host_id, owner_id, report_id, manifest_digest, store_url, total_bytes)
    values (${set.id}, ${set.jobId}, ${set.attempt}, ${set.hostId}, ${set.ownerId}, ${set.reportId}, ${set.manifestDigest},
      ${set.storeUrl}, ${total.toString()})
    on conflict (job_id, attempt, host_id) do nothing returning id`;
  if (inserted.length === 0) return false;
  if (files.length > 0) {
    await tx`
      insert into job_artifacts (set_id, job_id, attempt, name, size_bytes, digest, media_type)
      select ${set.id}, ${set.jobId}, ${set.attempt}, n, s::bigint, d, m
      from unnest(${files.map((f) => f.name)}::text[], ${files.map((f) => f.size.toString())}::text[],
        ${files.map((f) => f.digest)}::text[], ${files.map((f) => f.mediaType)}::text[]) as x(n, s, d, m)
      on conflict (job_id, attempt, name) do nothing`;
  }
  return true;
}

/** The newest attempt of `jobId` with artifacts not removed; undefined when none. */
export async function newestArtifactAttempt(sql: Db, jobId: string): Promise<number | undefined> {
  const [row] = await sql<{ attempt: number }[]>`
    select max(attempt) as attempt from job_artifacts where job_id = ${jobId}`;
  return row?.attempt ?? undefined;
}

/** The artifacts of an attempt, by name. */
export function artifactsOf(sql: Db, jobId: string, attempt: number): Promise<ArtifactRow[]> {
  return sql<ArtifactRow[]>`
    select a.job_id, a.attempt, a.name, a.size_bytes::text, a.digest, a.media_type, s.manifest_digest, s.store_url, a.created_at
    from job_artifacts a join artifact_sets s on s.id = a.set_id
    where a.job_id = ${jobId} and a.attempt = ${attempt} and s.removed_at is null
    order by a.name`;
}

/** The live sets of an attempt that hold files. */
export function setsOf(sql: Db, jobId: string, attempt: number): Promise<ArtifactSetRow[]> {
  return sql<ArtifactSetRow[]>`
    select id, job_id, attempt, owner_id, manifest_digest, store_url, total_bytes::text from artifact_sets
    where job_id = ${jobId} and attempt = ${attempt} and removed_at is null and manifest_digest <> ''
    order by host_id`;
}

/** The newest live artifact of `jobId` named `name`, with its set (an input's source). */
export async function artifactNamed(sql: Db, jobId: string, name: string): Promise<(ArtifactRow & { owner_id: string }) | undefined> {
  const [row] = await sql<(ArtifactRow & { owner_id: string })[]>`
    select a.job_id, a.attempt, a.name, a.size_bytes::text, a.digest, a.media_type, s.manifest_digest, s.store_url, a.created_at,
      s.owner_id
    from job_artifacts a join artifact_sets s on s.id = a.set_id
    where a.job_id = ${jobId} and a.name = ${name} and s.removed_at is null
    order by a.attempt desc limit 1`;
  return row;
}

/** The live image store artifacts are uploaded to: the one with the most free bytes. */
export async function artifactStore(sql: Db): Promise<string | undefined> {
  const [row] = await sql<{ url: string }[]>`
    select url from services s
    where kind = 'image_store' and not draining
      and last_heartbeat_at > now() - (3 * heartbeat_interval_ms) * interval '1 millisecond'
    order by free_bytes desc, id limit 1`;
  return row?.url;
}

/**
 * Live sets past retention, oldest first: older than `maxAgeMs` (0: none by
 * age), or beyond `maxUserBytes` of their owner's newest sets (0: no cap).
 */
export function setsPastRetention(sql: Db, policy: { maxAgeMs: number; maxUserBytes: number; limit: number }): Promise<ArtifactSetRow[]> {
  return sql<ArtifactSetRow[]>`
    with live as (
      select id, job_id, attempt, owner_id, manifest_digest, store_url, total_bytes, created_at,
        sum(total_bytes) over (partition by owner_id order by created_at desc, id desc) as newer_bytes
      from artifact_sets where removed_at is null)
    select id, job_id, attempt, owner_id, manifest_digest, store_url, total_bytes::text from live
    where (${policy.maxAgeMs}::bigint > 0 and created_at < now() - ${policy.maxAgeMs}::bigint * interval '1 millisecond')
      or (${policy.maxUserBytes}::bigint > 0 and newer_bytes > ${policy.maxUserBytes}::bigint)
    order by created_at, id limit ${policy.limit}`;
}

/** Marks a set removed and drops its listing; false when another replica did first. */
export async function markSetRemoved(tx: Db, id: string): Promise<boolean> {
  const rows = await tx`update artifact_sets set removed_at = now() where id = ${id} and removed_at is null returning id`;
  if (rows.length === 0) return false;
  await tx`delete from job_artifacts where set_id = ${id}`;
  return true;
}
