/**
 * Builds StartJob commands from the database: everything a supervisor needs
 * to run an attempt, secret parameter values included (they are read from
 * job_secrets here and nowhere else), with freshly minted capability tokens.
 */
import { create, fromJson } from "@bufbuild/protobuf";
import { timestampFromDate, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import { JobSpecSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { type StartJob, StartJobSchema } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { Capability } from "../../lib/tokens.js";
import type { CoordinatorContext } from "../context.js";
import { uuidv7 } from "../shared/common.js";
import { artifactTarget, inputSources } from "./artifacts.js";
import { type Db, type StartRow, startRows } from "../db/queries/jobs.js";

/** Tokens outlive the attempt's deadline by this much (a stop takes time). */
const TOKEN_MARGIN_MS = 10 * 60_000;

/** StartJob for each current, unfinalized attempt of `jobIds` on `hostId`. */
export async function buildStartJobs(ctx: CoordinatorContext, sql: Db, hostId: string, jobIds: string[]): Promise<StartJob[]> {
  return startJobMessages(ctx, hostId, await startRows(sql, hostId, jobIds));
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
      // Artifacts and inputs: their tokens last as the start tokens do.
      const fileTtl = Math.max(60_000, (r.deadline_at?.getTime() ?? now + 3600_000) - now + TOKEN_MARGIN_MS);
      const files = Promise.all([
        spec.artifacts?.disabled ? undefined : artifactTarget(ctx, r.owner_id, fileTtl),
        spec.inputs.length === 0 ? [] : inputSources(ctx, spec.inputs, r.owner_id, fileTtl),
      ]);
      for (const p of spec.parameters) if (p.secret) p.value = r.secrets[p.name] ?? "";
      const [{ logToken, imageToken, exposeToken }, [artifacts, inputs]] = await Promise.all([
        minted?.get(r.id) ??
        mintStartTokens(ctx, {
          hostId,
          jobId: r.id,
          digest: r.manifest_digest,
          ownerId: r.owner_id,
          holder: r.image_holder,
          withProxy: r.proxy_url !== "",
          deadlineMs: r.deadline_at?.getTime() ?? now + 3600_000,
        }),
        files,
      ]);
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
        // The coordinator takes the HELD report: transitions.ts gives it its lease.
        holdOnFailure: spec.holdOnFailure !== undefined,
        artifacts,
        inputs,
      });
    }),
  );
}
