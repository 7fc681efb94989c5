/**
 * HealthService (health_service.proto, docs/health.md): admins define health
 * checks and take hosts out of service and back; every user reads the
 * checks. Part of the job system because a check runs as a job (health.ts
 * queues them). Every change of a host's health goes through setHostHealth;
 * every change of a check is audited and wakes the health keeper, which
 * queues what became due.
 */
import { create, fromJson } from "@bufbuild/protobuf";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { DriverKind, type Host } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import {
  type CreateHealthCheckRequest,
  type DeleteHealthCheckRequest,
  type GetHealthCheckRequest,
  type HealthCheck,
  HealthCheckSchema,
  type HealthService,
  type ListHealthChecksRequest,
  type QuarantineHostRequest,
  type ReturnHostRequest,
  type RetireHostRequest,
  type RunHealthCheckRequest,
  type UpdateHealthCheckRequest,
} from "../../gen/treadmill/coordinator/v1/health_service_pb.js";
import { type Job, ParameterSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { actorOf } from "../audit.js";
import { type UserCaller, requireAdmin, requireUser } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import { audit } from "../db/queries/audit.js";
import { type Health, setHostHealth } from "../db/queries/health.js";
import { type HealthCheckRow, checksOfHost, notifyHealth, openHealthJobs } from "../db/queries/health-checks.js";
import { driverKindName, hostColumns, hostMessage, type HostRow } from "../db/queries/hosts.js";
import { type Db, imageForJob, loadJob } from "../db/queries/jobs.js";
import {
  checkId,
  checkPattern,
  checkTags,
  checkText,
  decodePageToken,
  denied,
  durationOf,
  encodePageToken,
  exists,
  HOST_NAME,
  invalid,
  isUniqueViolation,
  notFound,
  pageSize,
  precondition,
  ts,
  uuidv7,
} from "../shared/common.js";
import type { JobConfig } from "./config.js";
import { queueChecks } from "./health.js";
import { endAttempt, jobMessage } from "./store.js";
import { checkParameters, durationMs, parseImageReference } from "./validate.js";

const NAME_SHAPE = "[a-z0-9][a-z0-9._-]{0,62}";
/** A check's job timeout when it names none. */
const DEFAULT_TIMEOUT_MS = 10 * 60_000;
const DEFAULT_QUARANTINE_AFTER = 3;
const UPDATABLE = [
  "name",
  "image",
  "parameters",
  "timeout",
  "host_tags",
  "driver_kind",
  "interval",
  "every_jobs",
  "quarantine_after_failures",
  "return_needs_admin",
  "description",
] as const;
type Field = (typeof UPDATABLE)[number];

/** The stored values of a check's definition (columns of health_checks). */
interface Definition {
  name: string;
  image: string;
  parameters: { name: string; value: string }[];
  timeout_ms: number;
  host_tags: Record<string, string>;
  driver_kind: string | null;
  interval_ms: number | null;
  every_jobs: number;
  quarantine_after: number;
  return_needs_admin: boolean;
  description: string;
}

/** The definition's fields named in `fields`, validated (messages name health_check.<field>). */
function definition(hc: HealthCheck, fields: ReadonlySet<Field>, config: JobConfig): Partial<Definition> {
  const d: Partial<Definition> = {};
  const f = (name: string) => `health_check.${name}`;
  if (fields.has("name")) d.name = checkPattern(f("name"), hc.name, HOST_NAME, NAME_SHAPE);
  if (fields.has("image")) {
    parseImageReference(f("image"), hc.image);
    d.image = hc.image;
  }
  if (fields.has("parameters")) {
    if (checkParameters(f("parameters"), hc.parameters).size > 0) throw invalid(`${f("parameters")} must not be secret: a check is readable by every user`);
    d.parameters = hc.parameters.map((p) => ({ name: p.name, value: p.value }));
  }
  if (fields.has("timeout")) d.timeout_ms = durationMs(f("timeout"), hc.timeout, DEFAULT_TIMEOUT_MS, config.maxJobTimeoutMs);
  if (fields.has("host_tags")) d.host_tags = checkTags(f("host_tags"), hc.hostTags, { allowSite: true });
  if (fields.has("driver_kind")) d.driver_kind = hc.driverKind === DriverKind.UNSPECIFIED ? null : driverKindName(f("driver_kind"), hc.driverKind);
  if (fields.has("interval")) {
    const zero = hc.interval === undefined || (hc.interval.seconds === 0n && hc.interval.nanos === 0);
    d.interval_ms = zero ? null : durationMs(f("interval"), hc.interval, 0, 365 * 24 * 3600_000);
    if (d.interval_ms !== null && d.interval_ms < 1000) throw invalid(`${f("interval")} must be at least one second`);
  }
  if (fields.has("every_jobs")) {
    if (!Number.isInteger(hc.everyJobs) || hc.everyJobs < 0 || hc.everyJobs > 1_000_000) throw invalid(`${f("every_jobs")} must be 0 to 1000000`);
    d.every_jobs = hc.everyJobs;
  }
  if (fields.has("quarantine_after_failures")) {
    const k = hc.quarantineAfterFailures;
    if (!Number.isInteger(k) || k < 0 || k > 100) throw invalid(`${f("quarantine_after_failures")} must be 0 (meaning 3) to 100`);
    d.quarantine_after = k === 0 ? DEFAULT_QUARANTINE_AFTER : k;
  }
  if (fields.has("return_needs_admin")) d.return_needs_admin = hc.returnNeedsAdmin;
  if (fields.has("description")) d.description = checkText(f("description"), hc.description, 256);
  return d;
}

function checkMessage(r: HealthCheckRow): HealthCheck {
  return create(HealthCheckSchema, {
    id: r.id,
    name: r.name,
    image: r.image,
    parameters: r.parameters.map((p) => fromJson(ParameterSchema, { name: p.name, value: p.value })),
    timeout: durationOf(Number(r.timeout_ms)),
    hostTags: r.host_tags,
    driverKind: r.driver_kind ? (DriverKind[r.driver_kind.toUpperCase() as keyof typeof DriverKind] ?? DriverKind.UNSPECIFIED) : DriverKind.UNSPECIFIED,
    interval: r.interval_ms !== null ? durationOf(Number(r.interval_ms)) : undefined,
    everyJobs: r.every_jobs,
    quarantineAfterFailures: r.quarantine_after,
    returnNeedsAdmin: r.return_needs_admin,
    ownerUserId: r.owner_id,
    createTime: ts(r.created_at),
    updateTime: ts(r.updated_at),
    description: r.description,
  });
}

export class HealthServiceImpl implements ServiceImpl<typeof HealthService> {
  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
  ) {}

  /** The check's image must exist and be usable by the admin who will own its jobs. */
  private async checkImage(tx: Db, caller: UserCaller, image: string): Promise<void> {
    const found = await imageForJob(tx, caller.userId, parseImageReference("health_check.image", image));
    if (!found) throw notFound(`image ${image} not found`);
    if (!found.allowed) throw denied(`image ${image} is not visible to you`);
  }

  async createHealthCheck(req: CreateHealthCheckRequest, hctx: HandlerContext) {
    const caller = requireAdmin(hctx);
    const hc = req.healthCheck ?? create(HealthCheckSchema);
    const d = definition(hc, new Set(UPDATABLE), this.config) as Definition;
    const id = uuidv7(this.ctx.clock());
    try {
      return await this.ctx.sql.begin(async (tx) => {
        await this.checkImage(tx, caller, d.image);
        const [row] = await tx<HealthCheckRow[]>`
          insert into health_checks (id, name, image, parameters, timeout_ms, host_tags, driver_kind, interval_ms, every_jobs,
            quarantine_after, return_needs_admin, description, owner_id)
          values (${id}, ${d.name}, ${d.image}, ${tx.json(d.parameters)}, ${d.timeout_ms}, ${tx.json(d.host_tags)}, ${d.driver_kind},
            ${d.interval_ms}, ${d.every_jobs}, ${d.quarantine_after}, ${d.return_needs_admin}, ${d.description}, ${caller.userId})
          returning *`;
        await audit(tx, { kind: "health_check.create", actor: actorOf(caller), message: `health check ${d.name} created`, details: { id, ...d } });
        await notifyHealth(tx);
        return { healthCheck: checkMessage(row) };
      });
    } catch (err) {
      if (isUniqueViolation(err)) throw exists(`health check ${d.name} already exists`);
      throw err;
    }
  }

  async listHealthChecks(req: ListHealthChecksRequest, hctx: HandlerContext) {
    requireUser(hctx);
    const size = pageSize(req.pageSize);
    const after = decodePageToken(req.pageToken, {}, 1)?.[0];
    const sql = this.ctx.sql;
    const rows = await sql<HealthCheckRow[]>`
      select * from health_checks ${after !== undefined ? sql`where name > ${after}` : sql``} order by name limit ${size + 1}`;
    const page = rows.slice(0, size);
    return {
      healthChecks: page.map(checkMessage),
      nextPageToken: rows.length > size ? encodePageToken({}, [page[page.length - 1].name]) : "",
    };
  }

  async getHealthCheck(req: GetHealthCheckRequest, hctx: HandlerContext) {
    requireUser(hctx);
    const sql = this.ctx.sql;
    let where;
    if (req.healthCheck.case === "healthCheckId") where = sql`id = ${checkId("health_check_id", req.healthCheck.value)}`;
    else if (req.healthCheck.case === "name") where = sql`name = ${checkPattern("name", req.healthCheck.value, HOST_NAME, NAME_SHAPE)}`;
    else throw invalid("health_check_id or name is required");
    const [row] = await sql<HealthCheckRow[]>`select * from health_checks where ${where}`;
    if (!row) throw notFound(`health check ${req.healthCheck.value} not found`);
    return { healthCheck: checkMessage(row) };
  }

  async updateHealthCheck(req: UpdateHealthCheckRequest, hctx: HandlerContext) {
    const caller = requireAdmin(hctx);
    const id = checkId("health_check_id", req.healthCheckId);
    const paths = req.updateMask?.paths ?? [];
    if (paths.length === 0) throw invalid("update_mask is required");
    if (paths.length > UPDATABLE.length * 2) throw invalid("update_mask has too many paths");
    for (const p of paths) if (!(UPDATABLE as readonly string[]).includes(p)) throw invalid(`update_mask path "${p.slice(0, 64)}" is not one of ${UPDATABLE.join(", ")}`);
    const d = definition(req.healthCheck ?? create(HealthCheckSchema), new Set(paths as Field[]), this.config);
    try {
      return await this.ctx.sql.begin(async (tx) => {
        const [before] = await tx<HealthCheckRow[]>`select * from health_checks where id = ${id} for update`;
        if (!before) throw notFound(`health check ${id} not found`);
        if (d.image !== undefined) await this.checkImage(tx, caller, d.image);
        const set = { ...d, parameters: d.parameters && tx.json(d.parameters), host_tags: d.host_tags && tx.json(d.host_tags) };
        const columns = Object.keys(set).filter((k) => set[k as keyof typeof set] !== undefined);
        const [row] = await tx<HealthCheckRow[]>`
          update health_checks set ${tx(set as Record<string, unknown>, ...columns)}, owner_id = ${caller.userId}, updated_at = now()
          where id = ${id} returning *`;
        await audit(tx, { kind: "health_check.update", actor: actorOf(caller), message: `health check ${before.name} changed`, details: { id, changes: d } });
        await notifyHealth(tx);
        return { healthCheck: checkMessage(row) };
      });
    } catch (err) {
      if (isUniqueViolation(err)) throw exists(`health check ${String(d.name)} already exists`);
      throw err;
    }
  }

  async deleteHealthCheck(req: DeleteHealthCheckRequest, hctx: HandlerContext) {
    const caller = requireAdmin(hctx);
    const id = checkId("health_check_id", req.healthCheckId);
    return this.ctx.sql.begin(async (tx) => {
      const [row] = await tx<{ name: string }[]>`delete from health_checks where id = ${id} returning name`;
      if (!row) throw notFound(`health check ${id} not found`);
      await audit(tx, { kind: "health_check.delete", actor: actorOf(caller), message: `health check ${row.name} deleted`, details: { id } });
      await notifyHealth(tx);
      return {};
    });
  }

  /** Locks host `hostId` and returns it; NOT_FOUND, or FAILED_PRECONDITION when retired and `retired` is false. */
  private async lockHost(tx: Db, hostId: string, options: { retired: boolean }): Promise<HostRow> {
    const [host] = await tx<HostRow[]>`select ${hostColumns(tx)} from hosts h where h.id = ${hostId} for update of h`;
    if (!host) throw notFound(`host ${hostId} not found`);
    if (!options.retired && host.health === "retired") throw precondition(`host ${host.name} is retired`);
    return host;
  }

  private async hostAndJobs(tx: Db, hostId: string, jobIds: string[]): Promise<{ host: Host; jobs: Job[] }> {
    const [row] = await tx<HostRow[]>`select ${hostColumns(tx)} from hosts h where h.id = ${hostId}`;
    const jobs: Job[] = [];
    for (const id of jobIds) jobs.push(jobMessage((await loadJob(tx, id))!));
    return { host: hostMessage(row), jobs };
  }

  /**
   * Queues `checks` on the locked `host` (those already unfinished there
   * are not queued again) after setting its health to `health`; returns the
   * unfinished health jobs of the host.
   */
  private async runChecks(tx: Db, caller: UserCaller, host: HostRow, checks: HealthCheckRow[], health: Health, why: string): Promise<string[]> {
    const open = await openHealthJobs(tx, host.id);
    const queued = new Set(open.map((j) => j.health_check_id));
    await setHostHealth(tx, { hostId: host.id, health, reason: why, actor: actorOf(caller) });
    const { jobs, problems } = await queueChecks(
      tx,
      this.ctx,
      host,
      checks.filter((c) => !queued.has(c.id)),
      actorOf(caller),
      why,
    );
    if (problems.length > 0) throw precondition(problems.map((p) => p.message).join("; "));
    return [...open.map((j) => j.id), ...jobs];
  }

  async runHealthCheck(req: RunHealthCheckRequest, hctx: HandlerContext) {
    const caller = requireAdmin(hctx);
    const hostId = checkId("host_id", req.hostId);
    const checkIdValue = req.healthCheckId === "" ? undefined : checkId("health_check_id", req.healthCheckId);
    return this.ctx.sql.begin(async (tx) => {
      const host = await this.lockHost(tx, hostId, { retired: false });
      let checks = await checksOfHost(tx, hostId);
      if (checkIdValue !== undefined) {
        const [exists] = await tx`select 1 from health_checks where id = ${checkIdValue}`;
        if (!exists) throw notFound(`health check ${checkIdValue} not found`);
        checks = checks.filter((c) => c.id === checkIdValue);
        if (checks.length === 0) throw precondition(`health check ${checkIdValue} does not apply to host ${host.name}`);
      }
      if (checks.length === 0) throw precondition(`no health check applies to host ${host.name}`);
      const health: Health = host.health === "quarantined" ? "quarantined" : "checking";
      const jobs = await this.runChecks(tx, caller, host, checks, health, `checks run by ${actorOf(caller)}`);
      return this.hostAndJobs(tx, hostId, jobs);
    });
  }

  async quarantineHost(req: QuarantineHostRequest, hctx: HandlerContext) {
    const caller = requireAdmin(hctx);
    const hostId = checkId("host_id", req.hostId);
    const reason = checkText("reason", req.reason, 1024);
    return this.ctx.sql.begin(async (tx) => {
      await this.lockHost(tx, hostId, { retired: false });
      const why = `quarantined by ${actorOf(caller)}${reason ? `: ${reason}` : ""}`;
      await setHostHealth(tx, { hostId, health: "quarantined", reason: why, actor: actorOf(caller), details: { manual: true } });
      // No retry by itself: an admin returns it.
      await tx`update hosts set check_failed_at = null where id = ${hostId}`;
      return { host: (await this.hostAndJobs(tx, hostId, [])).host };
    });
  }

  async returnHost(req: ReturnHostRequest, hctx: HandlerContext) {
    const caller = requireAdmin(hctx);
    const hostId = checkId("host_id", req.hostId);
    return this.ctx.sql.begin(async (tx) => {
      const host = await this.lockHost(tx, hostId, { retired: false });
      await tx`
        update hosts set infra_failures = 0, infra_failed_jobs = '{}', check_retries = 0, check_failed_at = null where id = ${hostId}`;
      const checks = await checksOfHost(tx, hostId);
      let jobs: string[] = [];
      if (checks.length === 0) {
        await setHostHealth(tx, { hostId, health: "healthy", reason: "", actor: actorOf(caller), details: { returned: true, noCheck: true } });
      } else {
        jobs = await this.runChecks(tx, caller, host, checks, "checking", `returned to service by ${actorOf(caller)}: checking`);
      }
      return this.hostAndJobs(tx, hostId, jobs);
    });
  }

  async retireHost(req: RetireHostRequest, hctx: HandlerContext) {
    const caller = requireAdmin(hctx);
    const hostId = checkId("host_id", req.hostId);
    const reason = checkText("reason", req.reason, 1024);
    return this.ctx.sql.begin(async (tx) => {
      // Its queued health jobs will never run: they end now (a running job
      // goes on). Their rows are locked before the host's (the lock order).
      const queued = await tx<{ id: string }[]>`
        select id from jobs where pinned_host_id = ${hostId} and state = 'queued' order by id for no key update`;
      await this.lockHost(tx, hostId, { retired: true });
      const why = `retired by ${actorOf(caller)}${reason ? `: ${reason}` : ""}`;
      await setHostHealth(tx, { hostId, health: "retired", reason: why, actor: actorOf(caller) });
      await tx`update hosts set check_failed_at = null where id = ${hostId}`;
      for (const { id } of queued) {
        const job = (await loadJob(tx, id))!;
        await endAttempt(tx, job, { reason: "canceled", message: "its host was retired", actor: actorOf(caller) });
      }
      return { host: (await this.hostAndJobs(tx, hostId, [])).host };
    });
  }
}
