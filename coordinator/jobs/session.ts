/**
 * One Attach stream of one host (DESIGN.md §4): the session reads the
 * supervisor's messages in order, answers them, heartbeats, and ends the
 * stream when the supervisor falls silent, a newer stream supersedes it or
 * the replica stops. What it decides it asks elsewhere: the hello and the
 * commands the database asks for from reconciliation.ts, what was sent and
 * is unanswered from its CommandLedger, the messages a part of the job
 * system answers (snapshots, log status) from the handler registry
 * (stream-handlers.ts). Reports and acknowledgements go to the replica's
 * group commit (group-commit.ts).
 *
 * Order: a stream's messages are handled one at a time. A report or an
 * acknowledgement only queues its change in the group commit (which keeps
 * each job's changes in order) and is answered once it commits, so the next
 * message need not wait for that commit; everything else waits for those
 * commits first, as if handled one at a time.
 */
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampNow } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { JobStage } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import {
  type AttachRequest,
  type AttachResponse,
  AttachResponseSchema,
  type CommandAck,
  type JobStateReport,
  type StartJob,
  type SupervisorHello,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { AsyncQueue } from "../../lib/async/queue.js";
import type { Logger } from "../../lib/logger.js";
import { audit } from "../db/queries/audit.js";
import type { HostCaller } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import { databaseUnavailable, isDatabaseUnavailable } from "../db/errors.js";
import {
  attachHost,
  detachHost,
  hostMessage,
  notifyAttached,
  reattachHost,
  setSupervisorDraining,
} from "../db/queries/hosts.js";
import {
  countStartFailures,
  type HostSlot,
  hostSlotsForSync,
  lockHostSlots,
  markStarted,
  releaseSlot,
  slotState,
} from "../db/queries/job-hosts.js";
import { CommandLedger, type Pending } from "./command-ledger.js";
import { buildStartJobs } from "./commands.js";
import type { JobConfig } from "./config.js";
import type { GroupCommit, Op } from "./group-commit.js";
import { commandsFor, reconcileHello, termination } from "./reconciliation.js";
import type { Db } from "../db/queries/jobs.js";
import { stageName, stateName } from "./store.js";
import type { SupervisorHandlers } from "./stream-handlers.js";
import { hostEnded, hostProgress } from "./transitions.js";

/** Streams broken while a StartJob of an attempt was unanswered, after which it is not sent again. */
export const MAX_START_FAILURES = 3;

import { PROTOCOL_VERSION } from "../../lib/protocol.js";

/**
 * Codes of a stream that broke (not a clean end, a newer stream, or this
 * replica stopping): a StartJob unanswered then may be what broke it. Not
 * classify's "retryable": Unavailable (this replica stopping) and Aborted (a
 * newer stream) are retryable yet no fault of the job, and DataLoss (a
 * corrupt message) is permanent yet counts.
 */
const BROKEN = new Set([Code.Canceled, Code.DeadlineExceeded, Code.Unknown, Code.Internal, Code.DataLoss]);

const invalid = (message: string) => new ConnectError(message, Code.InvalidArgument);

/** What a session shares with the other streams of its replica (supervisor-stream.ts). */
export interface StreamsOfReplica {
  readonly ctx: CoordinatorContext;
  readonly config: JobConfig;
  readonly log: Logger;
  /** Reports and acknowledgements of every stream, committed together. */
  readonly commits: GroupCommit;
  readonly handlers: SupervisorHandlers;
  /** Makes `session` its host's stream here; returns the one it replaces. */
  takeOver(session: HostSession): HostSession | undefined;
  /** `session` ended: no longer its host's stream here. */
  release(session: HostSession): void;
  /** A stream ended and its detachment could not be recorded: recorded at the next tick. */
  orphaned(): void;
  /** The supervisor of `hostId` was heard from (its last-seen time, written in batches). */
  markSeen(hostId: string): void;
  /** Records the commands sent in the audit log (in batches). */
  auditCommands(host: HostCaller, sends: AttachResponse[]): void;
}

/** The hello's fields, each refusal an InvalidArgument naming the field. */
export function validateHello(hello: SupervisorHello): void {
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
  private readonly ledger: CommandLedger;
  private syncing = false;
  private syncAgain = false;
  private readonly actor: string;
  private readonly log: Logger;
  /** Serialises message handling and syncs (see the head comment; `settled` waits for the commits). */
  private chain: Promise<void> = Promise.resolve();
  /** Group-committed changes of this stream not committed yet. */
  private readonly committing = new Set<Promise<void>>();

  constructor(
    private readonly streams: StreamsOfReplica,
    private readonly host: HostCaller,
    private readonly hello: SupervisorHello,
  ) {
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.draining = hello.draining;
    this.actor = `host:${host.hostName}`;
    this.log = streams.log.child({ hostId: host.hostId, session: this.id });
    this.ledger = new CommandLedger(streams.config.stopGraceMs);
  }

  get hostId(): string {
    return this.host.hostId;
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
      // The job rows first, the host row after (the job system's lock order,
      // transitions.ts): a release in flight on this host holds its job
      // row and then takes the host row to count the freed slot.
      const recorded = await lockHostSlots(tx, host.hostId);
      const h = await attachHost(tx, {
        hostId: host.hostId,
        replica: ctx.replicaId,
        session: this.id,
        supervisorVersion: hello.supervisorVersion,
        capacity: hello.capacity,
        draining: hello.draining,
      });
      if (!h) throw new ConnectError("this host no longer exists", Code.PermissionDenied);
      if (hello.driverKind !== DriverKind.UNSPECIFIED && DriverKind[hello.driverKind]?.toLowerCase() !== h.driver_kind) {
        throw invalid(`hello.driver_kind ${DriverKind[hello.driverKind] ?? hello.driverKind} is not this host's driver (${h.driver_kind})`);
      }
      await this.reconcile(tx, recorded, acks, stops);
      await audit(tx, {
        kind: "host.attached",
        actor: this.actor,
        hostId: host.hostId,
        message: `supervisor ${hello.supervisorVersion} attached to replica ${ctx.replicaId}`,
        details: { session: this.id, instance: hello.instanceId, jobs: hello.jobs.length },
      });
      await notifyAttached(tx, host.hostId);
      return h;
    });
    const previous = this.streams.takeOver(this);
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

  /** DESIGN.md §4's reconciliation table (reconciliation.ts), in the attach transaction. */
  private async reconcile(tx: Db, recorded: HostSlot[], acks: AttachResponse[], stops: AttachResponse[]): Promise<void> {
    const hostId = this.host.hostId;
    for (const a of reconcileHello(this.host.hostName, recorded, this.hello.jobs)) {
      const at = { jobId: a.jobId, hostId, attempt: a.attempt };
      switch (a.kind) {
        case "end":
          await hostEnded(tx, at, a.termination, { released: true, actor: this.actor });
          if (a.ack) acks.push(ackReport("", a.jobId, a.attempt, true));
          break;
        case "adopt":
          await hostProgress(tx, at, { state: a.state, stage: a.stage, message: "adopted on attach" }, this.actor, this.streams.config);
          break;
        case "mark-started":
          await markStarted(tx, [at]);
          break;
        case "release":
          await releaseSlot(tx, at);
          break;
        case "ack":
          acks.push(ackReport("", a.jobId, a.attempt, true));
          break;
        case "stop":
          stops.push(this.ledger.stop(a.jobId, a.attempt, a.reason, a.message));
          break;
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
          await setSupervisorDraining(this.ctx.sql, this.host.hostId, this.id, payload.value.draining);
        }
        return;
      case undefined:
        return;
      default: {
        const handler = this.streams.handlers.get(payload.case);
        if (!handler) return;
        if (handler.afterCommits) await this.settled();
        const answer = await handler.handle(this.host, payload.value as never);
        if (answer) this.outbox.push(answer);
        return;
      }
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
    // A stage while INITIALIZING, and HELD while RUNNING (hold_on_failure).
    const staged = state === "initializing" || (state === "running" && r.stage === JobStage.HELD);
    const progressed = this.commit(r.jobId, {
      kind: "progress",
      report: { at, state, stage: staged ? stageName(r.stage) : null, message: r.message.slice(0, 4096), actor: this.actor },
    });
    this.committed(progressed.then(() => this.outbox.push(ackReport(r.reportId, r.jobId, r.attempt, false))));
  }

  /** Group-commits `op`, a change to job `jobId`. */
  private commit(jobId: string, op: Op): Promise<void> {
    return this.streams.commits.run(jobId, op);
  }

  private async onAck(ack: CommandAck): Promise<void> {
    const p = this.ledger.answer(ack.requestId);
    if (!p) return; // an answer to a command of an older sending, or unknown: nothing to do
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
        const row = await slotState(tx, at);
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
    const rows = await hostSlotsForSync(this.ctx.sql, hostId);
    const h = rows[0];
    if (!h) return this.finish(new ConnectError("this host was deleted", Code.PermissionDenied));
    if (h.attach_session === null) {
      // Another replica took this one for dead (it was too slow to heartbeat)
      // and detached the host; the stream is alive, so it is attached again.
      if (!(await reattachHost(this.ctx.sql, hostId, this.ctx.replicaId, this.id))) return this.requestSync();
      this.log.warn("host was detached by another replica while its stream is alive here; attached again");
    } else if (h.attach_session !== this.id) {
      return this.finish(new ConnectError("superseded by a newer stream for this host", Code.Aborted));
    }
    const held = rows.flatMap((r) => (r.jobId === null ? [] : [{ ...r, jobId: r.jobId }]));
    const starts: string[] = [];
    const sends: AttachResponse[] = [];
    // Forget commands of attempts this host no longer holds a slot for.
    this.ledger.keepOnly(held);
    const sent = (kind: "start" | "stop", jobId: string, attempt: number) => this.ledger.has(kind, jobId, attempt);
    for (const a of commandsFor(held, sent, MAX_START_FAILURES)) {
      if (a.kind === "stop") sends.push(this.ledger.stop(a.jobId, a.attempt, a.reason, a.message));
      else if (a.kind === "give-up-start") await this.stopPoisonedStart(a.jobId, a.attempt, a.failures);
      else starts.push(a.jobId);
    }
    if (starts.length > 0) {
      sends.push(...this.ledger.starts(await buildStartJobs(this.ctx, this.ctx.sql, hostId, starts)));
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
    this.send(this.ledger.starts(starts.filter((s) => !this.ledger.has("stop", s.jobId, s.attempt))));
  }

  private send(sends: AttachResponse[]): void {
    if (sends.length === 0 || this.finished) return;
    for (const m of sends) this.outbox.push(m);
    // Off the stream's path: the command is on its way; the record follows.
    this.streams.auditCommands(this.host, sends);
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
    for (const m of this.ledger.resend(now, 3 * interval)) this.outbox.push(m);
  }

  /** Ends the stream (with `error`, or cleanly) and records the detachment. Idempotent. */
  finish(error?: ConnectError): void {
    if (this.finished) return;
    this.finished = true;
    const unanswered = this.ledger.unansweredStarts();
    const broken = error !== undefined && BROKEN.has(error.code) && unanswered.length > 0;
    this.outbox.end(error);
    if (error) this.log.info({ code: Code[error.code], reason: error.rawMessage }, "supervisor stream ended");
    else this.log.info("supervisor stream ended");
    this.streams.release(this);
    void this.chain
      .then(() => this.settled())
      .then(() => (broken ? this.countStartFailures(unanswered) : undefined))
      .then(() => (this.opened ? this.detach() : undefined))
      .catch((err) => {
        this.log.warn({ err }, "cannot record the detachment; retried");
        this.streams.orphaned();
      })
      .finally(() => this.resolveClosed());
  }

  /** The stream broke with these StartJobs unanswered: each counts toward MAX_START_FAILURES. */
  private async countStartFailures(starts: Pending[]): Promise<void> {
    await countStartFailures(
      this.ctx.sql,
      this.host.hostId,
      starts.map((p) => ({ job: p.jobId, attempt: p.attempt })),
    );
  }

  private async detach(): Promise<void> {
    await this.ctx.sql.begin(async (tx) => {
      if (await detachHost(tx, this.host.hostId, this.id)) {
        await audit(tx, { kind: "host.detached", actor: this.actor, hostId: this.host.hostId, details: { session: this.id } });
      }
    });
  }
}

function ackReport(reportId: string, jobId: string, attempt: number, terminal: boolean): AttachResponse {
  return create(AttachResponseSchema, { payload: { case: "ackReport", value: { reportId, jobId, attempt, terminal } } });
}

