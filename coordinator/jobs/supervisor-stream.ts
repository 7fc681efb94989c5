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
 * This file holds the replica's streams: the Attach entry, the timers they
 * share, and the writes batched across them (last-seen times, the audit of
 * commands sent). One stream of one host is a HostSession (session.ts).
 *
 * The fast paths: the scheduler hands the StartJobs of an assignment straight
 * to the streams of this replica right after its commit (`deliverStarts`),
 * with no notification or read in between; reports and acknowledgements of
 * all streams are group-committed (group-commit.ts).
 */
import { Code, ConnectError, type HandlerContext } from "@connectrpc/connect";
import type { AttachRequest, AttachResponse, StartJob } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { Logger } from "../../lib/logger.js";
import { type HostCaller, requireHost } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import type { JobConfig } from "./config.js";
import { type SentCommand, auditCommandsSent } from "../db/queries/audit.js";
import * as hosts from "../db/queries/hosts.js";
import { GroupCommit } from "./group-commit.js";
import type { JobMetrics } from "./metrics.js";
import { PROTOCOL_VERSION } from "../../lib/protocol.js";
import { HostSession, type StreamsOfReplica, validateHello } from "./session.js";
import type { SupervisorHandlers } from "./stream-handlers.js";

const invalid = (message: string) => new ConnectError(message, Code.InvalidArgument);

/** The streams this replica holds, and what they share: timers, batched last-seen writes. */
export class SupervisorStreams implements StreamsOfReplica {
  readonly sessions = new Map<string, HostSession>();
  private readonly seen = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private lastTick = Date.now();
  /** A stream ended and its detachment could not be recorded: detachOrphans runs at the next tick. */
  private orphans = false;
  readonly log: Logger;
  /** Reports and acknowledgements of every stream, committed together. */
  readonly commits: GroupCommit;
  /** Audit rows of the commands sent in this turn of the event loop (see auditCommands). */
  private sentCommands: SentCommand[] = [];

  constructor(
    readonly ctx: CoordinatorContext,
    readonly config: JobConfig,
    readonly handlers: SupervisorHandlers,
    metrics?: JobMetrics,
  ) {
    this.log = ctx.logger.child({ subsystem: "supervisor-stream" });
    this.commits = new GroupCommit(ctx.sql, config, metrics);
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
      await auditCommandsSent(this.ctx.sql, rows, this.ctx.replicaId);
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
      const n = await hosts.restartGrace(this.ctx.sql, this.config.supervisorGraceMs + downMs);
      if (n > 0) this.log.info({ hosts: n, downMs }, "grace periods of detached hosts restarted after the database outage");
    } catch (err) {
      if (!this.stopped) this.log.warn({ err }, "cannot restart the grace periods of detached hosts");
    }
  }

  /** Records the detachment of hosts attached to this replica by a stream it no longer holds. */
  async detachOrphans(): Promise<void> {
    const live = [...this.sessions.values()].map((s) => s.id);
    try {
      const n = await hosts.detachOrphans(this.ctx.sql, this.ctx.replicaId, live);
      if (n > 0) this.log.info({ hosts: n }, "detached hosts whose streams ended while the database was away");
      this.orphans = false;
    } catch (err) {
      if (!this.stopped) this.log.warn({ err }, "cannot detach hosts whose streams ended");
    }
  }

  takeOver(session: HostSession): HostSession | undefined {
    const previous = this.sessions.get(session.hostId);
    this.sessions.set(session.hostId, session);
    return previous;
  }

  release(session: HostSession): void {
    if (this.sessions.get(session.hostId) === session) this.sessions.delete(session.hostId);
  }

  orphaned(): void {
    this.orphans = true;
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
    await hosts.markSeen(this.ctx.sql, ids);
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

