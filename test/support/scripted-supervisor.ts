/**
 * A scripted supervisor for tests and benchmarks: speaks
 * SupervisorService.Attach over a real gRPC stream with a host credential,
 * like the real supervisor, but runs nothing. It keeps the state the protocol
 * needs (the attempts it holds, terminal reports until acknowledged), records
 * every command, and either lets the test drive each job (`mode: "manual"`) or
 * runs each started job to a successful exit at once (`mode: "exit"`).
 *
 * With `reconnect`, it attaches again when its stream fails (rotating through
 * `urls`), with a hello listing what it holds, as a real supervisor does.
 */
import { randomUUID } from "node:crypto";
import type http2 from "node:http2";
import { create, fromBinary, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampNow } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { ExitStatus, FinalizeReason, JobStage, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import {
  type AttachRequest,
  AttachRequestSchema,
  type AttachResponse,
  AttachResponseSchema,
  type JobTerminationSchema,
  type StartJob,
  type SupervisorWelcome,
  SupervisorService,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { AsyncQueue } from "../../lib/async/queue.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { connectHttp2, openRawCall } from "../../lib/grpc/client.js";
import { frame } from "../../lib/grpc/wire.js";

type Termination = MessageInitShape<typeof JobTerminationSchema>;

/** One attempt the supervisor holds. */
export interface HeldAttempt {
  jobId: string;
  attempt: number;
  state: JobState;
  stage: JobStage;
  /** Set once it ended here; kept until the coordinator acknowledges it. */
  termination?: Termination;
  /** Held after its workload failed (`hold`): a StopJob ends it with this outcome. */
  heldExit?: Termination;
  start?: StartJob;
}

export interface ScriptedSupervisorOptions {
  /** Coordinator URLs; a reconnect goes to the next one. */
  urls: string[];
  credential: string;
  /** The hello's host_id (default: the credential's host, by leaving it empty). */
  hostId?: string;
  driverKind?: DriverKind;
  capacity?: number;
  protocolVersion?: { major: number; minor: number };
  /** "manual": the test reports; "exit": each started job runs and exits 0 at once. */
  mode?: "manual" | "exit";
  /** Attach again when the stream fails (not after Aborted, PermissionDenied, Unauthenticated, FailedPrecondition). */
  reconnect?: boolean;
  /** Attempts held at the first hello. */
  held?: HeldAttempt[];
  /** Record commands without acting on them or acknowledging them. */
  silent?: boolean;
  /** Called as each StartJob arrives (benchmarks time it). */
  onStartJob?: (start: StartJob) => void;
  /** Called with every message received, heartbeats excluded (a bench routes AckReports to its own reports). */
  onResponse?: (m: AttachResponse) => void;
  /** Keep no history of received messages (benchmarks with many jobs). */
  noHistory?: boolean;
  /** Heartbeat interval; default the welcome's. */
  heartbeatMs?: number;
  /**
   * "connect" (default): connect-node's client, like the supervisor. "raw":
   * hand-framed gRPC messages on an HTTP/2 stream, the same bytes for a
   * fraction of the client's CPU (benchmarks running hundreds of supervisors
   * on the coordinator's machine).
   */
  wire?: "connect" | "raw";
}

const key = (jobId: string, attempt: number) => `${jobId}/${attempt}`;
const FINAL = new Set([Code.Aborted, Code.PermissionDenied, Code.Unauthenticated, Code.FailedPrecondition, Code.InvalidArgument]);

export class ScriptedSupervisor {
  /** Every message received, heartbeats excluded, across streams. */
  readonly received: AttachResponse[] = [];
  /** Attempts held now. */
  readonly held = new Map<string, HeldAttempt>();
  /** How many times each job was physically started (a StartJob of an attempt not held). */
  readonly starts = new Map<string, number>();
  /** Jobs whose end the coordinator acknowledged, in order. */
  readonly finished: string[] = [];
  welcome: SupervisorWelcome | undefined;
  /** Sent in every heartbeat (and the hello). */
  draining = false;
  /** How the last stream ended (undefined while open or when it ended cleanly). */
  lastError: ConnectError | undefined;
  attaches = 0;
  private outbox: AsyncQueue<AttachRequest> | undefined;
  private abort: AbortController | undefined;
  private streamDone: Promise<void> = Promise.resolve();
  private readonly waiters: { match: (m: AttachResponse) => boolean; resolve: (m: AttachResponse) => void }[] = [];
  private readonly endWaiters: (() => void)[] = [];
  private urlIndex = 0;
  private closed = false;
  private heartbeat: NodeJS.Timeout | undefined;
  private readonly transports = new Map<string, Transport>();
  private readonly sessions = new Map<string, http2.ClientHttp2Session>();
  private reattaching: Promise<void> | undefined;

  constructor(readonly options: ScriptedSupervisorOptions) {
    for (const h of options.held ?? []) this.held.set(key(h.jobId, h.attempt), { ...h });
  }

  get url(): string {
    return this.options.urls[this.urlIndex % this.options.urls.length];
  }

  private transport(url: string): Transport {
    let t = this.transports.get(url);
    if (!t) {
      t = createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => this.options.credential)] });
      this.transports.set(url, t);
    }
    return t;
  }

  /** Opens a stream with a hello of the current state; resolves with the welcome, rejects with the stream's error. */
  async connect(): Promise<SupervisorWelcome> {
    const outbox = new AsyncQueue<AttachRequest>();
    const abort = new AbortController();
    this.outbox = outbox;
    this.abort = abort;
    this.welcome = undefined;
    this.lastError = undefined;
    outbox.push(
      create(AttachRequestSchema, {
        payload: {
          case: "hello",
          value: {
            protocolVersion: this.options.protocolVersion ?? { major: 1, minor: 0 },
            hostId: this.options.hostId ?? "",
            supervisorVersion: "scripted",
            instanceId: randomUUID(),
            driverKind: this.options.driverKind ?? DriverKind.PROCESS,
            capacity: this.options.capacity ?? 0,
            draining: this.draining,
            jobs: [...this.held.values()].map((h) => ({
              jobId: h.jobId,
              attempt: h.attempt,
              state: h.state,
              stage: h.stage,
              termination: h.termination,
            })),
          },
        },
      }),
    );
    const responses =
      this.options.wire === "raw"
        ? this.rawAttach(outbox, abort.signal)
        : createClient(SupervisorService, this.transport(this.url)).attach(outbox, { signal: abort.signal });
    let welcomed!: (w: SupervisorWelcome) => void;
    let failed!: (e: ConnectError) => void;
    const welcome = new Promise<SupervisorWelcome>((resolve, reject) => {
      welcomed = resolve;
      failed = reject;
    });
    let welcomedHere = false;
    this.streamDone = (async () => {
      try {
        for await (const m of responses) {
          if (m.payload.case === "welcome") {
            welcomedHere = true;
            this.welcome = m.payload.value;
            this.attaches++;
            this.startHeartbeats(m.payload.value);
            welcomed(m.payload.value);
            continue;
          }
          if (m.payload.case === "heartbeat") continue;
          if (m.payload.case === "startJob") this.options.onStartJob?.(m.payload.value);
          this.options.onResponse?.(m);
          if (!this.options.noHistory) this.received.push(m);
          this.onMessage(m);
          for (const w of [...this.waiters]) {
            if (w.match(m)) {
              this.waiters.splice(this.waiters.indexOf(w), 1);
              w.resolve(m);
            }
          }
        }
      } catch (err) {
        this.lastError = ConnectError.from(err);
      } finally {
        clearInterval(this.heartbeat);
        outbox.end();
        failed(this.lastError ?? new ConnectError("stream ended before a welcome", Code.Unavailable));
        for (const w of this.endWaiters.splice(0)) w();
        // A stream that never got its welcome failed its connect(): whoever called it retries.
        if (welcomedHere && this.options.reconnect && !this.closed && !(this.lastError && FINAL.has(this.lastError.code))) {
          this.reattaching = this.reattach();
        }
      }
    })();
    return welcome;
  }

  /** Attach on the "raw" wire: `outbox` framed onto the request stream, responses decoded. */
  private async *rawAttach(outbox: AsyncQueue<AttachRequest>, signal: AbortSignal): AsyncGenerator<AttachResponse> {
    let session = this.sessions.get(this.url);
    if (!session || session.closed || session.destroyed) {
      session = connectHttp2(this.url);
      this.sessions.set(this.url, session);
    }
    const call = openRawCall(session, `/${SupervisorService.typeName}/Attach`, { authorization: `Bearer ${this.options.credential}` }, {
      maxMessageBytes: 16 << 20,
    });
    const cancel = () => call.cancel();
    signal.addEventListener("abort", cancel, { once: true });
    void (async () => {
      for await (const m of outbox) if (!call.write(frame(toBinary(AttachRequestSchema, m)))) await call.drained();
      call.end();
    })().catch(cancel);
    try {
      for await (const bytes of call.messages()) yield fromBinary(AttachResponseSchema, bytes);
    } catch (err) {
      // Dropped here, as connect-node's client reports it.
      throw signal.aborted ? new ConnectError("the call was aborted", Code.Canceled) : err;
    } finally {
      signal.removeEventListener("abort", cancel);
      call.cancel();
    }
  }

  private async reattach(): Promise<void> {
    for (let i = 0; !this.closed; i++) {
      this.urlIndex++;
      try {
        await this.connect();
        return;
      } catch (err) {
        if (FINAL.has(ConnectError.from(err).code)) return;
        await new Promise((r) => setTimeout(r, Math.min(20 * (i + 1), 200)));
      }
    }
  }

  private startHeartbeats(welcome: SupervisorWelcome): void {
    const ms =
      this.options.heartbeatMs ??
      (welcome.heartbeatInterval ? Number(welcome.heartbeatInterval.seconds) * 1000 + welcome.heartbeatInterval.nanos / 1e6 : 10000);
    clearInterval(this.heartbeat);
    this.heartbeat = setInterval(() => this.sendHeartbeat(), ms);
    this.heartbeat.unref?.();
  }

  /** Sends a heartbeat now (with the current `draining`). */
  sendHeartbeat(): void {
    this.send({ case: "heartbeat", value: { time: timestampNow(), draining: this.draining } });
  }

  /** Sends one message on the current stream. */
  send(payload: MessageInitShape<typeof AttachRequestSchema>["payload"]): void {
    this.outbox?.push(create(AttachRequestSchema, { payload }));
  }

  /** Resolves with the next received message (or an earlier one, with `includePast`) matching `match`. */
  waitFor(match: (m: AttachResponse) => boolean, options: { timeoutMs?: number; includePast?: boolean } = {}): Promise<AttachResponse> {
    if (options.includePast) {
      const past = this.received.find(match);
      if (past) return Promise.resolve(past);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        reject(new Error(`no matching message within ${options.timeoutMs ?? 20000} ms; got ${this.received.map((m) => m.payload.case).join(", ")}`));
      }, options.timeoutMs ?? 20000);
      const waiter = {
        match,
        resolve: (m: AttachResponse) => {
          clearTimeout(timer);
          resolve(m);
        },
      };
      this.waiters.push(waiter);
    });
  }

  /** The StartJob of `jobId` (waiting for it if it has not come yet). */
  async startJob(jobId: string, timeoutMs?: number): Promise<StartJob> {
    const m = await this.waitFor((x) => x.payload.case === "startJob" && x.payload.value.jobId === jobId, { timeoutMs, includePast: true });
    return m.payload.value as StartJob;
  }

  /** Resolves when the current stream has ended. */
  ended(): Promise<void> {
    if (!this.outbox || this.outbox.closed) return Promise.resolve();
    return new Promise((resolve) => this.endWaiters.push(resolve));
  }

  /** Reports a state of a held attempt; resolves with the AckReport. */
  async report(jobId: string, attempt: number, state: JobState, stage: JobStage = JobStage.UNSPECIFIED): Promise<AttachResponse> {
    const h = this.held.get(key(jobId, attempt));
    if (h) {
      h.state = state;
      h.stage = stage;
    }
    const reportId = randomUUID();
    const ack = this.waitFor((m) => m.payload.case === "ackReport" && m.payload.value.reportId === reportId);
    this.send({ case: "jobStateReport", value: { reportId, jobId, attempt, state, stage, time: timestampNow() } });
    return ack;
  }

  /**
   * Ends a held attempt here and reports it; resolves with the AckReport.
   * The end is retained (and listed in the next hello) until acknowledged.
   */
  async terminate(jobId: string, attempt: number, termination: Termination): Promise<AttachResponse> {
    const h = this.held.get(key(jobId, attempt));
    if (h) {
      h.state = JobState.TERMINATING;
      h.termination = termination;
    }
    const reportId = randomUUID();
    const ack = this.waitFor((m) => m.payload.case === "ackReport" && m.payload.value.reportId === reportId);
    this.send({
      case: "jobStateReport",
      value: { reportId, jobId, attempt, state: JobState.TERMINATING, termination, time: timestampNow() },
    });
    return ack;
  }

  /**
   * The workload exited `exitCode` and the job is held (hold_on_failure):
   * reports RUNNING in stage HELD; a StopJob then ends it with that exit.
   */
  hold(jobId: string, attempt: number, exitCode: number): Promise<AttachResponse> {
    const h = this.held.get(key(jobId, attempt));
    const message = `workload exited with code ${exitCode}`;
    if (h) h.heldExit = { reason: FinalizeReason.WORKLOAD_EXITED, exitStatus: ExitStatus.FAILURE, exitCode, message };
    return this.report(jobId, attempt, JobState.RUNNING, JobStage.HELD);
  }

  /** Exits 0 (WORKLOAD_EXITED, SUCCESS). */
  exit(jobId: string, attempt: number, exitCode = 0): Promise<AttachResponse> {
    return this.terminate(jobId, attempt, {
      reason: FinalizeReason.WORKLOAD_EXITED,
      exitStatus: exitCode === 0 ? ExitStatus.SUCCESS : ExitStatus.FAILURE,
      exitCode,
      message: `exited ${exitCode}`,
    });
  }

  private ack(requestId: string, ok = true, errorCode = 0, errorMessage = ""): void {
    this.send({ case: "commandAck", value: { requestId, ok, errorCode, errorMessage } });
  }

  private onMessage(m: AttachResponse): void {
    const { payload } = m;
    if (this.options.silent && payload.case !== "ackReport") return;
    switch (payload.case) {
      case "startJob": {
        const s = payload.value;
        const k = key(s.jobId, s.attempt);
        const existing = this.held.get(k);
        if (existing) {
          existing.start = s;
          this.ack(s.requestId);
          return;
        }
        const capacity = this.options.capacity ?? Infinity;
        if ([...this.held.values()].length >= capacity) {
          this.ack(s.requestId, false, Code.FailedPrecondition, "no free slot");
          return;
        }
        this.held.set(k, { jobId: s.jobId, attempt: s.attempt, state: JobState.ASSIGNED, stage: JobStage.UNSPECIFIED, start: s });
        this.starts.set(s.jobId, (this.starts.get(s.jobId) ?? 0) + 1);
        this.ack(s.requestId);
        if (this.options.mode === "exit") {
          void this.report(s.jobId, s.attempt, JobState.RUNNING)
            .then(() => this.exit(s.jobId, s.attempt))
            .catch(() => undefined);
        }
        return;
      }
      case "stopJob": {
        const s = payload.value;
        const h = this.held.get(key(s.jobId, s.attempt));
        this.ack(s.requestId);
        if (h?.heldExit && !h.termination) {
          void this.terminate(s.jobId, s.attempt, { ...h.heldExit, held: true }).catch(() => undefined);
        } else if (h && !h.termination) {
          void this.terminate(s.jobId, s.attempt, {
            reason: s.reason === FinalizeReason.JOB_TIMEOUT ? FinalizeReason.JOB_TIMEOUT : FinalizeReason.CANCELED,
            message: `stopped: ${s.message}`,
          }).catch(() => undefined);
        }
        return;
      }
      case "ackReport": {
        const a = payload.value;
        if (a.terminal) {
          const k = key(a.jobId, a.attempt);
          if (this.held.get(k)?.termination || a.reportId === "") {
            if (this.held.delete(k)) this.finished.push(a.jobId);
          }
        }
        return;
      }
      default:
        return;
    }
  }

  /** Closes the stream (and stops reconnecting). Idempotent. */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.heartbeat);
    this.outbox?.end();
    this.abort?.abort();
    await this.streamDone;
    await this.reattaching;
    for (const session of this.sessions.values()) session.close();
  }

  /** Ends the current stream as if the connection broke (reconnects when configured). */
  drop(): Promise<void> {
    const done = this.ended();
    this.abort?.abort();
    return done;
  }
}
