/**
 * Builds StartJob commands from the database: everything a supervisor needs
 * to run an attempt, secret parameter values included (they are read from
 * job_secrets here and nowhere else), with freshly minted capability tokens.
 */
import { create, fromJson, type JsonValue } from "@bufbuild/protobuf";
import { timestampFromDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import { JobSpecSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { type StartJob, StartJobSchema } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { Capability } from "../../lib/tokens.js";
import type { CoordinatorContext } from "../context.js";
import { uuidv7 } from "../shared/common.js";
import type { Db } from "../db/queries/jobs.js";

/** Tokens outlive the attempt's deadline by this much (a stop takes time). */
const TOKEN_MARGIN_MS = 10 * 60_000;

/** What a StartJob is built from: a job row (`j`), its host (`h`) and what they point at. */
export interface StartRow {
  id: string;
  attempt: number;
  spec: JsonValue;
  manifest_digest: string;
  owner_id: string;
  /** The holder the image token names (jobs.image_holder; null: the owner). */
  image_holder: string | null;
  deadline_at: Date | null;
  log_server_urls: string[];
  proxy_url: string;
  host_index: number;
  secrets: Record<string, string>;
  locations: string[] | null;
  cache_url: string | null;
  peers: { index: number; id: string; name: string }[] | null;
}

/**
 * The select list of a StartRow but for `host_index` and `peers`: the job's
 * columns from `j` (jobs, or an update's returned rows), the secret values,
 * the image's locations (the host's site first) and the site's cache from `h`
 * (hosts).
 */
export const startColumns = (sql: Db) => sql`
  j.id, j.attempt, j.spec, j.manifest_digest, j.owner_id, j.image_holder, j.deadline_at, j.log_server_urls, j.proxy_url,
  (select coalesce(jsonb_object_agg(s.name, s.value), '{}') from job_secrets s where s.job_id = j.id) as secrets,
  (select array_agg(u order by same_site desc, first_seen)
     from (select l->>'url' as u, bool_or(coalesce(l->>'site', '') = h.site) as same_site, min(i.created_at) as first_seen
           from images i, jsonb_array_elements(i.locations) l
           where i.digest = j.manifest_digest and coalesce(l->>'url', '') <> ''
           group by l->>'url') loc) as locations,
  (select s.url from services s
     where s.kind = 'image_cache' and s.site = h.site and not s.draining
       and s.last_heartbeat_at > now() - (3 * s.heartbeat_interval_ms) * interval '1 millisecond'
     order by s.active_streams, s.url limit 1) as cache_url`;

/** StartJob for each current, unfinalized attempt of `jobIds` on `hostId`. */
export async function buildStartJobs(ctx: CoordinatorContext, sql: Db, hostId: string, jobIds: string[]): Promise<StartJob[]> {
  const rows = await sql<StartRow[]>`
    select ${startColumns(sql)}, jh.host_index,
      (select jsonb_agg(jsonb_build_object('index', p.host_index, 'id', p.host_id, 'name', ph.name) order by p.host_index)
         from job_hosts p join hosts ph on ph.id = p.host_id
         where p.job_id = j.id and p.attempt = j.attempt) as peers
    from jobs j
      join job_hosts jh on jh.job_id = j.id and jh.attempt = j.attempt and jh.host_id = ${hostId}
      join hosts h on h.id = jh.host_id
    where j.id = any(${jobIds}::uuid[]) and j.state <> 'finalized'`;
  return startJobMessages(ctx, hostId, rows);
}

/** The capability tokens of a StartJob. */
export interface StartTokens {
  logToken: TokenMessage;
  imageToken: TokenMessage;
  exposeToken: TokenMessage | undefined;
}

type TokenMessage = { token: string; scope: CapabilityScope; expireTime: ReturnType<typeof timestampFromMs> };

/**
 * Mints the tokens of a StartJob of job `jobId` (image `digest`) for
 * `hostId`, valid until the attempt's deadline plus a margin; the expose
 * token only for a job given a proxy. The image token names the job's image
 * holder (`holder`, else the owner) and is minted for the job's owner, for
 * whom the supervisor reads the image: so a snapshot's upload (a write token
 * of the owner) may mount the image's layers with it (supervisor/snapshot.ts).
 */
export async function mintStartTokens(
  ctx: CoordinatorContext,
  t: { hostId: string; jobId: string; digest: string; ownerId: string; holder: string | null; withProxy: boolean; deadlineMs: number },
): Promise<StartTokens> {
  const now = ctx.clock();
  const ttl = Math.max(60_000, t.deadlineMs - now + TOKEN_MARGIN_MS);
  const token = async (capability: Capability, scope: CapabilityScope, subject = t.hostId) => ({
    token: await ctx.keys.sign(capability, ttl, { subject }),
    scope,
    expireTime: timestampFromMs(now + ttl),
  });
  const [logToken, imageToken, exposeToken] = await Promise.all([
    token({ scope: "log:write", job: t.jobId }, CapabilityScope.LOG_WRITE),
    token({ scope: "image:read", digest: t.digest, holder: t.holder ?? t.ownerId }, CapabilityScope.IMAGE_READ, t.ownerId),
    t.withProxy ? token({ scope: "tunnel:expose", job: t.jobId }, CapabilityScope.TUNNEL_EXPOSE) : undefined,
  ]);
  return { logToken, imageToken, exposeToken };
}

/**
 * The StartJob messages of `rows` for `hostId`, with freshly minted tokens,
 * or those `minted` holds for a row (by job id: the scheduler mints them
 * while its assignment is being written).
 */
export function startJobMessages(
  ctx: CoordinatorContext,
  hostId: string,
  rows: StartRow[],
  minted?: Map<string, Promise<StartTokens>>,
): Promise<StartJob[]> {
  const now = ctx.clock();
  return Promise.all(
    rows.map(async (r) => {
      const spec = fromJson(JobSpecSchema, r.spec, { ignoreUnknownFields: true });
      for (const p of spec.parameters) if (p.secret) p.value = r.secrets[p.name] ?? "";
      const { logToken, imageToken, exposeToken } = await (minted?.get(r.id) ??
        mintStartTokens(ctx, {
          hostId,
          jobId: r.id,
          digest: r.manifest_digest,
          ownerId: r.owner_id,
          holder: r.image_holder,
          withProxy: r.proxy_url !== "",
          deadlineMs: r.deadline_at?.getTime() ?? now + 3600_000,
        }));
      return create(StartJobSchema, {
        requestId: uuidv7(now),
        jobId: r.id,
        attempt: r.attempt,
        spec,
        image: {
          manifestDigest: r.manifest_digest,
          cacheUrl: r.cache_url ?? "",
          locationUrls: r.locations ?? [],
          readToken: imageToken,
        },
        logs: { serverUrls: r.log_server_urls, writeToken: logToken },
        proxy: exposeToken ? { url: r.proxy_url, exposeToken } : undefined,
        deadline: r.deadline_at ? timestampFromDate(r.deadline_at) : undefined,
        hostIndex: r.host_index,
        peers: (r.peers ?? []).map((p) => ({ index: p.index, hostId: p.id, hostName: p.name })),
      });
    }),
  );
}
