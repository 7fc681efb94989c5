/**
 * SupervisorService.Attach (DESIGN.md §4): the supervisor's control stream.
 *
 * The database is the truth; a stream only carries it. Whichever replica
 * holds a host's stream delivers its commands: anything that changes what a
 * host should run (an assignment, a cancel, a timeout, a restart) notifies
 * 'treadmill_commands' with the host id in its transaction, and the holder
 * re-reads the host's assignments and sends what is missing (`sync`). So a
 * command computed on one replica reaches a supervisor attached to another,
 * and a supervisor that re-attaches anywhere gets the same commands again.
 *
 * Commands are idempotent by (job, attempt): within one stream each is sent
 * once, re-sent when its CommandAck has not come within three heartbeat
 * intervals; a new stream starts afresh (the hello says what the supervisor
 * holds). A newer stream for the same host supersedes the older: the newer
 * writes its id to hosts.attach_session and notifies; the older sees the
 * change and ends with Aborted.
 *
 * The fast paths: the scheduler hands the StartJobs of an assignment straight
 * to the streams of this replica right after its commit (`deliverStarts`),
 * with no notification or read in between; reports and acknowledgements of
 * all streams are group-committed (group-commit.ts).
 */
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampNow } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext } from "@connectrpc/connect";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { ExitStatus, FinalizeReason, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import {
  type AttachRequest,
  type AttachResponse,
  AttachResponseSchema,
  type CommandAck,
  type HeldJob,
  type JobStateReport,
  type StartJob,
  type SupervisorHello,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { Logger } from "../../lib/logger.js";
import { audit } from "../audit.js";
import { type HostCaller, requireHost } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import { uuidv7 } from "../services/common.js";
import { type HostRow, hostColumns, hostMessage } from "../services/hosts.js";
import { databaseUnavailable, isDatabaseUnavailable } from "../db/errors.js";
import { buildStartJobs } from "./commands.js";
import type { JobConfig } from "./config.js";
import { GroupCommit, type Op } from "./group-commit.js";
import type { JobMetrics } from "./metrics.js";
import { onJobLogReport, onLogTokenRequest } from "./log-status.js";
import { onSnapshotResult } from "./snapshots.js";
import { AsyncQueue } from "../../lib/async/queue.js";
import { PROTOCOL_VERSION } from "../../lib/protocol.js";
import { type Db, reasonName, stageName, stateName } from "./store.js";
import { type HostTermination, hostEnded, hostProgress, releaseSlot } from "./transitions.js";

/** Streams broken while a StartJob of an attempt was unanswered, after which it is not sent again. */
export const MAX_START_FAILURES = 3;

/** Codes of a stream that broke (not a clean end, a newer stream, or this replica stopping). */
const BROKEN = new Set([Code.Canceled, Code.DeadlineExceeded, Code.Unknown, Code.Internal, Code.DataLoss]);


const invalid = (message: string) => new ConnectError(message, Code.InvalidArgument);

interface Pending {
  key: string;
  kind: "start" | "stop";
  jobId: string;
  attempt: number;
  sentAt: number;
  message: AttachResponse;
}

/** The streams this replica holds, and what they share: timers, batched last-seen writes. */
export class SupervisorStreams {
  readonly sessions = new Map<string, HostSession>();
  private readonly seen = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private lastTick = Date.now();
  /** A stream ended and its detachment could not be recorded: detachOrphans runs at the next tick. */
  orphans = false;
  readonly log: Logger;
  /** Reports and acknowledgements of every stream, committed together. */
  readonly commits: GroupCommit;
  /** Audit rows of the commands sent in this turn of the event loop (see auditCommands). */
  private sentCommands: { kind: string; job: string; host: string; message: string; request: string; attempt: number }[] = [];

  constructor(
    readonly ctx: CoordinatorContext,
    readonly config: JobConfig,
    metrics?: JobMetrics,
  ) {
    this.log = ctx.logger.child({ subsystem: "supervisor-stream" });
    this.commits = new GroupCommit(ctx.sql, metrics);
  }

  start(): void {
    this.lastTick = Date.now();
    this.timer = setInterval(() => void this.tick(), this.config.supervisorHeartbeatMs);
    this.timer.unref?.();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    const sessions = [...this.sessions.values()];
    for (const s of sessions) s.finish(new ConnectError("coordinator replica shutting down", Code.Unavailable));
    await Promise.all(sessions.map((s) => s.closed));
    await this.commits.idle();
    await this.flushCommandAudit();
    await this.flushSeen().catch(() => undefined);
  }

  /** 'treadmill_commands' for `hostId`. */
  onCommands(hostId: string): void {
    this.sessions.get(hostId)?.requestSync();
  }

  /** StartJobs of a fresh assignment (committed) for `hostId`, if this replica holds its stream. */
  deliverStarts(hostId: string, starts: StartJob[]): void {
    this.sessions.get(hostId)?.deliverStarts(starts);
  }

  /**
   * Every command sent is an audit event (never with its secrets or tokens).
   * The commands sent by all streams in one turn of the event loop are
   * recorded with one statement.
   */
  auditCommands(host: HostCaller, sends: AttachResponse[]): void {
    for (const m of sends) {
      const v = m.payload.value as { requestId: string; jobId: string; attempt: number };
      this.sentCommands.push({
        kind: `command.${m.payload.case === "startJob" ? "start_job" : "stop_job"}`,
        job: v.jobId,
        host: host.hostId,
        message: `sent to ${host.hostName}`,
        request: v.requestId,
        attempt: v.attempt,
      });
    }
    if (this.sentCommands.length === sends.length) setImmediate(() => void this.flushCommandAudit());
  }

  private async flushCommandAudit(): Promise<void> {
    const rows = this.sentCommands;
    this.sentCommands = [];
    if (rows.length === 0) return;
    try {
      await this.ctx.sql`
        insert into audit_events (kind, actor, job_id, host_id, message, details)
        select v.kind, 'system', v.job, v.host, v.message,
          jsonb_build_object('requestId', v.request, 'attempt', v.attempt, 'replica', ${this.ctx.replicaId}::text)
        from jsonb_to_recordset(${this.ctx.sql.json(rows as never)}::jsonb)
          as v(kind text, job uuid, host uuid, message text, request text, attempt int)`;
    } catch (err) {
      if (!this.stopped) this.log.warn({ err, commands: rows.length }, "cannot record commands in the audit log");
    }
  }

  /**
   * After the LISTEN connection came back from an outage of `downMs`:
   * every stream re-reads its host; hosts recorded as attached here
   * without a stream here (it ended while the database was away, so its
   * detachment was not recorded) are detached now, so that their grace
   * period runs; and no host loses its jobs for the outage: a host whose
   * grace had not run out when the database went away (it could not
   * attach again meanwhile) gets its whole grace period from now.
   */
  syncAll(downMs = 0): void {
    for (const s of this.sessions.values()) s.requestSync();
    void this.detachOrphans();
    if (downMs > 0) void this.restartGrace(downMs);
  }

  private async restartGrace(downMs: number): Promise<void> {
    try {
      const rows = await this.ctx.sql`
        update hosts set detached_at = now()
        where attached_replica is null and detached_at is not null and detached_at < now()
          and detached_at > now() - ${this.config.supervisorGraceMs + downMs} * interval '1 millisecond'
        returning id`;
      if (rows.length > 0) this.log.info({ hosts: rows.length, downMs }, "grace periods of detached hosts restarted after the database outage");
    } catch (err) {
      if (!this.stopped) this.log.warn({ err }, "cannot restart the grace periods of detached hosts");
    }
  }

  /** Records the detachment of hosts attached to this replica by a stream it no longer holds. */
  async detachOrphans(): Promise<void> {
    const live = [...this.sessions.values()].map((s) => s.id);
    try {
      const rows = await this.ctx.sql`
        update hosts set attached_replica = null, attach_session = null, attached_at = null, detached_at = now(),
          supervisor_draining = false
        where attached_replica = ${this.ctx.replicaId} and not (attach_session = any(${live}::uuid[]))
        returning id, pg_notify('treadmill_hosts', id::text)`;
      if (rows.length > 0) this.log.info({ hosts: rows.length }, "detached hosts whose streams ended while the database was away");
      this.orphans = false;
    } catch (err) {
      if (!this.stopped) this.log.warn({ err }, "cannot detach hosts whose streams ended");
    }
  }

  markSeen(hostId: string): void {
    this.seen.add(hostId);
  }

  private async tick(): Promise<void> {
    const now = Date.now();
    const late = now - this.lastTick > 2 * this.config.supervisorHeartbeatMs;
    this.lastTick = now;
    for (const s of this.sessions.values()) s.tick(now, late);
    // Only while supervisors can attach here again: the grace period must not run while they cannot.
    if (this.orphans && this.ctx.notifications.connected) await this.detachOrphans();
    try {
      await this.flushSeen();
    } catch (err) {
      if (!this.stopped) this.log.warn({ err }, "cannot record supervisors' last-seen times");
    }
  }

  /** One write for every host heard from since the last tick; rows busy elsewhere are left for the next. */
  private async flushSeen(): Promise<void> {
    if (this.seen.size === 0) return;
    const ids = [...this.seen];
    this.seen.clear();
    await this.ctx.sql`
      update hosts h set last_seen_at = now()
      from (select id from hosts where id = any(${ids}::uuid[]) order by id for update skip locked) l
      where h.id = l.id`;
  }

  /** The Attach handler. */
  attach(requests: AsyncIterable<AttachRequest>, hctx: HandlerContext): AsyncIterable<AttachResponse> {
    return this.attachAs(requests, () => requireHost(hctx), hctx.signal);
  }

  /**
   * The stream of the host `caller()` returns (it throws for anyone else),
   * until `signal` aborts (the call ended, the server is stopping) or the
   * session finishes. Served by Connect (`attach`) and by the plain-gRPC
   * procedure (attach-grpc.ts).
   */
  async *attachAs(requests: AsyncIterable<AttachRequest>, caller: () => HostCaller, signal: AbortSignal): AsyncIterable<AttachResponse> {
    const host = caller();
    if (this.stopped) throw new ConnectError("coordinator replica shutting down", Code.Unavailable);
    const iterator = requests[Symbol.asyncIterator]();
    let timer: NodeJS.Timeout | undefined;
    const first = await Promise.race([
      iterator.next(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new ConnectError("no hello within three heartbeat intervals", Code.DeadlineExceeded)),
          3 * this.config.supervisorHeartbeatMs,
        );
      }),
    ]).finally(() => clearTimeout(timer));
    if (first.done) throw invalid("the stream ended before a hello");
    if (first.value.payload.case !== "hello") throw invalid("the first message must be a hello");
    const hello = first.value.payload.value;
    const major = hello.protocolVersion?.major ?? 0;
    if (major !== PROTOCOL_VERSION.major) {
      throw new ConnectError(
        `protocol version ${major}.${hello.protocolVersion?.minor ?? 0} is not supported; this coordinator speaks ${PROTOCOL_VERSION.major}.x`,
        Code.FailedPrecondition,
      );
    }
    if (hello.hostId !== "" && hello.hostId !== host.hostId) {
      throw new ConnectError("hello.host_id is not the host of this credential", Code.PermissionDenied);
    }
    validateHello(hello);

    const session = new HostSession(this, host, hello);
    const welcome = await session.open();
    // The call's signal aborts when this replica stops, and when the
    // supervisor's connection goes away (it died, the network broke).
    signal.addEventListener(
      "abort",
      () =>
        session.finish(
          this.stopped
            ? new ConnectError("coordinator replica shutting down", Code.Unavailable)
            : new ConnectError("the supervisor's connection ended", Code.Canceled),
        ),
      { once: true },
    );
    void session.read(iterator);
    try {
      yield welcome;
      for await (const message of session.outbox) yield message;
    } finally {
      session.finish();
      await session.closed;
    }
  }
}

function validateHello(hello: SupervisorHello): void {
  if (hello.capacity < 0 || hello.capacity > 1024) throw invalid("hello.capacity must be between 0 and 1024");
  if (hello.supervisorVersion.length > 128) throw invalid("hello.supervisor_version must be at most 128 characters");
  if (hello.jobs.length > 1024) throw invalid("hello.jobs must have at most 1024 entries");
  for (const [i, job] of hello.jobs.entries()) checkHeld(`hello.jobs[${i}]`, job);
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

function checkHeld(field: string, job: { jobId: string; attempt: number }): void {
  if (!UUID.test(job.jobId)) throw invalid(`${field}.job_id must be a lower-case uuid`);
  if (job.attempt < 1) throw invalid(`${field}.attempt must be at least 1`);
}

function termination(t: { reason: FinalizeReason; exitStatus: ExitStatus; exitCode?: number; message: string }): HostTermination {
  const reason = reasonName(t.reason);
  const valid = reason !== undefined && reason !== "queue_timeout" && reason !== "host_dropped";
  return {
    reason: valid ? reason : "internal_error",
    exitStatus: t.exitStatus === ExitStatus.SUCCESS ? "success" : t.exitStatus === ExitStatus.FAILURE ? "failure" : null,
    exitCode: t.exitCode ?? null,
    message: valid ? t.message.slice(0, 4096) : `supervisor reported an invalid end (${FinalizeReason[t.reason] ?? t.reason}): ${t.message.slice(0, 1024)}`,
  };
}

/** One Attach stream of one host. */
export class HostSession {
  readonly id = randomUUID();
  readonly outbox = new AsyncQueue<AttachResponse>();
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  private finished = false;
  private opened = false;
  private lastMessageAt = Date.now();
  private backlog = 0;
  private draining: boolean;
  private readonly pending = new Map<string, Pending>();
  private readonly sent = new Set<string>();
  private syncing = false;
  private syncAgain = false;
  private readonly actor: string;
  private readonly log: Logger;
  /**
   * Serialises message handling and syncs. Reports and acknowledgements only
   * queue their change in the group commit here (in arrival order, which the
   * group commit keeps for each job) and are answered once it commits, so
   * the next message need not wait for that commit; everything else waits
   * for those commits first (`settled`), as if handled one at a time.
   */
  private chain: Promise<void> = Promise.resolve();
  /** Group-committed changes of this stream not committed yet. */
  private readonly committing = new Set<Promise<void>>();

  constructor(
    private readonly streams: SupervisorStreams,
    private readonly host: HostCaller,
    private readonly hello: SupervisorHello,
  ) {
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.draining = hello.draining;
    this.actor = `host:${host.hostName}`;
    this.log = streams.log.child({ hostId: host.hostId, session: this.id });
  }

  private get ctx(): CoordinatorContext {
    return this.streams.ctx;
  }

  /** Records the attachment, reconciles the hello with the database, returns the welcome. */
  async open(): Promise<AttachResponse> {
    const { ctx, hello, host } = this;
    const acks: AttachResponse[] = [];
    const stops: AttachResponse[] = [];
    const row = await ctx.sql.begin(async (tx) => {
      const [h] = await tx<HostRow[]>`
        update hosts as h set attached_replica = ${ctx.replicaId}, attach_session = ${this.id}, attached_at = now(),
          last_seen_at = now(), detached_at = null, supervisor_version = ${hello.supervisorVersion},
          supervisor_capacity = ${hello.capacity > 0 ? hello.capacity : null}, supervisor_draining = ${hello.draining}
        where id = ${host.hostId}
        returning ${hostColumns(tx)}`;
      if (!h) throw new ConnectError("this host no longer exists", Code.PermissionDenied);
      if (hello.driverKind !== DriverKind.UNSPECIFIED && DriverKind[hello.driverKind]?.toLowerCase() !== h.driver_kind) {
        throw invalid(`hello.driver_kind ${DriverKind[hello.driverKind] ?? hello.driverKind} is not this host's driver (${h.driver_kind})`);
      }
      await this.reconcile(tx, acks, stops);
      await audit(tx, {
        kind: "host.attached",
        actor: this.actor,
        hostId: host.hostId,
        message: `supervisor ${hello.supervisorVersion} attached to replica ${ctx.replicaId}`,
        details: { session: this.id, instance: hello.instanceId, jobs: hello.jobs.length },
      });
      await tx`select pg_notify('treadmill_commands', ${host.hostId}), pg_notify('treadmill_hosts', ${host.hostId}),
        pg_notify('treadmill_schedule', '')`;
      return h;
    });
    const previous = this.streams.sessions.get(host.hostId);
    this.streams.sessions.set(host.hostId, this);
    previous?.finish(new ConnectError("superseded by a newer stream for this host", Code.Aborted));
    this.opened = true;
    this.log.info({ jobs: hello.jobs.length, replica: ctx.replicaId }, "supervisor attached");
    for (const m of [...acks, ...stops]) this.outbox.push(m);
    this.requestSync();
    return create(AttachResponseSchema, {
      payload: {
        case: "welcome",
        value: {
          protocolVersion: PROTOCOL_VERSION,
          host: hostMessage(row),
          heartbeatInterval: durationFromMs(this.streams.config.supervisorHeartbeatMs),
          serverTime: timestampNow(),
          coordinatorId: ctx.replicaId,
        },
      },
    });
  }

  /** DESIGN.md §4's reconciliation table, in the attach transaction. */
  private async reconcile(tx: Db, acks: AttachResponse[], stops: AttachResponse[]): Promise<void> {
    const hostId = this.host.hostId;
    const rows = await tx<
      { job_id: string; attempt: number; started: boolean; terminated: boolean; job_state: string; job_attempt: number; stop_reason: string | null }[]
    >`
      select jh.job_id, jh.attempt, jh.started, jh.terminated_at is not null as terminated,
        j.state as job_state, j.attempt as job_attempt, j.stop_reason
      from job_hosts jh join jobs j on j.id = jh.job_id
      where jh.host_id = ${hostId} and jh.released_at is null
      order by jh.job_id, jh.attempt
      for update of j`;
    const held = new Map<string, HeldJob>(this.hello.jobs.map((j) => [`${j.jobId}/${j.attempt}`, j]));
    const at = (jobId: string, attempt: number) => ({ jobId, hostId, attempt });
    for (const r of rows) {
      const key = `${r.job_id}/${r.attempt}`;
      const h = held.get(key);
      held.delete(key);
      const current = r.job_state !== "finalized" && r.job_attempt === r.attempt && !r.terminated;
      if (h?.termination) {
        // Terminated here: finalize (the requested stop's reason wins) or, for a
        // job already finalized, just acknowledge; either way the slot is free.
        await hostEnded(tx, at(r.job_id, r.attempt), termination(h.termination), { released: true, actor: this.actor });
        acks.push(ackReport("", r.job_id, r.attempt, true));
      } else if (h) {
        // Holds it, not terminated: adopt the reported state (StopJob follows
        // from sync when a stop was requested or the attempt is not current).
        if (current) {
          await hostProgress(
            tx,
            at(r.job_id, r.attempt),
            { state: stateName(h.state) ?? "assigned", stage: stageName(h.stage), message: "adopted on attach" },
            this.actor,
          );
        } else {
          await tx`update job_hosts set started = true where job_id = ${r.job_id} and attempt = ${r.attempt} and host_id = ${hostId}`;
        }
      } else if (!current) {
        await releaseSlot(tx, at(r.job_id, r.attempt));
      } else if (r.stop_reason !== null) {
        // Asked to stop, and it does not run here: it is stopped.
        await hostEnded(tx, at(r.job_id, r.attempt), { reason: "canceled", message: "not running on its host" }, { released: true, actor: this.actor });
      } else if (r.started) {
        await hostEnded(
          tx,
          at(r.job_id, r.attempt),
          { reason: "host_dropped", message: `host ${this.host.hostName} re-attached without the job` },
          { released: true, actor: this.actor },
        );
      }
      // else: assigned, never started here: sync sends StartJob again.
    }
    // Held jobs the database does not assign to this host (any more).
    for (const h of held.values()) {
      if (h.termination) {
        acks.push(ackReport("", h.jobId, h.attempt, true));
      } else {
        stops.push(this.stopMessage(h.jobId, h.attempt, FinalizeReason.INTERNAL_ERROR, "the job is not assigned to this host"));
      }
    }
  }

  /** Ends the stream over a message it could not handle. */
  private fail(err: unknown): void {
    if (err instanceof ConnectError) {
      this.finish(err);
    } else if (isDatabaseUnavailable(err)) {
      // The supervisor attaches again once the database is back; its hello carries what this stream could not record.
      this.finish(databaseUnavailable());
    } else {
      this.log.warn({ err }, "supervisor stream failed");
      this.finish(new ConnectError("the coordinator could not record a message; attach again", Code.Unavailable));
    }
  }

  /** Tracks a queued change until it commits; a failed one ends the stream. */
  private committed(change: Promise<void>): void {
    const tracked = change.catch((err) => this.fail(err)).finally(() => this.committing.delete(tracked));
    this.committing.add(tracked);
  }

  /** Resolves once every change queued so far has committed (or failed). */
  private async settled(): Promise<void> {
    while (this.committing.size > 0) await Promise.all(this.committing);
  }

  /** Handles the supervisor's messages in order until the stream ends. */
  async read(iterator: AsyncIterator<AttachRequest>): Promise<void> {
    const fail = (err: unknown) => this.fail(err);
    try {
      for (;;) {
        let next: IteratorResult<AttachRequest>;
        try {
          next = await iterator.next();
        } catch (err) {
          // Reading failed: the supervisor or its connection went away, or it sent garbage.
          const error = ConnectError.from(err);
          this.finish(error.code === Code.InvalidArgument ? error : new ConnectError(`the supervisor's stream broke: ${error.rawMessage}`, Code.Canceled));
          return;
        }
        if (next.done || this.finished) break;
        // Liveness counts from arrival, not from handling: a busy database
        // delays the handling of a report, not the supervisor's heartbeat.
        this.lastMessageAt = Date.now();
        this.streams.markSeen(this.host.hostId);
        const message = next.value;
        if (message.payload.case === "heartbeat" && message.payload.value.draining === this.draining) continue;
        this.backlog++;
        const handled = this.serial(() => this.handle(message)).finally(() => this.backlog--);
        handled.catch(fail);
        // Handled in order; reading goes on unless too much waits (messages
        // to handle, or changes to commit).
        if (this.backlog > 64) await handled.catch(() => undefined);
        while (this.committing.size > 64 && !this.finished) await Promise.race(this.committing);
      }
      await this.chain;
      await this.settled();
      this.finish();
    } catch (err) {
      fail(err);
    }
  }

  private serial(fn: () => Promise<void>): Promise<void> {
    const run = this.chain.then(fn);
    this.chain = run.catch(() => undefined);
    return run;
  }

  private async handle(message: AttachRequest): Promise<void> {
    const { payload } = message;
    switch (payload.case) {
      case "hello":
        throw invalid("hello may only be the first message");
      case "jobStateReport":
        return this.onReport(payload.value);
      case "commandAck":
        return this.onAck(payload.value);
      case "heartbeat":
        await this.settled();
        if (payload.value.draining !== this.draining) {
          this.draining = payload.value.draining;
          await this.ctx.sql`
            update hosts set supervisor_draining = ${payload.value.draining}
            where id = ${this.host.hostId} and attach_session = ${this.id}
            returning pg_notify('treadmill_hosts', id::text), pg_notify('treadmill_schedule', '')`;
        }
        return;
      case "snapshotResult":
        await this.settled();
        return onSnapshotResult(this.ctx, this.host, payload.value);
      case "jobLogReport":
        await this.settled(); // after the job's own reports that came before it
        return this.outbox.push(await onJobLogReport(this.ctx, this.host, payload.value));
      case "logTokenRequest":
        return this.outbox.push(await onLogTokenRequest(this.ctx, this.host, payload.value));
      default:
        return;
    }
  }

  private async onReport(r: JobStateReport): Promise<void> {
    checkHeld("job_state_report", r);
    if (r.reportId.length > 64) throw invalid("job_state_report.report_id must be at most 64 characters");
    const at = { jobId: r.jobId, hostId: this.host.hostId, attempt: r.attempt };
    if (r.termination) {
      const ended = this.commit(r.jobId, { kind: "ended", end: { at, termination: termination(r.termination), released: true, actor: this.actor } });
      this.committed(ended.then(() => this.outbox.push(ackReport(r.reportId, r.jobId, r.attempt, true))));
      return;
    }
    const state = stateName(r.state);
    if (state !== "initializing" && state !== "running" && state !== "terminating") {
      throw invalid("job_state_report.state must be INITIALIZING, RUNNING or TERMINATING");
    }
    const progressed = this.commit(r.jobId, {
      kind: "progress",
      report: { at, state, stage: state === "initializing" ? stageName(r.stage) : null, message: r.message.slice(0, 4096), actor: this.actor },
    });
    this.committed(progressed.then(() => this.outbox.push(ackReport(r.reportId, r.jobId, r.attempt, false))));
  }

  /** Group-commits `op`, a change to job `jobId`. */
  private commit(jobId: string, op: Op): Promise<void> {
    return this.streams.commits.run(jobId, op);
  }

  private async onAck(ack: CommandAck): Promise<void> {
    const p = this.pending.get(ack.requestId);
    if (!p) return; // an answer to a command of an older sending, or unknown: nothing to do
    this.pending.delete(ack.requestId);
    const at = { jobId: p.jobId, hostId: this.host.hostId, attempt: p.attempt };
    if (p.kind === "start") {
      if (ack.ok) {
        this.committed(this.commit(p.jobId, { kind: "started", at }));
      } else {
        this.log.warn({ jobId: p.jobId, attempt: p.attempt, code: ack.errorCode, reason: ack.errorMessage }, "supervisor refused a job");
        this.committed(this.commit(p.jobId, {
          kind: "ended",
          end: {
            at,
            termination: { reason: "host_start_failure", message: `the supervisor refused StartJob: ${ack.errorMessage.slice(0, 1024)}` },
            released: true,
            actor: this.actor,
          },
        }));
      }
      return;
    }
    if (!ack.ok) {
      this.log.warn({ jobId: p.jobId, attempt: p.attempt, code: ack.errorCode, reason: ack.errorMessage }, "supervisor refused StopJob");
      return;
    }
    // A stop of an attempt the supervisor never started, or that the
    // coordinator already ended, leaves nothing behind: the slot is free.
    this.committed(this.commit(p.jobId, {
      kind: "apply",
      apply: async (tx) => {
        const [row] = await tx<{ started: boolean; terminated: boolean }[]>`
          select started, terminated_at is not null as terminated from job_hosts
          where job_id = ${p.jobId} and attempt = ${p.attempt} and host_id = ${this.host.hostId} and released_at is null`;
        if (!row) return;
        if (!row.started) {
          await hostEnded(tx, at, { reason: "canceled", message: "stopped before it started" }, { released: true, actor: this.actor });
        } else if (row.terminated) {
          await releaseSlot(tx, at);
        }
      },
    }));
  }

  /** Re-reads the host's assignments and sends the commands missing (coalesced). */
  requestSync(): void {
    if (this.finished || !this.opened) return;
    if (this.syncing) {
      this.syncAgain = true;
      return;
    }
    this.syncing = true;
    void this.serial(async () => {
      try {
        do {
          this.syncAgain = false;
          await this.settled();
          await this.sync();
        } while (this.syncAgain && !this.finished);
      } catch (err) {
        if (!this.finished) this.log.warn({ err }, "cannot sync supervisor commands");
      } finally {
        this.syncing = false;
      }
    });
  }

  private async sync(): Promise<void> {
    const hostId = this.host.hostId;
    const rows = await this.ctx.sql<
      {
        attach_session: string | null;
        job_id: string | null;
        attempt: number;
        started: boolean;
        terminated: boolean;
        job_state: string;
        job_attempt: number;
        stop_reason: string | null;
        start_failures: number;
      }[]
    >`
      select h.attach_session, jh.job_id, jh.attempt, jh.started, jh.terminated_at is not null as terminated,
        j.state as job_state, j.attempt as job_attempt, j.stop_reason, coalesce(jh.start_failures, 0) as start_failures
      from hosts h
        left join job_hosts jh on jh.host_id = h.id and jh.released_at is null
        left join jobs j on j.id = jh.job_id
      where h.id = ${hostId}`;
    const h = rows[0];
    if (!h) return this.finish(new ConnectError("this host was deleted", Code.PermissionDenied));
    if (h.attach_session === null) {
      // Another replica took this one for dead (it was too slow to heartbeat)
      // and detached the host; the stream is alive, so it is attached again.
      const [again] = await this.ctx.sql`
        update hosts set attached_replica = ${this.ctx.replicaId}, attach_session = ${this.id}, attached_at = now(), detached_at = null
        where id = ${hostId} and attach_session is null
        returning pg_notify('treadmill_hosts', id::text), pg_notify('treadmill_schedule', '')`;
      if (!again) return this.requestSync();
      this.log.warn("host was detached by another replica while its stream is alive here; attached again");
    } else if (h.attach_session !== this.id) {
      return this.finish(new ConnectError("superseded by a newer stream for this host", Code.Aborted));
    }
    const held = rows.flatMap((r) => (r.job_id === null ? [] : [{ ...r, job_id: r.job_id }]));
    const starts: string[] = [];
    const sends: AttachResponse[] = [];
    // Forget commands of attempts this host no longer holds a slot for.
    const live = new Set(held.flatMap((r) => [`start/${r.job_id}/${r.attempt}`, `stop/${r.job_id}/${r.attempt}`]));
    for (const key of this.sent) if (!live.has(key)) this.sent.delete(key);
    for (const [id, p] of this.pending) if (!live.has(p.key)) this.pending.delete(id);
    for (const r of held) {
      const current = r.job_state !== "finalized" && r.job_attempt === r.attempt && !r.terminated;
      if (!current || r.stop_reason !== null) {
        const key = `stop/${r.job_id}/${r.attempt}`;
        if (this.sent.has(key)) continue;
        const reason = !current
          ? FinalizeReason.INTERNAL_ERROR
          : r.stop_reason === "job_timeout"
            ? FinalizeReason.JOB_TIMEOUT
            : FinalizeReason.CANCELED;
        const why = !current ? "the attempt is no longer current" : r.stop_reason === "job_timeout" ? "job timeout" : "canceled";
        sends.push(this.stopMessage(r.job_id, r.attempt, reason, why));
      } else if (!r.started && r.start_failures >= MAX_START_FAILURES) {
        await this.stopPoisonedStart(r.job_id, r.attempt, r.start_failures);
      } else if (!r.started && !this.sent.has(`start/${r.job_id}/${r.attempt}`)) {
        starts.push(r.job_id);
      }
    }
    if (starts.length > 0) {
      sends.push(...this.startMessages(await buildStartJobs(this.ctx, this.ctx.sql, hostId, starts)));
    }
    this.send(sends);
  }

  /**
   * A StartJob that the supervisor's stream broke over, again and again, is
   * not sent once more: the attempt ends as a start failure (infrastructure:
   * the restart policy may run it elsewhere), said on its timeline and in
   * the log.
   */
  private async stopPoisonedStart(jobId: string, attempt: number, failures: number): Promise<void> {
    const message = `the supervisor's stream broke ${failures} times while StartJob was unanswered; the command is not sent again`;
    this.log.error({ jobId, attempt, failures }, "StartJob stopped: it keeps breaking the supervisor's stream");
    await this.commit(jobId, {
      kind: "ended",
      end: { at: { jobId, hostId: this.host.hostId, attempt }, termination: { reason: "host_start_failure", message }, released: true, actor: this.actor },
    });
  }

  /**
   * The scheduler's StartJobs of a fresh assignment, right after its commit.
   * A sync may have sent them already (or a StopJob, if the job was canceled
   * meanwhile): each attempt gets one command of each kind per stream.
   */
  deliverStarts(starts: StartJob[]): void {
    if (this.finished || !this.opened) return;
    this.send(this.startMessages(starts.filter((s) => !this.sent.has(`stop/${s.jobId}/${s.attempt}`))));
  }

  /** StartJob messages of `starts` not sent yet on this stream, recorded as sent and pending. */
  private startMessages(starts: StartJob[]): AttachResponse[] {
    const messages: AttachResponse[] = [];
    for (const start of starts) {
      const key = `start/${start.jobId}/${start.attempt}`;
      if (this.sent.has(key)) continue; // sent meanwhile (by the scheduler's hand-over or an earlier sync)
      const message = create(AttachResponseSchema, { payload: { case: "startJob", value: start } });
      this.sent.add(key);
      this.pending.set(start.requestId, { key, kind: "start", jobId: start.jobId, attempt: start.attempt, sentAt: Date.now(), message });
      messages.push(message);
    }
    return messages;
  }

  private send(sends: AttachResponse[]): void {
    if (sends.length === 0 || this.finished) return;
    for (const m of sends) this.outbox.push(m);
    // Off the stream's path: the command is on its way; the record follows.
    this.streams.auditCommands(this.host, sends);
  }

  private stopMessage(jobId: string, attempt: number, reason: FinalizeReason, message: string): AttachResponse {
    const requestId = uuidv7();
    const key = `stop/${jobId}/${attempt}`;
    const m = create(AttachResponseSchema, {
      payload: {
        case: "stopJob",
        value: {
          requestId,
          jobId,
          attempt,
          reason,
          message,
          gracePeriod: durationFromMs(this.streams.config.stopGraceMs),
        },
      },
    });
    this.sent.add(key);
    this.pending.set(requestId, { key, kind: "stop", jobId, attempt, sentAt: Date.now(), message: m });
    return m;
  }

  /** Heartbeat, liveness and re-sending of unacknowledged commands. */
  tick(now: number, late: boolean): void {
    if (this.finished || !this.opened) return;
    const interval = this.streams.config.supervisorHeartbeatMs;
    if (late) {
      // This process was stalled: messages may be waiting unread. Judge next time.
      this.lastMessageAt = Math.max(this.lastMessageAt, now - interval);
    } else if (now - this.lastMessageAt > 3 * interval) {
      this.finish(new ConnectError("no message from the supervisor for three heartbeat intervals", Code.DeadlineExceeded));
      return;
    }
    this.outbox.push(create(AttachResponseSchema, { payload: { case: "heartbeat", value: { time: timestampNow() } } }));
    for (const [requestId, p] of this.pending) {
      if (now - p.sentAt < 3 * interval) continue;
      // Same command again with a new request id; the old id's late ack is ignored.
      this.pending.delete(requestId);
      const newId = uuidv7();
      const value = { ...(p.message.payload.value as object), requestId: newId };
      const message = create(AttachResponseSchema, { payload: { case: p.message.payload.case, value } as never });
      this.pending.set(newId, { ...p, sentAt: now, message });
      this.outbox.push(message);
    }
  }

  /** Ends the stream (with `error`, or cleanly) and records the detachment. Idempotent. */
  finish(error?: ConnectError): void {
    if (this.finished) return;
    this.finished = true;
    const unanswered = [...this.pending.values()].filter((p) => p.kind === "start");
    const broken = error !== undefined && BROKEN.has(error.code) && unanswered.length > 0;
    this.outbox.end(error);
    if (error) this.log.info({ code: Code[error.code], reason: error.rawMessage }, "supervisor stream ended");
    else this.log.info("supervisor stream ended");
    if (this.streams.sessions.get(this.host.hostId) === this) this.streams.sessions.delete(this.host.hostId);
    void this.chain
      .then(() => this.settled())
      .then(() => (broken ? this.countStartFailures(unanswered) : undefined))
      .then(() => (this.opened ? this.detach() : undefined))
      .catch((err) => {
        this.log.warn({ err }, "cannot record the detachment; retried");
        this.streams.orphans = true;
      })
      .finally(() => this.resolveClosed());
  }

  /** The stream broke with these StartJobs unanswered: each counts toward MAX_START_FAILURES. */
  private async countStartFailures(starts: Pending[]): Promise<void> {
    const rows = starts.map((p) => ({ job: p.jobId, attempt: p.attempt }));
    await this.ctx.sql`
      update job_hosts jh set start_failures = jh.start_failures + 1
      from jsonb_to_recordset(${this.ctx.sql.json(rows as never)}::jsonb) as v(job uuid, attempt int)
      where jh.job_id = v.job and jh.attempt = v.attempt and jh.host_id = ${this.host.hostId}
        and not jh.started and jh.released_at is null`;
  }

  private async detach(): Promise<void> {
    await this.ctx.sql.begin(async (tx) => {
      const rows = await tx`
        update hosts set attached_replica = null, attach_session = null, attached_at = null, detached_at = now(),
          supervisor_draining = false
        where id = ${this.host.hostId} and attach_session = ${this.id}
        returning pg_notify('treadmill_hosts', id::text)`;
      if (rows.length > 0) {
        await audit(tx, { kind: "host.detached", actor: this.actor, hostId: this.host.hostId, details: { session: this.id } });
      }
    });
  }
}

function ackReport(reportId: string, jobId: string, attempt: number, terminal: boolean): AttachResponse {
  return create(AttachResponseSchema, { payload: { case: "ackReport", value: { reportId, jobId, attempt, terminal } } });
}

export { JobState };
