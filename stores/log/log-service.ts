import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { setMaxListeners } from "node:events";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  AppendRejectionCode,
  type AppendRequest,
  type AppendResponseSchema,
  ChannelInfoSchema,
  type ChannelPosition,
  ChannelPositionSchema,
  ChannelState,
  type CloseChannelRequest,
  type DeleteJobLogsRequest,
  type AppendHello,
  type Frame,
  type ListChannelsRequest,
  LogService,
  ReadEndReason,
  type ReadRequest,
  type ReadResponseSchema,
} from "../../gen/treadmill/log/v1/log_service_pb.js";
import type { Logger } from "../../lib/logger.js";
import { bearerToken, type Capability, type TokenVerifier, type VerifiedToken } from "../../lib/tokens.js";
import { PROTOCOL_VERSION } from "../../lib/protocol.js";
import { Notifier } from "../../lib/async/notifier.js";
import { CHANNEL_NAME, JOB_ID, MAX_FRAME_BYTES, type AckSink, type Channel, type Job, type LogStore } from "./log-store.js";
import type { Pieces } from "./segment.js";

/**
 * A frame as an Append stream takes it. Its data may be the pieces it
 * arrived in (the hand-written gRPC path, log-grpc.ts), stored without
 * being joined.
 */
export interface IncomingFrame {
  channel: string;
  seq: bigint;
  /** Capture time (µs since the epoch); undefined: not given. */
  captureMicros: number | undefined;
  data: Pieces;
  /** Bytes of data. */
  length: number;
}

/** An Append request as the stream takes it (AppendRequest's payload, with an IncomingFrame). */
export type AppendPayload = { case: "hello"; value: AppendHello } | { case: "frame"; value: IncomingFrame } | { case: undefined; value?: undefined };

/**
 * What `append` reads: AppendRequests from the Connect adapter, payloads
 * from the raw path, which decodes a frame's data as the pieces it arrived
 * in (log-grpc.ts).
 */
export type AppendInput = AppendRequest | AppendPayload;

function payloadOf(input: AppendInput): AppendPayload {
  return "$typeName" in input ? appendPayload(input) : input;
}

/** The payload of a decoded AppendRequest. */
export function appendPayload(request: AppendRequest): AppendPayload {
  const p = request.payload;
  if (p.case !== "frame") return p;
  const f: Frame = p.value;
  const captureMicros = f.captureTime ? micros(f.captureTime) : undefined;
  return { case: "frame", value: { channel: f.channel, seq: f.seq, captureMicros, data: [f.data], length: f.data.length } };
}

/** Data read from a segment per disk read when serving Read. */
const READ_BATCH_BYTES = 1 << 20;

type AppendResponseInit = MessageInitShape<typeof AppendResponseSchema>;
type ReadResponseInit = MessageInitShape<typeof ReadResponseSchema>;

function invalid(message: string): ConnectError {
  return new ConnectError(message, Code.InvalidArgument);
}

function shuttingDown(): ConnectError {
  return new ConnectError("log server is shutting down", Code.Unavailable);
}

function checkJobId(jobId: string, field = "job_id"): void {
  if (jobId === "") throw invalid(`${field} is required`);
  if (!JOB_ID.test(jobId)) throw invalid(`${field} must match [A-Za-z0-9][A-Za-z0-9_.-]{0,127}`);
}

function checkChannelName(name: string, field = "channel"): void {
  if (!CHANNEL_NAME.test(name)) throw invalid(`${field} must match [a-z][a-z0-9_-]{0,31}`);
}

function micros(ts: Timestamp | undefined): number {
  if (!ts) return Date.now() * 1000;
  return Number(ts.seconds) * 1e6 + Math.floor(ts.nanos / 1000);
}

function timestamp(micros: number): Timestamp {
  const seconds = Math.floor(micros / 1e6);
  return { $typeName: "google.protobuf.Timestamp", seconds: BigInt(seconds), nanos: Math.round(micros - seconds * 1e6) * 1000 };
}

function position(channel: Channel): MessageInitShape<typeof ChannelPositionSchema> {
  return { channel: channel.name, durableSeq: BigInt(channel.durableSeq), closed: channel.state.kind !== "open" };
}

/**
 * One Append stream: takes the frames of one job attempt and sends back, in
 * order, rejections and gap reports as they happen, and acknowledgements
 * (coalesced per channel: the latest durable seq) as flushes complete.
 */
/**
 * The Append streams of one job attempt, one per writer (`hello.writer`):
 * each host of a multi-host job ships its own channels of the same attempt.
 * A newer stream of the same writer supersedes the older one. Acks go to
 * every stream of the attempt; a writer ignores channels it does not write.
 */
class AttemptWriters implements AckSink {
  readonly streams = new Map<string, AppendSession>();

  ack(channel: string, seq: number): void {
    for (const s of this.streams.values()) s.ack(channel, seq);
  }

  abort(err: Error): void {
    for (const s of this.streams.values()) s.abort(err);
  }
}

class AppendSession implements AckSink {
  private readonly queue: AppendResponseInit[] = [];
  private readonly acks = new Map<string, number>();
  private readonly wake = new Notifier();
  private readonly lastExpect = new Map<string, number>();
  private readonly touched = new Set<Channel>();
  private error: Error | undefined;
  private inputDone = false;
  private settled = false;

  constructor(
    private readonly job: Job,
    private readonly attempt: number,
  ) {}

  ack(channel: string, seq: number): void {
    this.acks.set(channel, Math.max(seq, this.acks.get(channel) ?? 0));
    this.wake.notify();
  }

  abort(err: Error): void {
    this.error ??= err;
    this.wake.notify();
  }

  private send(message: AppendResponseInit): void {
    this.queue.push(message);
    this.wake.notify();
  }

  /** Reads the writer's frames until it half-closes, fails, or the stream is aborted. */
  async consume(requests: AsyncIterator<AppendInput>): Promise<void> {
    try {
      while (this.error === undefined) {
        const next = await requests.next();
        if (next.done || this.error !== undefined) break;
        const payload = payloadOf(next.value);
        if (payload.case === "frame") await this.frame(payload.value);
        else if (payload.case === "hello") throw invalid("hello is only allowed as the first message");
        else throw invalid("append request has no payload");
      }
      if (this.error === undefined) {
        this.inputDone = true;
        for (const channel of this.touched) await channel.settle();
        this.settled = true;
      }
    } catch (err) {
      this.abort(err instanceof Error ? err : new Error(String(err)));
    } finally {
      if (this.error !== undefined) await requests.return?.().catch(() => undefined);
      this.wake.notify();
    }
  }

  private reject(frame: IncomingFrame, code: AppendRejectionCode, message: string): void {
    this.send({ payload: { case: "rejection", value: { channel: frame.channel, seq: frame.seq, code, message } } });
  }

  private async frame(frame: IncomingFrame): Promise<void> {
    const seq = Number(frame.seq);
    if (!CHANNEL_NAME.test(frame.channel)) {
      return this.reject(frame, AppendRejectionCode.INVALID_FRAME, "frame.channel must match [a-z][a-z0-9_-]{0,31}");
    }
    if (seq < 1) return this.reject(frame, AppendRejectionCode.INVALID_FRAME, "frame.seq must be at least 1");
    if (frame.length === 0) return this.reject(frame, AppendRejectionCode.INVALID_FRAME, "frame.data must not be empty");
    if (frame.length > MAX_FRAME_BYTES) {
      return this.reject(frame, AppendRejectionCode.FRAME_TOO_LARGE, `frame.data is ${frame.length} bytes; at most ${MAX_FRAME_BYTES} are allowed`);
    }
    let channel = this.job.channel(this.attempt, frame.channel);
    if (!channel) {
      if (seq !== 1) return this.expect(frame.channel, 1);
      if (this.job.truncatedMessage !== undefined) {
        return this.reject(frame, AppendRejectionCode.SIZE_CAP, this.job.truncatedMessage);
      }
      channel = await this.job.createChannel(this.attempt, frame.channel);
    }
    const offer = channel.offer(seq, frame.captureMicros ?? Date.now() * 1000, frame.data);
    switch (offer.kind) {
      case "accepted":
        this.touched.add(channel);
        this.lastExpect.delete(channel.name);
        await channel.backpressure();
        return;
      case "duplicate":
        // Already stored: acknowledged again (now, or by the flush under way).
        this.touched.add(channel);
        if (offer.durable) this.ack(channel.name, channel.durableSeq);
        return;
      case "gap":
        return this.expect(channel.name, offer.expected);
      case "rejected":
        // Readers see the cap from the moment the writer is told.
        if (offer.code === "size_cap") await this.job.truncate(offer.message);
        return this.reject(
          frame,
          offer.code === "closed" ? AppendRejectionCode.CHANNEL_CLOSED : AppendRejectionCode.SIZE_CAP,
          offer.message,
        );
    }
  }

  /** Reports a gap once per expected seq (the rest of the writer's window would repeat it). */
  private expect(channel: string, expected: number): void {
    if (this.lastExpect.get(channel) === expected) return;
    this.lastExpect.set(channel, expected);
    this.send({ payload: { case: "expect", value: { channel, expectedSeq: BigInt(expected) } } });
  }

  /** The responses, until the writer is done and everything it sent is acknowledged. */
  async *responses(signal: AbortSignal): AsyncGenerator<AppendResponseInit> {
    while (true) {
      if (this.error !== undefined) throw this.error;
      if (signal.aborted) return;
      if (this.queue.length > 0) {
        yield this.queue.shift()!;
        continue;
      }
      if (this.acks.size > 0) {
        const acks = [...this.acks];
        this.acks.clear();
        for (const [channel, seq] of acks) yield { payload: { case: "ack", value: { channel, seq: BigInt(seq) } } };
        continue;
      }
      if (this.inputDone && this.settled) return;
      await this.wake.wait({ signal });
    }
  }
}

/** What the methods use of their call's HandlerContext (either transport builds one). */
export type RequestContext = Pick<HandlerContext, "requestHeader" | "signal">;

export interface LogServiceDeps {
  store: LogStore;
  verifier: TokenVerifier;
  logger: Logger;
}

/** `treadmill.log.v1.LogService` over a LogStore. */
export class LogServiceImpl implements ServiceImpl<typeof LogService> {
  private readonly store: LogStore;
  private readonly verifier: TokenVerifier;
  private readonly logger: Logger;
  /** Open Append streams (for the registry's status). */
  activeStreams = 0;

  constructor(deps: LogServiceDeps) {
    this.store = deps.store;
    this.verifier = deps.verifier;
    this.logger = deps.logger;
  }

  /** Verifies the caller's token against the first capability that applies. */
  private async authorize(ctx: RequestContext, allowed: Capability[]): Promise<VerifiedToken> {
    const token = bearerToken(ctx.requestHeader);
    let denied: unknown;
    for (const capability of allowed) {
      try {
        return await this.verifier.verify(token, capability);
      } catch (err) {
        if (!(err instanceof ConnectError) || err.code !== Code.PermissionDenied) throw err;
        denied ??= err;
      }
    }
    throw denied;
  }

  /** The Append stream, on either transport (the raw path: log-grpc.ts). */
  async *append(requests: AsyncIterable<AppendInput>, ctx: RequestContext): AsyncGenerator<AppendResponseInit> {
    const iterator = requests[Symbol.asyncIterator]();
    const first = await iterator.next();
    const opening = first.done ? undefined : payloadOf(first.value);
    if (opening?.case !== "hello") throw invalid("first append message must be a hello");
    const hello = opening.value;
    const major = hello.protocolVersion?.major ?? 0;
    if (major !== PROTOCOL_VERSION.major) {
      throw new ConnectError(`protocol version ${major}.x is not supported; this server speaks ${PROTOCOL_VERSION.major}.x`, Code.FailedPrecondition);
    }
    checkJobId(hello.jobId, "hello.job_id");
    if (hello.attempt < 1) throw invalid("hello.attempt must be at least 1");
    const token = await this.authorize(ctx, [{ scope: "log:write", job: hello.jobId }]);
    if (this.store.stopSignal.aborted) throw shuttingDown();
    const job = await this.store.job(hello.jobId);
    const logger = this.logger.child({ jobId: hello.jobId, attempt: hello.attempt, writer: hello.writer, tokenId: token.id });
    const session = new AppendSession(job, hello.attempt);
    const existing = job.sessions.get(hello.attempt);
    const writers = existing instanceof AttemptWriters ? existing : new AttemptWriters();
    job.sessions.set(hello.attempt, writers);
    writers.streams.get(hello.writer)?.abort(new ConnectError("superseded by a newer append stream for this job attempt", Code.Aborted));
    writers.streams.set(hello.writer, session);
    const onStop = () => session.abort(shuttingDown());
    this.store.stopSignal.addEventListener("abort", onStop);
    this.activeStreams++;
    logger.debug("append stream opened");
    try {
      const channels = [...(job.attempts.get(hello.attempt)?.values() ?? [])]
        .sort((a, b) => a.name.localeCompare(b.name))
        .map(position);
      yield {
        payload: {
          case: "welcome",
          value: {
            protocolVersion: PROTOCOL_VERSION,
            channels,
            remainingBytes: BigInt(job.remainingBytes()),
          },
        },
      };
      const consuming = session.consume(iterator);
      try {
        yield* session.responses(ctx.signal);
      } finally {
        // The reader may be blocked on a writer that sends nothing more (a
        // superseded stream): it stops at its next message or when the call
        // is cleaned up; nothing waits for it.
        session.abort(new ConnectError("append stream ended", Code.Canceled));
        void consuming;
      }
    } catch (err) {
      if (err instanceof ConnectError) throw err;
      if (job.deleted) throw new ConnectError("job logs deleted", Code.Aborted);
      logger.error({ err }, "append stream failed");
      throw new ConnectError("internal error", Code.Internal);
    } finally {
      this.activeStreams--;
      this.store.stopSignal.removeEventListener("abort", onStop);
      if (writers.streams.get(hello.writer) === session) writers.streams.delete(hello.writer);
      if (writers.streams.size === 0 && job.sessions.get(hello.attempt) === writers) job.sessions.delete(hello.attempt);
      logger.debug("append stream closed");
    }
  }

  async *read(req: ReadRequest, ctx: RequestContext): AsyncGenerator<ReadResponseInit> {
    checkJobId(req.jobId);
    checkChannelName(req.channel);
    if (req.attempt < 0) throw invalid("attempt must not be negative");
    const start = req.start;
    if (start.case === "fromSeq" && start.value < 1n) throw invalid("from_seq must be at least 1");
    if (start.case === "fromOffset" && start.value < 0n) throw invalid("from_offset must not be negative");
    if (start.case === "lastBytes" && start.value < 0n) throw invalid("last_bytes must not be negative");
    await this.authorize(ctx, [
      { scope: "log:read", job: req.jobId },
      { scope: "log:admin" },
    ]);
    const signal = AbortSignal.any([ctx.signal, this.store.stopSignal]);
    setMaxListeners(0, signal);
    const job = await this.store.job(req.jobId);
    const deletedEnd = (seq: number, offset: number): ReadResponseInit => ({
      payload: {
        case: "end",
        value: { reason: ReadEndReason.DELETED, message: "the job's logs were deleted", nextSeq: BigInt(seq), nextOffset: BigInt(offset) },
      },
    });

    // The channel (when following, waited for).
    let channel: Channel | undefined;
    while (true) {
      if (this.store.stopSignal.aborted) throw shuttingDown();
      if (ctx.signal.aborted) return;
      if (job.deleted) {
        yield deletedEnd(1, 0);
        return;
      }
      channel = pickChannel(job, req.attempt, req.channel);
      if (channel) break;
      if (!req.follow) {
        throw new ConnectError(`channel ${req.channel} of job ${req.jobId} not found`, Code.NotFound);
      }
      await job.changed.wait({ signal });
    }

    // Where to start. An offset past the end is waited for when following.
    let seq = 1;
    let cut = 0;
    let pendingOffset: number | undefined;
    if (start.case === "fromSeq") {
      seq = Number(start.value);
      if (!req.follow && seq > channel.durableSeq + 1) {
        throw new ConnectError(`from_seq ${seq} is past the end of channel ${req.channel} (next seq ${channel.durableSeq + 1})`, Code.OutOfRange);
      }
    } else if (start.case === "fromOffset" || start.case === "lastBytes") {
      const size = channel.segment.sizeBytes;
      const offset = start.case === "fromOffset" ? Number(start.value) : Math.max(0, size - Number(start.value));
      if (!req.follow && offset > size) {
        throw new ConnectError(`from_offset ${offset} is past the end of channel ${req.channel} (${size} bytes)`, Code.OutOfRange);
      }
      pendingOffset = offset;
    }

    while (true) {
      if (this.store.stopSignal.aborted) throw shuttingDown();
      if (ctx.signal.aborted) return;
      if (job.deleted) {
        yield deletedEnd(seq, channel.segment.sizeBytes);
        return;
      }
      if (pendingOffset !== undefined) {
        const size = channel.segment.sizeBytes;
        if (pendingOffset < size) {
          seq = channel.segment.seqAtOffset(pendingOffset);
          cut = pendingOffset - channel.dataOffset(seq);
          pendingOffset = undefined;
        } else if (pendingOffset === size || channel.state.kind !== "open") {
          seq = channel.durableSeq + 1;
          pendingOffset = undefined;
        }
      }
      if (pendingOffset === undefined && seq <= channel.durableSeq) {
        let frames;
        try {
          frames = await channel.read(seq, READ_BATCH_BYTES);
        } catch (err) {
          if (job.deleted) continue;
          if (this.store.stopSignal.aborted) throw shuttingDown();
          throw err;
        }
        for (const f of frames) {
          const data = cut > 0 ? f.data.subarray(cut) : f.data;
          const value = {
            attempt: channel.attempt,
            seq: BigInt(f.seq),
            offset: BigInt(f.offset + cut),
            captureTime: timestamp(f.captureMicros),
            data,
          };
          cut = 0;
          seq = f.seq + 1;
          yield { payload: { case: "frame", value } };
        }
        continue;
      }
      const state = channel.state;
      if (pendingOffset === undefined && state.kind !== "open" && channel.settled && seq > channel.durableSeq) {
        yield {
          payload: {
            case: "end",
            value: {
              reason: state.kind === "closed" ? ReadEndReason.CHANNEL_CLOSED : ReadEndReason.SIZE_CAP,
              message: state.kind === "truncated" ? state.message : "the channel is closed: the log is complete",
              nextSeq: BigInt(seq),
              nextOffset: BigInt(channel.dataOffset(seq)),
            },
          },
        };
        return;
      }
      if (!req.follow) {
        yield {
          payload: {
            case: "end",
            value: { reason: ReadEndReason.END_OF_DATA, nextSeq: BigInt(seq), nextOffset: BigInt(channel.dataOffset(seq)) },
          },
        };
        return;
      }
      // Deletion and shutdown also notify the channel (and abort `signal`).
      await channel.changed.wait({ signal });
    }
  }

  async closeChannel(req: CloseChannelRequest, ctx: RequestContext) {
    checkJobId(req.jobId);
    if (req.attempt < 1) throw invalid("attempt must be at least 1");
    if (req.channel !== "") checkChannelName(req.channel);
    await this.authorize(ctx, [
      { scope: "log:write", job: req.jobId },
      { scope: "log:admin" },
    ]);
    if (this.store.stopSignal.aborted) throw shuttingDown();
    const job = await this.store.job(req.jobId);
    let channels: Channel[];
    if (req.channel !== "") {
      const channel = job.channel(req.attempt, req.channel);
      if (!channel) {
        throw new ConnectError(`channel ${req.channel} of job ${req.jobId} attempt ${req.attempt} not found`, Code.NotFound);
      }
      channels = [channel];
    } else {
      channels = [...(job.attempts.get(req.attempt)?.values() ?? [])].sort((a, b) => a.name.localeCompare(b.name));
    }
    const closed: ChannelPosition[] = [];
    for (const channel of channels) {
      await channel.close();
      closed.push(create(ChannelPositionSchema, position(channel)));
    }
    this.logger.info({ jobId: req.jobId, attempt: req.attempt, channels: channels.map((c) => c.name) }, "log channels closed");
    return { channels: closed };
  }

  async listChannels(req: ListChannelsRequest, ctx: RequestContext) {
    checkJobId(req.jobId);
    await this.authorize(ctx, [
      { scope: "log:read", job: req.jobId },
      { scope: "log:admin" },
    ]);
    const job = await this.store.job(req.jobId);
    const channels = job
      .allChannels()
      .sort((a, b) => a.attempt - b.attempt || a.name.localeCompare(b.name))
      .map((c) =>
        create(ChannelInfoSchema, {
          attempt: c.attempt,
          channel: c.name,
          sizeBytes: BigInt(c.segment.sizeBytes),
          frameCount: BigInt(c.durableSeq),
          state:
            c.state.kind === "open" ? ChannelState.OPEN : c.state.kind === "closed" ? ChannelState.CLOSED : ChannelState.TRUNCATED,
          lastSeq: BigInt(c.durableSeq),
          firstCaptureTime: c.durableSeq > 0 ? timestamp(c.segment.firstCaptureMicros) : undefined,
          lastCaptureTime: c.durableSeq > 0 ? timestamp(c.segment.lastCaptureMicros) : undefined,
        }),
      );
    return { channels };
  }

  async deleteJobLogs(req: DeleteJobLogsRequest, ctx: RequestContext) {
    checkJobId(req.jobId);
    const token = await this.authorize(ctx, [{ scope: "log:admin" }]);
    if (this.store.stopSignal.aborted) throw shuttingDown();
    const bytesFreed = await this.store.deleteJob(req.jobId, `deleted by ${token.subject}`);
    return { bytesFreed: BigInt(bytesFreed) };
  }
}

/** The channel a Read means: of the given attempt, or of the latest attempt that has it. */
function pickChannel(job: Job, attempt: number, name: string): Channel | undefined {
  if (attempt > 0) return job.channel(attempt, name);
  const attempts = [...job.attempts.keys()].sort((a, b) => b - a);
  for (const a of attempts) {
    const channel = job.channel(a, name);
    if (channel) return channel;
  }
  return undefined;
}
