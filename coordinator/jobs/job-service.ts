/**
 * JobService: submit, read, list, cancel and watch jobs; log access. A user
 * sees and acts on its own jobs, an admin on all. SnapshotJob is in
 * snapshots.ts, ControlHost in host-control.ts.
 */
import { create, fromJson, toJson } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import {
  type CancelJobRequest,
  type CompareJobResultsRequest,
  type ListJobResultsRequest,
  type ControlHostRequest,
  type GetJobArtifactAccessRequest,
  type GetJobLogAccessRequest,
  type ListJobArtifactsRequest,
  type GetJobRequest,
  type JobFilter,
  JobChangeKind,
  type JobService,
  type ListJobsRequest,
  type OpenJobSessionRequest,
  type RerunJobRequest,
  type SnapshotJobRequest,
  type SubmitJobRequest,
  type WatchJobRequest,
  type WatchJobResponse,
  WatchJobResponseSchema,
  type WatchJobsRequest,
  type WatchJobsResponse,
  WatchJobsResponseSchema,
} from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { type Job, JobSpecSchema, JobState, ParameterSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { actorOf } from "../audit.js";
import { audit } from "../db/queries/audit.js";
import { type UserCaller, requireUser } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import {
  checkId,
  checkTags,
  checkText,
  clip,
  decodePageToken,
  denied,
  encodePageToken,
  invalid,
  notFound,
  pageSize,
  precondition,
  uuidv7,
} from "../shared/common.js";
import type { JobConfig } from "./config.js";
import { AsyncQueue } from "../../lib/async/queue.js";
import {
  type Db,
  type ImageForJob,
  type JobRow,
  imageForJob,
  jobSecrets,
  insertJob,
  jobOfRequest,
  leaseForJob,
  listJobRows,
  loadJob,
  notifySchedule,
  proxyOf,
  unfinishedJobRows,
  unfinishedJobs,
  writeJobStates,
} from "../db/queries/jobs.js";
import { endAttempt, jobMessage, loadTimeline, stateName } from "./store.js";
import { recordEvents } from "../db/queries/events.js";
import type { HostControls } from "./host-control.js";
import { jobArtifactAccess, listJobArtifacts, resolveInputs } from "./artifacts.js";
import type { Snapshots } from "./snapshots.js";
import { JobResults } from "./results.js";
import { type ValidSpec, checkParameters, validateSpec } from "./validate.js";
import { SOON, matchingHosts } from "../db/queries/health-checks.js";

/** A request id (SubmitJob, RerunJob): at most 64 characters of text. */
function checkRequestId(requestId: string): void {
  if (requestId.length > 64) throw invalid("request_id must be at most 64 characters");
  checkText("request_id", requestId, 64);
}

/** Hosts a FAILED_PRECONDITION of SubmitJob names at most. */
const MAX_NAMED_HOSTS = 10;
import type { JobWatchers } from "./watchers.js";

function canSee(caller: UserCaller, job: JobRow): boolean {
  return caller.role === "admin" || job.owner_id === caller.userId;
}

export class JobServiceImpl implements ServiceImpl<typeof JobService> {
  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
    private readonly watchers: JobWatchers,
    private readonly snapshots?: Snapshots,
    private readonly controls?: HostControls,
    private readonly results: JobResults = new JobResults(ctx, config),
  ) {}

  private async visibleJob(caller: UserCaller, jobId: string, sql: Db = this.ctx.sql, lock = false): Promise<JobRow> {
    checkId("job_id", jobId);
    const job = await loadJob(sql, jobId, { lock });
    if (!job) throw notFound(`job ${jobId} not found`);
    if (!canSee(caller, job)) throw denied(`job ${jobId} belongs to another user`);
    return job;
  }

  /** The cases of a job attempt (results.ts); who may: as GetJob. */
  async listJobResults(req: ListJobResultsRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    return this.results.list(await this.visibleJob(caller, req.jobId), req);
  }

  /** The job's results against its series' previous job (results.ts); who may: as GetJob. */
  async compareJobResults(req: CompareJobResultsRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    return this.results.compare(await this.visibleJob(caller, req.jobId), req);
  }

  async submitJob(req: SubmitJobRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    checkRequestId(req.requestId);
    const spec = validateSpec(req.spec, this.config);
    const sql = this.ctx.sql;
    spec.publicSpec.inputs = await resolveInputs(sql, caller, spec.publicSpec.inputs);

    const image = await imageForJob(sql, caller.userId, spec.image);
    if (!image) throw notFound(`image ${clip(req.spec!.image)} not found`);
    if (!image.allowed) throw denied(`image ${clip(req.spec!.image)} is not visible to you`);
    return { job: await this.insert(caller, spec, image, req) };
  }

  /**
   * A new job with the spec of job `req.job_id` (its secret values from
   * job_secrets, where they stay after its end), the parameters given
   * instead of its own, its image by the digest it ran, linked both ways
   * (jobs.rerun_of_job_id; a RERUN event on both timelines).
   */
  async rerunJob(req: RerunJobRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    checkRequestId(req.requestId);
    checkParameters("parameters", req.parameters);
    const old = await this.visibleJob(caller, req.jobId);
    if (old.health_check_id !== null) throw precondition(`job ${old.id} is a health job: its check runs it (tml health run)`);
    const spec = fromJson(JobSpecSchema, old.spec, { ignoreUnknownFields: true });
    for (const p of req.parameters) {
      const had = spec.parameters.find((q) => q.name === p.name);
      if (had) Object.assign(had, { value: p.value, secret: p.secret });
      else spec.parameters.push(create(ParameterSchema, { name: p.name, value: p.value, secret: p.secret }));
    }
    const given = new Set(req.parameters.map((p) => p.name));
    // A job's secret values are its owner's: an admin re-running another
    // user's job gives them again (with a changed script, a re-run could
    // print them).
    const kept = old.owner_id === caller.userId ? await jobSecrets(this.ctx.sql, old.id) : new Map<string, string>();
    for (const p of spec.parameters) {
      if (!p.secret || given.has(p.name)) continue;
      const value = kept.get(p.name);
      if (value === undefined) {
        const why = old.owner_id === caller.userId ? "is no longer kept" : "is its owner's";
        throw precondition(`the value of secret parameter ${p.name} of job ${old.id} ${why}: give it again in parameters`);
      }
      p.value = value;
    }
    const valid = validateSpec(spec, this.config);
    valid.image = { digest: old.manifest_digest };
    // Inputs are resolved again: the caller must still be able to read them.
    valid.publicSpec.inputs = await resolveInputs(this.ctx.sql, caller, valid.publicSpec.inputs);
    const image = await imageForJob(this.ctx.sql, caller.userId, valid.image);
    if (!image) throw notFound(`image ${clip(spec.image)} (${old.manifest_digest}) of job ${old.id} is no longer in the catalog`);
    if (!image.allowed) throw denied(`image ${clip(spec.image)} of job ${old.id} is not visible to you`);
    return { job: await this.insert(caller, valid, image, req, old) };
  }

  /** Inserts a valid job (queued), or finds the one of its request id; `rerunOf`: the job it re-runs. */
  private async insert(
    caller: UserCaller,
    spec: ValidSpec,
    image: ImageForJob,
    req: { requestId: string; queueAnyway: boolean },
    rerunOf?: JobRow,
  ): Promise<Job> {
    const sql = this.ctx.sql;
    const id = uuidv7(this.ctx.clock());
    const requestId = req.requestId === "" ? null : req.requestId;
    const jobId = await sql.begin(async (tx) => {
      if (requestId !== null) {
        const existing = await jobOfRequest(tx, caller.userId, requestId);
        if (existing) return existing;
      }
      // A job inside a lease runs on the lease's hosts, until the lease's end at the latest.
      const jobTimeoutMs = spec.leaseId !== null ? await this.checkLease(tx, caller, spec) : spec.jobTimeoutMs;
      if (jobTimeoutMs !== spec.jobTimeoutMs) spec.publicSpec.jobTimeout = durationFromMs(jobTimeoutMs);
      if (!req.queueAnyway && spec.leaseId === null) await this.checkSomeHostCanRun(tx, caller, spec, image.media_types);
      if ((await unfinishedJobs(tx, caller.userId)) >= this.config.maxQueuedJobsPerUser) {
        throw new ConnectError(
          `too many unfinished jobs: at most ${this.config.maxQueuedJobsPerUser} per user`,
          Code.ResourceExhausted,
        );
      }
      const created = await insertJob(tx, {
        id,
        ownerId: caller.userId,
        spec: toJson(JobSpecSchema, spec.publicSpec),
        priority: spec.priority,
        digest: image.digest,
        holderId: image.holder_id,
        mediaTypes: image.media_types,
        hostCount: spec.hostCount,
        requiredTags: spec.requiredTags,
        requiredSite: spec.requiredSite,
        requiredDriver: spec.requiredDriver,
        maxRestarts: spec.maxRestarts,
        queueTimeoutMs: spec.queueTimeoutMs,
        jobTimeoutMs,
        requestId,
        holdOnFailureMs: spec.holdOnFailureMs,
        secrets: spec.secrets,
        leaseId: spec.leaseId,
        rerunOf: rerunOf?.id ?? null,
        retry: spec.retry ?? undefined,
      });
      // Another call with this request_id created it meanwhile.
      if (created !== id) return created;
      const actor = actorOf(caller);
      await recordEvents(tx, [
        { jobId: id, kind: "submitted", state: "queued", attempt: 1, actor, ownerId: caller.userId, message: `image ${image.name}:${image.tag} (${image.digest})` },
        ...(rerunOf
          ? [
              { jobId: id, kind: "rerun" as const, state: "queued" as const, attempt: 1, actor, ownerId: caller.userId, message: `re-runs job ${rerunOf.id}` },
              {
                jobId: rerunOf.id,
                kind: "rerun" as const,
                state: rerunOf.state,
                stage: rerunOf.stage,
                attempt: rerunOf.attempt,
                actor,
                ownerId: rerunOf.owner_id,
                message: `re-run as job ${id} by ${caller.name}`,
              },
            ]
          : []),
      ]);
      await notifySchedule(tx);
      return id;
    });
    if (spec.leaseId !== null && jobId === id) await this.replaceSession(spec.leaseId, id, caller);
    return jobMessage((await loadJob(sql, jobId))!);
  }

  /**
   * The lease of a job to run inside it (spec.lease_id), share-locked until
   * the job is inserted: NOT_FOUND unless it is the caller's (or the caller
   * is an admin), FAILED_PRECONDITION once it has ended, INVALID_ARGUMENT
   * when the job asks for more hosts than it has. Returns the job's
   * timeout, cut to the lease's end.
   */
  private async checkLease(tx: Db, caller: UserCaller, spec: ValidSpec): Promise<number> {
    const id = spec.leaseId!;
    const lease = await leaseForJob(tx, id);
    if (!lease || (lease.owner_id !== caller.userId && caller.role !== "admin")) throw notFound(`lease ${id} not found`);
    if (lease.state === "ended" || lease.left_ms < 1000) {
      const why = lease.end_reason === null ? "" : ` (${lease.end_reason}${lease.status_message === "" ? "" : `: ${clip(lease.status_message)}`})`;
      throw precondition(`lease ${id} has ended${why}: submit the job outside it or to another lease`);
    }
    if (spec.hostCount > lease.hosts) {
      throw invalid(`spec.hosts.host_count is ${spec.hostCount}, more than the ${lease.hosts} host${lease.hosts === 1 ? "" : "s"} of lease ${id}`);
    }
    return Math.min(spec.jobTimeoutMs, Math.floor(lease.left_ms));
  }

  /**
   * FAILED_PRECONDITION when hosts meet the job's requirements (and the
   * caller may use them) but none of them can take it now: each is
   * retired, quarantined, disabled, draining or offline (a host running its
   * health check, or whose supervisor detached within its grace period,
   * counts as able: it likely takes the job soon). A job no
   * host matches at all is queued, as before (hosts may be added).
   */
  private async checkSomeHostCanRun(tx: Db, caller: UserCaller, spec: ValidSpec, media: string[]): Promise<void> {
    const hosts = await matchingHosts(
      tx,
      { tags: spec.requiredTags, site: spec.requiredSite, driver: spec.requiredDriver, media, owner: caller.userId, graceMs: this.config.supervisorGraceMs },
      MAX_NAMED_HOSTS + 1,
    );
    if (hosts.length === 0 || hosts.some((h) => h.why === null || SOON.has(h.why))) return;
    const named = hosts.slice(0, MAX_NAMED_HOSTS).map((h) => `${h.name} ${h.why}`);
    const more = hosts.length > MAX_NAMED_HOSTS ? ` and more` : "";
    throw precondition(`no host that matches the job can run it now: ${named.join("; ")}${more}; submit with queue_anyway to queue it until one returns`);
  }

  async getJob(req: GetJobRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    const job = await this.visibleJob(caller, req.jobId);
    return { job: jobMessage(job, await loadTimeline(this.ctx.sql, job.id)) };
  }

  /** The filter's conditions, validated; owner forced to the caller for a non-admin. */
  private filterOf(caller: UserCaller, filter: JobFilter | undefined) {
    const states = (filter?.states ?? []).map((s, i) => {
      const name = stateName(s);
      if (name === undefined) throw invalid(`filter.states[${i}] is not a job state`);
      return name;
    });
    let owner = filter?.ownerUserId ?? "";
    if (owner !== "") checkId("filter.owner_user_id", owner);
    if (caller.role !== "admin") {
      if (owner !== "" && owner !== caller.userId) throw denied("only admins may list other users' jobs");
      owner = caller.userId;
    }
    const host = filter?.hostId ?? "";
    if (host !== "") checkId("filter.host_id", host);
    const tags = checkTags("filter.tags", filter?.tags ?? {}, { allowSite: true });
    const lease = filter?.leaseId ?? "";
    if (lease !== "") checkId("filter.lease_id", lease);
    return { states: [...new Set(states)].sort(), owner, host, tags, healthJobs: filter?.healthJobs, lease };
  }

  private matches(f: ReturnType<JobServiceImpl["filterOf"]>, job: JobRow): boolean {
    if (f.owner !== "" && job.owner_id !== f.owner) return false;
    if (f.states.length > 0 && !f.states.includes(job.state)) return false;
    if (f.host !== "" && !job.host_ids.includes(f.host)) return false;
    const tags = ((job.spec as { tags?: Record<string, string> })?.tags ?? {}) as Record<string, string>;
    for (const [k, v] of Object.entries(f.tags)) if (tags[k] !== v) return false;
    if (f.healthJobs !== undefined && (job.health_check_id !== null) !== f.healthJobs) return false;
    if (f.lease !== "" && job.lease_id !== f.lease) return false;
    return true;
  }

  async listJobs(req: ListJobsRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    const f = this.filterOf(caller, req.filter);
    const size = pageSize(req.pageSize);
    const after = decodePageToken(req.pageToken, f, 1)?.[0] as string | undefined;
    if (after !== undefined) checkId("page_token", after);
    const sql = this.ctx.sql;
    const rows = await listJobRows(sql, f, after, size + 1);
    const page = rows.slice(0, size);
    return {
      jobs: page.map((r) => jobMessage(r)),
      nextPageToken: rows.length > size ? encodePageToken(f, [page[page.length - 1].id]) : "",
    };
  }

  async cancelJob(req: CancelJobRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    checkText("message", req.message, 1024);
    const why = req.message === "" ? `canceled by ${caller.name}` : `canceled by ${caller.name}: ${req.message}`;
    const jobId = await this.ctx.sql.begin(async (tx) => {
      const job = await this.visibleJob(caller, req.jobId, tx, true);
      if (job.state === "finalized") {
        if (job.reason === "canceled") return job.id;
        throw precondition(`job ${job.id} is already finalized (${job.reason})`);
      }
      await cancelUnfinished(tx, job, why, actorOf(caller));
      return job.id;
    });
    return { job: jobMessage((await loadJob(this.ctx.sql, jobId))!) };
  }

  /**
   * A job run inside a lease takes the lease's hosts from its session job
   * (which would hold them to the lease's end): the session is canceled. In
   * a transaction of its own, after the job's: the session's row is locked
   * before any lease row, as everywhere else.
   */
  private async replaceSession(leaseId: string, jobId: string, caller: UserCaller): Promise<void> {
    await this.ctx.sql.begin(async (tx) => {
      const [lease] = await tx<{ session_job_id: string | null }[]>`select session_job_id from leases where id = ${leaseId}`;
      if (!lease?.session_job_id || lease.session_job_id === jobId) return;
      const session = await loadJob(tx, lease.session_job_id, { lock: true });
      if (!session || session.state === "finalized") return;
      await cancelUnfinished(tx, session, `session of lease ${leaseId} gave its hosts to job ${jobId}`, actorOf(caller));
    });
  }

  async *watchJob(req: WatchJobRequest, hctx: HandlerContext): AsyncIterable<WatchJobResponse> {
    const caller = requireUser(hctx);
    checkId("job_id", req.jobId);
    const changes = new AsyncQueue<string>();
    const unsubscribe = this.watchers.subscribe(req.jobId, (id) => {
      if (changes.size === 0) changes.push(id);
    });
    const onAbort = () => changes.end();
    hctx.signal.addEventListener("abort", onAbort, { once: true });
    try {
      let last = "";
      const send = async (): Promise<WatchJobResponse | undefined> => {
        const job = await this.visibleJob(caller, req.jobId);
        const message = jobMessage(job, await loadTimeline(this.ctx.sql, job.id));
        const stamp = `${job.updated_at.getTime()}/${message.timeline.length}`;
        if (stamp === last) return undefined;
        last = stamp;
        return create(WatchJobResponseSchema, { job: message });
      };
      let first = await send();
      if (first) {
        yield first;
        if (first.job!.state === JobState.FINALIZED) return;
      }
      for await (const _ of changes) {
        first = await send();
        if (!first) continue;
        yield first;
        if (first.job!.state === JobState.FINALIZED) return;
      }
      throw new ConnectError("coordinator replica shutting down", Code.Unavailable);
    } finally {
      unsubscribe();
      hctx.signal.removeEventListener("abort", onAbort);
    }
  }

  async *watchJobs(req: WatchJobsRequest, hctx: HandlerContext): AsyncIterable<WatchJobsResponse> {
    const caller = requireUser(hctx);
    const f = this.filterOf(caller, req.filter);
    const changes = new AsyncQueue<string>();
    const queued = new Set<string>();
    const unsubscribe = this.watchers.subscribe(null, (id) => {
      if (queued.has(id)) return;
      queued.add(id);
      changes.push(id);
    });
    const onAbort = () => changes.end();
    hctx.signal.addEventListener("abort", onAbort, { once: true });
    try {
      const sql = this.ctx.sql;
      const sent = new Map<string, number>(); // job id -> updated_at sent
      if (req.includeExisting) {
        const rows = await unfinishedJobRows(sql, f);
        for (const r of rows) {
          sent.set(r.id, r.updated_at.getTime());
          yield create(WatchJobsResponseSchema, { kind: JobChangeKind.EXISTING, job: jobMessage(r) });
        }
        yield create(WatchJobsResponseSchema, { kind: JobChangeKind.SYNCED });
      }
      for await (const id of changes) {
        queued.delete(id);
        const job = await loadJob(sql, id);
        if (!job || !canSee(caller, job) || !this.matches(f, job)) continue;
        const stamp = job.updated_at.getTime();
        if (sent.get(id) === stamp) continue;
        const created = !sent.has(id) && job.created_at.getTime() === job.updated_at.getTime();
        if (job.state === "finalized") sent.delete(id);
        else sent.set(id, stamp);
        yield create(WatchJobsResponseSchema, {
          kind: created ? JobChangeKind.CREATED : JobChangeKind.UPDATED,
          job: jobMessage(job),
        });
      }
      throw new ConnectError("coordinator replica shutting down", Code.Unavailable);
    } finally {
      unsubscribe();
      hctx.signal.removeEventListener("abort", onAbort);
    }
  }

  async listJobArtifacts(req: ListJobArtifactsRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    return listJobArtifacts(this.ctx, await this.visibleJob(caller, req.jobId), req.attempt);
  }

  async getJobArtifactAccess(req: GetJobArtifactAccessRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    return jobArtifactAccess(this.ctx, caller, await this.visibleJob(caller, req.jobId), req.attempt);
  }

  async getJobLogAccess(req: GetJobLogAccessRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    const job = await this.visibleJob(caller, req.jobId);
    if (job.log_server_urls.length === 0) {
      throw precondition(`job ${job.id} has no log servers (it never started, or none was registered)`);
    }
    const ttl = this.config.logTokenTtlMs;
    const token = await this.ctx.keys.sign({ scope: "log:read", job: job.id }, ttl, { subject: caller.userId });
    return {
      logServerUrls: job.log_server_urls,
      readToken: { token, scope: CapabilityScope.LOG_READ, expireTime: timestampFromMs(this.ctx.clock() + ttl) },
    };
  }

  /**
   * A session to one exposed port of a running job (DESIGN.md §8): checks the
   * caller may use the job (its owner or an admin), picks the proxy the job's
   * supervisor exposes through, and returns its entrances with a short-lived
   * `tunnel:dial` token for exactly that job, exposure and host. Every
   * session opened is an audit event (without the token).
   */
  async openJobSession(req: OpenJobSessionRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    const job = await this.visibleJob(caller, req.jobId);
    if (!/^[a-z][a-z0-9-]{0,31}$/.test(req.portName)) throw invalid("port_name must match [a-z][a-z0-9-]{0,31}");
    if (job.state !== "running") throw precondition(`job ${job.id} is ${job.state}, not running`);
    const spec = fromJson(JobSpecSchema, job.spec);
    if (req.portName !== "console" && !spec.exposedPorts.some((p) => p.name === req.portName)) {
      throw notFound(`job ${job.id} exposes no port named ${req.portName}`);
    }
    const hostId = req.hostId === "" ? job.host_ids[0] : req.hostId;
    if (hostId === undefined || !job.host_ids.includes(hostId)) throw notFound(`host ${req.hostId} does not run job ${job.id}`);
    const row = await proxyOf(this.ctx.sql, job.id);
    if (!row || row.proxy_url === "") throw precondition(`job ${job.id} has no proxy (none was registered when it started)`);
    const ttl = this.config.sessionTokenTtlMs;
    const sessionId = uuidv7();
    const token = await this.ctx.keys.sign(
      { scope: "tunnel:dial", job: job.id, exposure: req.portName, host: hostId },
      ttl,
      { subject: caller.userId, audience: "proxy" },
    );
    const proxy = new URL(row.proxy_url);
    const ws = new URL(`/ws/${encodeURIComponent(job.id)}/${encodeURIComponent(req.portName)}`, proxy);
    ws.protocol = proxy.protocol === "https:" ? "wss:" : "ws:";
    ws.searchParams.set("host", hostId);
    await audit(this.ctx.sql, {
      kind: "job.session_opened",
      actor: actorOf(caller),
      jobId: job.id,
      hostId,
      userId: caller.userId,
      message: `session to ${req.portName} through ${row.proxy_url}`,
      details: { sessionId, port: req.portName },
    });
    return {
      sessionId,
      grpcUrl: row.proxy_url,
      websocketUrl: ws.toString(),
      dialToken: { token, scope: CapabilityScope.TUNNEL_DIAL, expireTime: timestampFromMs(this.ctx.clock() + ttl) },
      hostId,
    };
  }

  /** A running job's state as a new image (coordinator/jobs/snapshots.ts). */
  async snapshotJob(req: SnapshotJobRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    if (!this.snapshots) throw new ConnectError("snapshots are not available on this coordinator", Code.Unimplemented);
    return this.snapshots.snapshotJob(caller, req, hctx);
  }

  /** Power off, power on, power-cycle or reset a running job's host (coordinator/jobs/host-control.ts). */
  async controlHost(req: ControlHostRequest, hctx: HandlerContext) {
    const caller = requireUser(hctx);
    if (!this.controls) throw new ConnectError("host control is not available on this coordinator", Code.Unimplemented);
    return this.controls.controlHost(caller, req, hctx);
  }
}

/** Cancels unfinished job `job` (locked): a queued one ends now, a running one is asked to stop. */
async function cancelUnfinished(tx: Db, job: JobRow, why: string, actor: string): Promise<void> {
  if (job.state === "queued") {
    await endAttempt(tx, job, { reason: "canceled", message: why, actor });
    return;
  }
  if (job.stop_reason === "canceled") return;
  await writeJobStates(tx, [
    {
      kind: "stop",
      id: job.id,
      stopReason: "canceled",
      event: { jobId: job.id, kind: "cancel_requested", state: job.state, stage: job.stage, attempt: job.attempt, actor, ownerId: job.owner_id, message: why },
    },
  ]);
}
