/**
 * The proxy's state: which job hosts hold a control stream (Expose) and what
 * they expose, the connections being set up (an OpenTunnel sent, waiting for
 * the supervisor's Tunnel stream) and the open ones, and the limits.
 *
 * Entrances call `dial()`; it returns once the supervisor's Tunnel is up, as
 * a Connection to start with the entrance's own side. Nothing here knows
 * about gRPC, WebSocket or TCP.
 */
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { type ExposeResponse, ExposeResponseSchema } from "../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import { CloseReason, type Exposure, ExposureKind } from "../gen/treadmill/proxy/v1/tunnel_pb.js";
import type { Logger } from "../lib/logger.js";
import { Outbox } from "../lib/async/outbox.js";
import { Connection, type Side } from "./splice.js";

export const EXPOSURE_NAME = /^[a-z][a-z0-9-]{0,31}$/;

export interface HubOptions {
  /** Sent in the welcome. */
  proxyId: string;
  /** Open and opening tunnels of the whole proxy. */
  maxTunnels: number;
  /** Open and opening tunnels of one job. */
  maxTunnelsPerJob: number;
  /** Exposures one job host may announce. */
  maxExposuresPerHost: number;
  /** How long a dial waits for the supervisor's Tunnel. */
  openTimeoutMs: number;
  /** A connection without bytes either way for this long is closed; 0: never. */
  idleTimeoutMs: number;
  /** How often supervisors are pinged; three silent intervals drop the stream. */
  pingIntervalMs: number;
  /** How long a side may take to finish after a close before it is reset. */
  forceAfterMs: number;
  logger: Logger;
}

/** One job host's control stream. */
export class SupervisorSession {
  readonly key: string;
  readonly exposures = new Map<string, Exposure>();
  readonly connections = new Set<OpenConnection>();
  lastHeardMs = Date.now();
  pingTimer: NodeJS.Timeout | undefined;
  detached = false;

  constructor(
    readonly jobId: string,
    readonly hostId: string,
    readonly attempt: number,
    /** The proxy's messages on the control stream. */
    readonly outbox: Outbox<ExposeResponse>,
    readonly logger: Logger,
  ) {
    this.key = sessionKey(jobId, hostId);
  }
}

interface OpenConnection {
  connection: Connection;
  jobId: string;
  hostId: string;
  exposure: string;
}

interface Pending {
  id: string;
  jobId: string;
  hostId: string;
  resolve: (side: Side) => void;
  reject: (err: ConnectError) => void;
}

export interface DialRequest {
  jobId: string;
  /** Empty: the token's host, else the job's only host exposing the name. */
  hostId: string;
  exposure: string;
  windowSize?: { cols: number; rows: number };
  /** The dial token's expiry. */
  expiresAtMs: number;
  /** "grpc", "websocket" or "tcp", for logs. */
  entrance: string;
  /** The client went away while waiting. */
  signal?: AbortSignal;
}

export interface Dialed {
  connection: Connection;
  supervisor: Side;
  exposure: Exposure;
  hostId: string;
}

function sessionKey(jobId: string, hostId: string): string {
  return `${jobId}\u0000${hostId}`;
}

export class Hub {
  readonly #sessions = new Map<string, SupervisorSession>();
  readonly #pending = new Map<string, Pending>();
  readonly #perJob = new Map<string, number>();
  #total = 0;
  #stopped = false;
  readonly #options: HubOptions;
  readonly #log: Logger;

  constructor(options: HubOptions) {
    this.#options = options;
    this.#log = options.logger;
  }

  /** Open and opening tunnels. */
  get tunnelCount(): number {
    return this.#total;
  }

  /** Job hosts with a control stream. */
  get sessionCount(): number {
    return this.#sessions.size;
  }

  /**
   * A control stream said hello: registers it, superseding (ABORTED) an older
   * stream of the same job host, whose open connections carry over.
   */
  attach(hello: { jobId: string; hostId: string; attempt: number }, outbox: Outbox<ExposeResponse>): SupervisorSession {
    if (this.#stopped) throw new ConnectError("proxy is shutting down", Code.Unavailable);
    const session = new SupervisorSession(
      hello.jobId,
      hello.hostId,
      hello.attempt,
      outbox,
      this.#log.child({ jobId: hello.jobId, hostId: hello.hostId }),
    );
    const old = this.#sessions.get(session.key);
    if (old) {
      old.detached = true;
      clearInterval(old.pingTimer);
      old.outbox.fail(new ConnectError("superseded by a newer expose stream for this job host", Code.Aborted));
      for (const c of old.connections) session.connections.add(c);
      old.connections.clear();
      session.logger.info("expose stream superseded an older one");
    }
    this.#sessions.set(session.key, session);
    session.pingTimer = setInterval(() => this.#ping(session), this.#options.pingIntervalMs);
    session.logger.info({ attempt: hello.attempt }, "supervisor attached");
    return session;
  }

  /** The control stream ended: its connections close with SUPERVISOR_GONE and its pending dials fail. */
  detach(session: SupervisorSession, why: string): void {
    if (session.detached) return;
    session.detached = true;
    clearInterval(session.pingTimer);
    if (this.#sessions.get(session.key) === session) this.#sessions.delete(session.key);
    for (const c of session.connections) c.connection.close(CloseReason.SUPERVISOR_GONE, "the job's supervisor disconnected");
    session.connections.clear();
    for (const p of this.#pending.values()) {
      if (p.jobId === session.jobId && p.hostId === session.hostId) {
        p.reject(new ConnectError("the job's supervisor disconnected", Code.Unavailable));
      }
    }
    session.logger.info({ why }, "supervisor detached");
  }

  /** Validates and adds (or replaces) exposures; throws InvalidArgument or ResourceExhausted. */
  announce(session: SupervisorSession, exposures: Exposure[]): void {
    for (const [i, e] of exposures.entries()) {
      if (!EXPOSURE_NAME.test(e.name)) {
        throw new ConnectError(`announce.exposures[${i}].name must match [a-z][a-z0-9-]{0,31}`, Code.InvalidArgument);
      }
      if (e.kind !== ExposureKind.CONSOLE && e.kind !== ExposureKind.TCP) {
        throw new ConnectError(`announce.exposures[${i}].kind must be console or tcp`, Code.InvalidArgument);
      }
      if (e.description.length > 256) {
        throw new ConnectError(`announce.exposures[${i}].description is longer than 256 characters`, Code.InvalidArgument);
      }
    }
    const names = new Set([...session.exposures.keys(), ...exposures.map((e) => e.name)]);
    if (names.size > this.#options.maxExposuresPerHost) {
      throw new ConnectError(
        `too many exposures: at most ${this.#options.maxExposuresPerHost} per job host`,
        Code.ResourceExhausted,
      );
    }
    for (const e of exposures) session.exposures.set(e.name, e);
    session.logger.debug({ exposures: exposures.map((e) => e.name) }, "exposures announced");
  }

  /** Removes exposures; their connections close with EXPOSURE_WITHDRAWN. */
  withdraw(session: SupervisorSession, names: string[]): void {
    for (const name of names) session.exposures.delete(name);
    for (const c of session.connections) {
      if (names.includes(c.exposure)) c.connection.close(CloseReason.EXPOSURE_WITHDRAWN, `exposure ${c.exposure} was withdrawn`);
    }
  }

  /** The supervisor could not serve a connection. */
  tunnelFailed(session: SupervisorSession, connectionId: string, reason: CloseReason, message: string): void {
    const p = this.#pending.get(connectionId);
    if (!p || p.jobId !== session.jobId || p.hostId !== session.hostId) return;
    const code =
      reason === CloseReason.LIMIT_REACHED
        ? Code.ResourceExhausted
        : reason === CloseReason.PERMISSION_DENIED
          ? Code.PermissionDenied
          : Code.Unavailable;
    const detail = message.slice(0, 200);
    const what = code === Code.PermissionDenied ? "the job's supervisor refused the connection" : "the supervisor could not open the tunnel";
    p.reject(new ConnectError(`${what}${detail ? `: ${detail}` : ""}`, code));
  }

  heard(session: SupervisorSession): void {
    session.lastHeardMs = Date.now();
  }

  /**
   * A supervisor opened its Tunnel for `connectionId`: hands its side to the
   * waiting dial. Throws NotFound (unknown or given up) or PermissionDenied.
   */
  attachTunnel(connectionId: string, jobId: string, side: Side): void {
    const p = this.#pending.get(connectionId);
    if (!p) throw new ConnectError(`connection ${connectionId} is unknown or expired`, Code.NotFound);
    if (p.jobId !== jobId) throw new ConnectError(`connection ${connectionId} belongs to another job`, Code.PermissionDenied);
    p.resolve(side);
  }

  /**
   * Asks the job's supervisor for a tunnel and waits for it. Throws
   * NotFound, Unavailable, ResourceExhausted, DeadlineExceeded, InvalidArgument
   * (several hosts expose the name and none was chosen), Canceled.
   */
  async dial(request: DialRequest): Promise<Dialed> {
    if (this.#stopped) throw new ConnectError("proxy is shutting down", Code.Unavailable);
    const session = this.#findSession(request);
    const exposure = session.exposures.get(request.exposure)!;
    const jobCount = this.#perJob.get(request.jobId) ?? 0;
    if (this.#total >= this.#options.maxTunnels) {
      throw new ConnectError(`proxy tunnel limit reached (${this.#options.maxTunnels})`, Code.ResourceExhausted);
    }
    if (jobCount >= this.#options.maxTunnelsPerJob) {
      throw new ConnectError(`tunnel limit of job ${request.jobId} reached (${this.#options.maxTunnelsPerJob})`, Code.ResourceExhausted);
    }
    this.#total++;
    this.#perJob.set(request.jobId, jobCount + 1);
    const release = () => {
      this.#total--;
      const n = (this.#perJob.get(request.jobId) ?? 1) - 1;
      if (n <= 0) this.#perJob.delete(request.jobId);
      else this.#perJob.set(request.jobId, n);
    };

    const id = randomUUID();
    const log = session.logger.child({ connectionId: id, exposure: request.exposure, entrance: request.entrance });
    let side: Side;
    try {
      side = await new Promise<Side>((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new ConnectError("the supervisor did not open the tunnel in time", Code.DeadlineExceeded)),
          this.#options.openTimeoutMs,
        );
        const onAbort = () => reject(new ConnectError("the client went away", Code.Canceled));
        request.signal?.addEventListener("abort", onAbort, { once: true });
        const settle = () => {
          clearTimeout(timer);
          request.signal?.removeEventListener("abort", onAbort);
          this.#pending.delete(id);
        };
        this.#pending.set(id, {
          id,
          jobId: session.jobId,
          hostId: session.hostId,
          resolve: (s) => {
            settle();
            resolve(s);
          },
          reject: (e) => {
            settle();
            reject(e);
          },
        });
        if (request.signal?.aborted) onAbort();
        void session.outbox.push(
          create(ExposeResponseSchema, {
            payload: {
              case: "openTunnel",
              value: { connectionId: id, exposureName: request.exposure, windowSize: request.windowSize },
            },
          }),
        );
      });
    } catch (err) {
      release();
      log.debug({ err }, "tunnel not opened");
      throw err;
    }

    const connection = new Connection({
      id,
      idleTimeoutMs: this.#options.idleTimeoutMs,
      expiresAtMs: request.expiresAtMs,
      forceAfterMs: this.#options.forceAfterMs,
      logger: log,
    });
    const open: OpenConnection = { connection, jobId: session.jobId, hostId: session.hostId, exposure: request.exposure };
    // The session may have been replaced or detached meanwhile: the live one of this job host holds it.
    const live = this.#sessions.get(session.key);
    if (!live || this.#stopped) {
      connection.close(this.#stopped ? CloseReason.SHUTDOWN : CloseReason.SUPERVISOR_GONE, "the job's supervisor disconnected");
    } else if (!live.exposures.has(request.exposure)) {
      connection.close(CloseReason.EXPOSURE_WITHDRAWN, `exposure ${request.exposure} was withdrawn`);
    } else {
      live.connections.add(open);
    }
    void connection.closed.then((closed) => {
      release();
      this.#sessions.get(session.key)?.connections.delete(open);
      log.info({ reason: CloseReason[closed.reason], bytesUp: closed.bytesUp, bytesDown: closed.bytesDown }, "tunnel closed");
    });
    log.info("tunnel opened");
    return { connection, supervisor: side, exposure, hostId: session.hostId };
  }

  /**
   * The host of the job whose supervisor exposes `exposure` (for the TCP
   * entrance, which checks before it binds a port). Throws like dial().
   */
  locate(request: { jobId: string; hostId: string; exposure: string }): string {
    return this.#findSession(request).hostId;
  }

  #findSession(request: { jobId: string; hostId: string; exposure: string }): SupervisorSession {
    if (request.hostId !== "") {
      const session = this.#sessions.get(sessionKey(request.jobId, request.hostId));
      if (!session) throw new ConnectError(`the supervisor of job ${request.jobId} on host ${request.hostId} is not connected to this proxy`, Code.Unavailable);
      if (!session.exposures.has(request.exposure)) {
        throw new ConnectError(`job ${request.jobId} does not expose ${request.exposure}`, Code.NotFound);
      }
      return session;
    }
    const ofJob = [...this.#sessions.values()].filter((s) => s.jobId === request.jobId);
    if (ofJob.length === 0) throw new ConnectError(`the supervisor of job ${request.jobId} is not connected to this proxy`, Code.Unavailable);
    const exposing = ofJob.filter((s) => s.exposures.has(request.exposure));
    if (exposing.length === 0) throw new ConnectError(`job ${request.jobId} does not expose ${request.exposure}`, Code.NotFound);
    if (exposing.length > 1) {
      throw new ConnectError(`host_id is required: several hosts of job ${request.jobId} expose ${request.exposure}`, Code.InvalidArgument);
    }
    return exposing[0];
  }

  #ping(session: SupervisorSession): void {
    if (Date.now() - session.lastHeardMs > 3 * this.#options.pingIntervalMs) {
      session.outbox.fail(new ConnectError("the supervisor stopped answering pings", Code.DeadlineExceeded));
      this.detach(session, "ping timeout");
      return;
    }
    void session.outbox.push(create(ExposeResponseSchema, { payload: { case: "ping", value: { pingId: randomUUID() } } }));
  }

  /** Closes every connection (SHUTDOWN) and control stream (Unavailable). */
  stop(): void {
    this.#stopped = true;
    for (const p of this.#pending.values()) p.reject(new ConnectError("proxy is shutting down", Code.Unavailable));
    for (const session of [...this.#sessions.values()]) {
      for (const c of session.connections) c.connection.close(CloseReason.SHUTDOWN, "the proxy is shutting down");
      session.outbox.fail(new ConnectError("proxy is shutting down", Code.Unavailable));
      this.detach(session, "proxy stopping");
    }
  }
}
