/**
 * The writer side of job logs (DESIGN.md §7), used by supervisors: frames the
 * bytes of each channel, numbers them, spills them to local files and
 * streams them to every log server of the job, each with its own window and
 * reconnection; a frame leaves the spill only when every server acknowledged
 * it. Nothing is given up on a timer: the spill keeps what a server has not
 * acknowledged for as long as the server is away, and across a restart of the
 * writer (`LogShipper.resume`).
 *
 * ```ts
 * const shipper = new LogShipper({ jobId, attempt, servers: [{ url }], token, spillDir, logger });
 * shipper.channel("stdout").write(bytes);          // or: await shipper.channel("console").pipeFrom(stream)
 * await shipper.end();                            // no more output (flushed, spilled, recorded on disk)
 * const now = await shipper.settle(2000);         // waits up to 2 s for the servers
 * const report = await shipper.finish();          // until every server holds it all; then the spill goes
 * // after a crash of the writer: (await LogShipper.resume(metaPath, { logger })).finish()
 * ```
 *
 * Frames close at `frameBytes` (16 KiB) or `frameDelayMs` (25 ms) after
 * their first byte, whichever comes first. (DESIGN.md §7 says 100 ms; the log
 * server issue asks for 25 ms, which keeps a follower's latency low.) A frame
 * is spilled the moment it closes: a crash of the writer loses at most the
 * frames not closed yet, i.e. the last `frameDelayMs` of output.
 *
 * The spill lives in `spillDir` as `<job>-<attempt>.shipper.json` (who the log
 * belongs to, its servers, the current log:write token, whether the job
 * ended, what was lost; mode 0600: it holds a token) and one series of files
 * per channel (supervisor/log-shipper/spill.ts). The host's spills share a
 * SpillBudget: a frame the cap refuses is dropped and counted as lost, and
 * the channel takes frames again once the servers acknowledged enough.
 */
import { mkdir, readdir, readFile, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { Http2SessionManager } from "@connectrpc/connect-node";
import {
  AppendRejectionCode,
  type AppendRequestSchema,
  LogService,
  FrameSchema,
} from "../gen/treadmill/log/v1/log_service_pb.js";
import type { Logger } from "../lib/logger.js";
import { clientTransport } from "../lib/grpc/transport.js";
import { PUBLIC_ROOTS, http2Trust, type ClientTls } from "../lib/grpc/trust.js";
import { classify, keepStreaming, type StreamAttempt } from "../lib/retry.js";
import { Notifier } from "../lib/async/notifier.js";
import { AsyncQueue } from "../lib/async/queue.js";
import { PROTOCOL_VERSION } from "../lib/protocol.js";
import { FrameCache, Spill, SpillBudget, writeAtomic } from "./log-shipper/spill.js";

export { SpillBudget } from "./log-shipper/spill.js";

const CHANNEL_NAME = /^[a-z][a-z0-9_-]{0,31}$/;
const META_SUFFIX = ".shipper.json";

/** How the shipper talks to servers, spills and reports; shared by `new LogShipper` and `LogShipper.resume`. */
export interface ShippingOptions {
  logger: Logger;
  /** Transports by server URL (tests); default gRPC to the URL. */
  transports?: Map<string, Transport>;
  /** The CAs an https log server is verified with (--ca-file); default Node's roots. */
  tls?: ClientTls;
  /** The host's spill cap, shared by all its shippers; default: no cap. */
  budget?: SpillBudget;
  /** Channels whose frames pass the cap (the supervisor's own few lines). */
  capExempt?: (channel: string) => boolean;
  /** A frame closes at this size; default 16 KiB (the server takes up to 64 KiB). */
  frameBytes?: number;
  /** ... or this long after its first byte; default 25 ms. */
  frameDelayMs?: number;
  /** Unacknowledged frames in flight per channel and server; default 128. */
  windowFrames?: number;
  /** Memory for recent frames (beyond it, resends read the spill); default 8 MiB. */
  memoryBytes?: number;
  /** A spill file rolls at this size; default 4 MiB. */
  spillFileBytes?: number;
  /** Longest time a spilled frame waits for its fdatasync; default 1000 ms; 0: never. */
  syncIntervalMs?: number;
  /** Reconnection backoff (full jitter); default 100 ms to 5 s. */
  reconnect?: { initialMs: number; maxMs: number };
  /**
   * How long finish() waits before it answers with the report as it stands
   * (the shipping goes on, the spill stays); default: until settled.
   */
  finishTimeoutMs?: number;
  /** The cap started or stopped dropping output. */
  onLoss?: (event: LossEvent) => void;
  /** A server refused the token (expired, revoked): a fresh one is due (`renewToken`). */
  onTokenRefused?: () => void;
  /** Called once shipping settled, before the spill is removed (to record the outcome first). */
  onShipped?: (report: ShipperReport) => Promise<void>;
}

export interface LogShipperOptions extends ShippingOptions {
  jobId: string;
  attempt: number;
  /** The job's log servers; `transport` overrides the default gRPC transport to `url`. */
  servers: { url: string; transport?: Transport }[];
  /** The job's `log:write` token (`renewToken` replaces it). */
  token: string;
  /** When the token expires (ms since the epoch), when known. */
  tokenExpireMs?: number;
  /** Where the spill goes (created if missing); one folder may serve many shippers. */
  spillDir: string;
  /** Who writes, for the servers' logs (e.g. the host id). */
  writer?: string;
  /**
   * Other writers ship other channels of the same attempt (the hosts of a
   * multi-host job): the end closes only this shipper's channels, not the
   * attempt's. Each writer then needs its own `writer` name.
   */
  sharedAttempt?: boolean;
}

/** The spill cap started refusing a channel's output ("dropping"), or took it again ("resumed"). */
export interface LossEvent {
  kind: "dropping" | "resumed";
  channel: string;
  /** "resumed": bytes dropped since "dropping". */
  bytes: number;
  /** Bytes this shipper lost in all. */
  totalLost: number;
}

/** Where the log stands. */
export interface ShipperReport {
  /**
   * "complete": every server holds every byte and closed the channels;
   * "incomplete": some bytes will never arrive (bytesLost); "shipping":
   * nothing lost, but some server still lacks something.
   */
  status: "shipping" | "complete" | "incomplete";
  /** Every server holds the complete log and closed the channels. */
  complete: boolean;
  /** Nothing more will change: every server holds what it can. */
  settled: boolean;
  /** Bytes some server will never get (spill cap, failed spill writes, a server's refusal). */
  bytesLost: number;
  /** Why it is incomplete, or what it is still waiting for. */
  problem?: string;
  servers: ServerReport[];
}

export interface ServerReport {
  url: string;
  /** This server holds the complete log and closed its channels. */
  complete: boolean;
  /** Highest seq the server acknowledged, per channel. */
  ackedSeq: Record<string, number>;
  /** Why it is incomplete (the last error, a rejection), when it is. */
  problem?: string;
}

/** What the shipper keeps beside its spill, to be resumed by another process. */
interface ShipperMeta {
  version: 1;
  jobId: string;
  attempt: number;
  writer: string;
  sharedAttempt: boolean;
  servers: string[];
  token: string;
  tokenExpireMs: number | null;
  channels: string[];
  ended: boolean;
  lost: { cap: number; failed: number; failure: string };
}

type AppendRequestInit = MessageInitShape<typeof AppendRequestSchema>;

/** One channel as the job's driver sees it: a byte sink. */
export class ShipperChannel {
  readonly name: string;
  private readonly shipper: LogShipper;
  readonly spill: Spill;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private captureMicros = 0;
  private timer: NodeJS.Timeout | undefined;
  /** Frames handed to the spill; the last one resolves when all are spilled. */
  private spilling: Promise<unknown> = Promise.resolve();

  constructor(name: string, shipper: LogShipper, spill: Spill) {
    this.name = name;
    this.shipper = shipper;
    this.spill = spill;
  }

  /** Adds bytes to the channel. The bytes are copied. */
  write(bytes: Uint8Array | string): void {
    if (this.shipper.ended) throw new Error(`log channel ${this.name} is finished`);
    const buf = typeof bytes === "string" ? Buffer.from(bytes) : bytes;
    const max = this.shipper.frameBytes;
    let off = 0;
    while (off < buf.length) {
      if (this.buffered === 0) {
        this.captureMicros = nowMicros();
        this.timer = setTimeout(() => this.flush(), this.shipper.frameDelayMs);
      }
      const take = Math.min(max - this.buffered, buf.length - off);
      this.chunks.push(Buffer.from(buf.subarray(off, off + take)));
      this.buffered += take;
      off += take;
      if (this.buffered >= max) this.flush();
    }
  }

  /** Writes everything `source` yields until it ends (a child's stdout, a serial port). */
  async pipeFrom(source: AsyncIterable<Uint8Array | string>): Promise<void> {
    for await (const chunk of source) this.write(chunk);
  }

  /** Closes the current frame now (also at job end). */
  flush(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.buffered === 0) return;
    const data = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    if (!this.spill.admit(data.length, { force: this.shipper.capExempt(this.name), spare: this.shipper.capSpare() })) {
      this.shipper.capDropped(this.name, data.length);
      return;
    }
    this.shipper.capAdmitted(this.name);
    const capture = this.captureMicros;
    this.spilling = this.spill.append(capture, data).then(
      () => this.shipper.changed(),
      (err: unknown) => {
        this.spill.refund(data.length);
        this.shipper.spillFailed(this.name, data.length, err);
      },
    );
  }

  /** Resolves once every closed frame is in the spill. */
  async spilled(): Promise<void> {
    await this.spilling;
  }
}

/** The Append stream to one log server, reconnecting until it holds everything (then closes the channels) or is stopped. */
class ServerSender {
  readonly url: string;
  private readonly shipper: LogShipper;
  private readonly client: Client<typeof LogService>;
  private readonly sessionManager: Http2SessionManager | undefined;
  /** Highest acknowledged seq per channel. */
  readonly acked = new Map<string, number>();
  /** Channels this server refused for good (size cap, closed), and the channel offset from which it lacks bytes. */
  readonly refused = new Map<string, { why: string; fromOffset: number }>();
  private next = new Map<string, number>();
  private requests: AsyncQueue<AppendRequestInit> | undefined;
  private connected = false;
  private readonly stopController = new AbortController();
  private callController: AbortController | undefined;
  private pumping = false;
  private repump = false;
  lastProblem: string | undefined;
  private loop: Promise<void> | undefined;
  /** The server holds everything it ever will and its channels are closed: nothing more to do. */
  finished = false;

  constructor(server: { url: string; transport?: Transport; tls?: ClientTls }, shipper: LogShipper) {
    this.url = server.url;
    this.shipper = shipper;
    let transport = server.transport;
    if (!transport) {
      this.sessionManager = new Http2SessionManager(
        server.url,
        { pingIntervalMs: 15000, pingTimeoutMs: 10000 },
        http2Trust(server.url, server.tls ?? PUBLIC_ROOTS),
      );
      transport = clientTransport({ baseUrl: server.url, sessionManager: this.sessionManager });
    }
    this.client = createClient(LogService, transport);
  }

  start(): void {
    this.loop ??= this.run();
  }

  /** Every frame spilled so far is acknowledged (or refused for good). */
  caughtUp(): boolean {
    for (const channel of this.shipper.channelList()) {
      if (this.refused.has(channel.name)) continue;
      if ((this.acked.get(channel.name) ?? 0) < channel.spill.lastSeq) return false;
    }
    return true;
  }

  /** Seq through which the spill may drop frames as far as this server is concerned. */
  doneThrough(channel: ShipperChannel): number {
    if (this.refused.has(channel.name)) return channel.spill.lastSeq;
    return this.acked.get(channel.name) ?? 0;
  }

  /** Bytes this server will never get. */
  refusedBytes(): number {
    let bytes = 0;
    for (const [name, r] of this.refused) bytes += Math.max(0, (this.shipper.channelOf(name)?.spill.totalBytes ?? r.fromOffset) - r.fromOffset);
    return bytes;
  }

  private refuse(channel: ShipperChannel, why: string): void {
    if (this.refused.has(channel.name)) return;
    this.refused.set(channel.name, { why, fromOffset: channel.spill.offsetAfter(this.acked.get(channel.name) ?? 0) });
  }

  private headers(): Record<string, string> {
    const token = this.shipper.token();
    return token === "" ? {} : { authorization: `Bearer ${token}` };
  }

  /** Notes a failure; a refused token asks the owner for a fresh one. */
  private failed(err: unknown, what: string): void {
    const e = ConnectError.from(err);
    this.lastProblem = `${Code[e.code]}: ${e.rawMessage}`;
    if (e.code === Code.Unauthenticated || e.code === Code.PermissionDenied) this.shipper.tokenRefused();
    const permanent = classify(err) === "permanent";
    this.shipper.logger[permanent ? "error" : "warn"]({ url: this.url, code: Code[e.code], reason: e.rawMessage }, what);
  }

  private async run(): Promise<void> {
    // Every failure is logged and retried where it happens (round()): a log
    // server that refuses now may take the frames after an operator's fix.
    await keepStreaming({
      open: (attempt) => this.round(attempt),
      backoff: { ...this.shipper.reconnect, jitter: "full" },
      signal: this.stopController.signal,
      onEnd: () => (this.finished ? "stop" : undefined),
    });
  }

  /**
   * One round: the Append stream while this server lacks frames, then, once
   * the shipper is sealed and the server holds everything, the channels'
   * close. A stream that ended after its welcome resets the backoff.
   */
  private async round(attempt: StreamAttempt): Promise<void> {
    const signal = this.stopController.signal;
    if (!(this.shipper.sealed && this.caughtUp())) {
      try {
        if (await this.session()) attempt.healthy();
      } catch (err) {
        if (!signal.aborted) this.failed(err, "log server stream failed");
        return;
      } finally {
        this.connected = false;
        this.requests = undefined;
        this.shipper.changed();
      }
      if (!(this.shipper.sealed && this.caughtUp())) return;
    }
    if (this.shipper.channelList().length === 0) {
      // Nothing was ever written: nothing to close.
      this.finish();
      return;
    }
    try {
      if (this.refused.size === 0) await this.closeChannels();
      this.finish();
    } catch (err) {
      if (!signal.aborted) this.failed(err, "log server did not close the channels");
    }
  }

  private finish(): void {
    this.finished = true;
    this.lastProblem = this.refused.size > 0 ? [...this.refused.values()][0].why : undefined;
    this.shipper.changed();
  }

  /** One Append stream; resolves when it ends cleanly, returns whether it got a welcome. */
  private async session(): Promise<boolean> {
    const requests = new AsyncQueue<AppendRequestInit>();
    this.callController = new AbortController();
    const signal = AbortSignal.any([this.callController.signal, this.stopController.signal]);
    requests.push({
      payload: {
        case: "hello",
        value: {
          protocolVersion: PROTOCOL_VERSION,
          jobId: this.shipper.jobId,
          attempt: this.shipper.attempt,
          writer: this.shipper.writer,
        },
      },
    });
    let welcomed = false;
    try {
      for await (const res of this.client.append(requests, { signal, headers: this.headers() })) {
        const p = res.payload;
        switch (p.case) {
          case "welcome":
            welcomed = true;
            for (const pos of p.value.channels) {
              const durable = Number(pos.durableSeq);
              this.acked.set(pos.channel, Math.max(durable, this.acked.get(pos.channel) ?? 0));
            }
            this.next = new Map();
            this.requests = requests;
            this.connected = true;
            this.lastProblem = undefined;
            this.shipper.logger.debug({ url: this.url }, "log server stream open");
            break;
          case "ack": {
            const seq = Number(p.value.seq);
            if (seq > (this.acked.get(p.value.channel) ?? 0)) this.acked.set(p.value.channel, seq);
            break;
          }
          case "expect":
            this.next.set(p.value.channel, Number(p.value.expectedSeq));
            break;
          case "rejection": {
            const { channel, seq, code, message } = p.value;
            const why = `${AppendRejectionCode[code] ?? code}: ${message}`;
            this.lastProblem = why;
            const c = this.shipper.channelOf(channel);
            if (c) this.refuse(c, why);
            this.shipper.logger.warn({ url: this.url, channel, seq: Number(seq), code: AppendRejectionCode[code] }, "log server refused a frame");
            break;
          }
          default:
            break;
        }
        this.shipper.changed();
        this.pump();
      }
    } finally {
      requests.end();
    }
    return welcomed;
  }

  /** Sends what the window allows, in seq order per channel. */
  pump(): void {
    if (this.pumping) {
      this.repump = true;
      return;
    }
    this.pumping = true;
    void (async () => {
      try {
        do {
          this.repump = false;
          await this.pumpOnce();
        } while (this.repump);
      } catch (err) {
        this.shipper.logger.error({ err, url: this.url }, "log shipper send failed");
        this.callController?.abort();
      } finally {
        this.pumping = false;
      }
    })();
  }

  private async pumpOnce(): Promise<void> {
    const window = this.shipper.windowFrames;
    for (const channel of this.shipper.channelList()) {
      while (this.connected && this.requests && !this.refused.has(channel.name)) {
        const acked = this.acked.get(channel.name) ?? 0;
        const next = Math.max(this.next.get(channel.name) ?? acked + 1, acked + 1);
        if (next > channel.spill.lastSeq || next - acked > window) break;
        if (!channel.spill.holds(next)) {
          // Acknowledged once by every server, then lost by this one (its
          // data was wiped): what follows cannot be appended without it.
          this.refuse(channel, `the log server lost frames from ${next} on, which the spill no longer holds`);
          break;
        }
        const requests = this.requests;
        const frame = await channel.spill.get(next);
        if (this.requests !== requests) break; // reconnected meanwhile: start over
        requests.push({
          payload: {
            case: "frame",
            value: create(FrameSchema, {
              channel: channel.name,
              seq: BigInt(frame.seq),
              captureTime: timestampFromMicros(frame.captureMicros),
              data: frame.data,
            }),
          },
        });
        this.next.set(channel.name, next + 1);
      }
    }
    // Ended and all acknowledged: end the stream; run() closes the channels.
    if (this.shipper.sealed && this.connected && this.caughtUp()) this.requests?.end();
  }

  async stop(): Promise<void> {
    this.stopController.abort();
    await this.loop;
  }

  release(): void {
    this.sessionManager?.abort();
  }

  /** Closes the channels of the attempt (or, when shared, this writer's); throws to be retried. */
  private async closeChannels(): Promise<void> {
    const names = this.shipper.sharedAttempt ? this.shipper.channelList().map((c) => c.name) : [""];
    for (const channel of names) {
      try {
        await this.client.closeChannel(
          { jobId: this.shipper.jobId, attempt: this.shipper.attempt, channel },
          { headers: this.headers(), timeoutMs: 15000, signal: this.stopController.signal },
        );
      } catch (err) {
        // A channel that never got a frame on this server has nothing to close.
        if (ConnectError.from(err).code !== Code.NotFound) throw err;
      }
    }
  }
}

export class LogShipper {
  readonly jobId: string;
  readonly attempt: number;
  readonly writer: string;
  readonly sharedAttempt: boolean;
  readonly logger: Logger;
  readonly frameBytes: number;
  readonly frameDelayMs: number;
  readonly windowFrames: number;
  readonly reconnect: { initialMs: number; maxMs: number };
  private readonly options: LogShipperOptions;
  private readonly channels = new Map<string, ShipperChannel>();
  private readonly senders: ServerSender[];
  private readonly cache: FrameCache;
  private readonly budget: SpillBudget;
  /** Wakes waiters at every change of the shipper's state. */
  private readonly changes = new Notifier();
  private readonly prefix: string;
  private tokenValue: string;
  private tokenExpire: number | undefined;
  private dirReady: Promise<void> | undefined;
  private metaChain: Promise<void> = Promise.resolve();
  private metaQueued: Promise<void> | undefined;
  private dropping = false;
  /** No more output is taken. */
  ended = false;
  /** ... and all of it is in the spill: the log is complete once every server holds what is spilled. */
  sealed = false;
  private ending: Promise<void> | undefined;
  private shipped: Promise<ShipperReport> | undefined;
  private stopped = false;
  private closing: Promise<void> | undefined;
  private readonly lost = { cap: 0, failed: 0, failure: "" };
  /** The channel whose output the cap is dropping, and how much since it started. */
  private capEpisode: { channel: string; bytes: number } | undefined;

  constructor(options: LogShipperOptions) {
    if (options.servers.length === 0) throw new Error("a log shipper needs at least one log server");
    if (!Number.isInteger(options.attempt) || options.attempt < 1) throw new Error("attempt must be at least 1");
    this.options = options;
    this.jobId = options.jobId;
    this.attempt = options.attempt;
    this.writer = options.writer ?? "";
    this.sharedAttempt = options.sharedAttempt ?? false;
    this.logger = options.logger.child({ subsystem: "log-shipper", jobId: options.jobId, attempt: options.attempt });
    this.frameBytes = Math.min(65536, Math.max(1, options.frameBytes ?? 16384));
    this.frameDelayMs = options.frameDelayMs ?? 25;
    this.windowFrames = Math.max(1, options.windowFrames ?? 128);
    this.reconnect = options.reconnect ?? { initialMs: 100, maxMs: 5000 };
    this.cache = new FrameCache(options.memoryBytes ?? 8 << 20);
    this.budget = options.budget ?? new SpillBudget();
    this.prefix = `${safe(options.jobId)}-${options.attempt}`;
    this.tokenValue = options.token;
    this.tokenExpire = options.tokenExpireMs;
    this.senders = options.servers.map((s) => new ServerSender({ url: s.url, transport: s.transport ?? options.transports?.get(s.url), tls: options.tls }, this));
  }

  /** The spills an earlier process left in `spillDir`: the paths to give `resume`. */
  static async findSpills(spillDir: string): Promise<string[]> {
    const names = await readdir(spillDir).catch((err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") return [] as string[];
      throw err;
    });
    return names.filter((n) => n.endsWith(META_SUFFIX)).map((n) => join(spillDir, n));
  }

  /**
   * Takes over the spill an earlier process left (`metaPath`, from
   * findSpills): its channels as they were, ended (that process's job is
   * gone with it), shipping at once. Call finish() to wait for the end.
   */
  static async resume(metaPath: string, options: ShippingOptions): Promise<LogShipper> {
    const meta = JSON.parse(await readFile(metaPath, "utf8")) as ShipperMeta;
    if (meta.version !== 1) throw new Error(`${metaPath}: unknown spill version ${String(meta.version)}`);
    const spillDir = dirname(metaPath);
    const shipper = new LogShipper({
      ...options,
      jobId: meta.jobId,
      attempt: meta.attempt,
      writer: meta.writer,
      sharedAttempt: meta.sharedAttempt,
      servers: meta.servers.map((url) => ({ url })),
      token: meta.token,
      tokenExpireMs: meta.tokenExpireMs ?? undefined,
      spillDir,
    });
    Object.assign(shipper.lost, meta.lost);
    shipper.dirReady = Promise.resolve();
    for (const name of meta.channels) {
      const spill = await Spill.open(shipper.spillOptions(name, Promise.resolve()), (what) =>
        shipper.logger.warn({ channel: name, what }, "log spill damaged"),
      );
      shipper.channels.set(name, new ShipperChannel(name, shipper, spill));
    }
    shipper.ended = true;
    shipper.sealed = true;
    shipper.ending = shipper.saveMeta();
    await shipper.ending;
    shipper.logger.info({ channels: meta.channels, servers: meta.servers }, "resuming a job log left in the spill");
    for (const s of shipper.senders) s.start();
    shipper.changed();
    return shipper;
  }

  private spillOptions(channel: string, ready: Promise<void>) {
    return {
      dir: this.options.spillDir,
      ready,
      prefix: `${this.prefix}-${channel}`,
      fileBytes: this.options.spillFileBytes ?? 4 << 20,
      cache: this.cache,
      budget: this.budget,
      syncIntervalMs: this.options.syncIntervalMs ?? 1000,
      onSyncError: (err: unknown) => this.logger.warn({ err, channel }, "log spill sync failed"),
    };
  }

  get metaPath(): string {
    return join(this.options.spillDir, `${this.prefix}${META_SUFFIX}`);
  }

  token(): string {
    return this.tokenValue;
  }

  /** When the current token expires (ms since the epoch), if known. */
  get tokenExpireMs(): number | undefined {
    return this.tokenExpire;
  }

  /** Takes a fresh log:write token (and keeps it beside the spill). */
  renewToken(token: string, expireMs?: number): void {
    if (token === "" || (token === this.tokenValue && expireMs === this.tokenExpire)) return;
    this.tokenValue = token;
    this.tokenExpire = expireMs;
    if (this.dirReady) void this.saveMeta();
  }

  /** A server refused the token. */
  tokenRefused(): void {
    this.options.onTokenRefused?.();
  }

  capExempt(channel: string): boolean {
    return this.options.capExempt?.(channel) ?? false;
  }

  /** The channel `name` (`console`, `stdout`, `stderr`, `supervisor`...), created on first use. */
  channel(name: string): ShipperChannel {
    let channel = this.channels.get(name);
    if (!channel) {
      if (!CHANNEL_NAME.test(name)) throw new Error(`log channel name ${JSON.stringify(name)} must match [a-z][a-z0-9_-]{0,31}`);
      if (this.ended) throw new Error(`log shipper of job ${this.jobId} is finished`);
      this.dirReady ??= mkdir(this.options.spillDir, { recursive: true }).then(() => undefined);
      // The channel is named beside the spill before its first file exists.
      channel = new ShipperChannel(name, this, new Spill(this.spillOptions(name, this.saveMeta())));
      this.channels.set(name, channel);
      for (const s of this.senders) s.start();
    }
    return channel;
  }

  channelList(): ShipperChannel[] {
    return [...this.channels.values()];
  }

  channelOf(name: string): ShipperChannel | undefined {
    return this.channels.get(name);
  }

  /** Something changed (a frame spilled, an ack, a connection): send, drop, wake waiters. */
  changed(): void {
    for (const s of this.senders) s.pump();
    this.changes.notify();
    void this.drop();
  }

  /**
   * Room the cap must keep free beyond a frame: none normally; once it
   * dropped output, a quarter of the cap, so that output resumes once the
   * servers caught up a good deal, not frame by frame (small frames slipping
   * into what a large one left would make many holes).
   */
  capSpare(): number {
    return this.capEpisode ? Math.floor(this.budget.capBytes / 4) : 0;
  }

  /** The cap refused a frame of `channel`. */
  capDropped(channel: string, bytes: number): void {
    this.lost.cap += bytes;
    if (!this.capEpisode) {
      this.capEpisode = { channel, bytes: 0 };
      this.logger.warn({ channel, capBytes: this.budget.capBytes, usedBytes: this.budget.usedBytes }, "log spill cap reached: dropping output");
      this.options.onLoss?.({ kind: "dropping", channel, bytes: 0, totalLost: this.lost.cap + this.lost.failed });
      void this.saveMeta();
    }
    this.capEpisode.bytes += bytes;
  }

  /** The cap took a frame again. */
  capAdmitted(channel: string): void {
    const episode = this.capEpisode;
    if (!episode || this.capExempt(channel)) return;
    this.capEpisode = undefined;
    this.logger.warn({ channel: episode.channel, bytes: episode.bytes }, "log spill has room again");
    this.options.onLoss?.({ kind: "resumed", channel: episode.channel, bytes: episode.bytes, totalLost: this.lost.cap + this.lost.failed });
    void this.saveMeta();
  }

  spillFailed(channel: string, bytes: number, err: unknown): void {
    this.lost.failed += bytes;
    this.lost.failure ||= err instanceof Error ? err.message : String(err);
    this.logger.error({ err, channel }, "log spill write failed");
    void this.saveMeta();
    this.changed();
  }

  /** Drops from the spill what every server acknowledged. */
  private async drop(): Promise<void> {
    if (this.dropping || this.stopped) return;
    this.dropping = true;
    try {
      for (const channel of this.channels.values()) {
        const through = Math.min(...this.senders.map((s) => s.doneThrough(channel)));
        await channel.spill.dropThrough(through);
      }
    } catch (err) {
      this.logger.warn({ err }, "log spill cleanup failed");
    } finally {
      this.dropping = false;
    }
  }

  /** Writes what a later process needs to resume, atomically; coalesces calls made while a write is queued. */
  private saveMeta(): Promise<void> {
    this.metaQueued ??= this.metaChain.then(async () => {
      this.metaQueued = undefined;
      await this.dirReady;
      const meta: ShipperMeta = {
        version: 1,
        jobId: this.jobId,
        attempt: this.attempt,
        writer: this.writer,
        sharedAttempt: this.sharedAttempt,
        servers: this.senders.map((s) => s.url),
        token: this.tokenValue,
        tokenExpireMs: this.tokenExpire ?? null,
        channels: [...this.channels.keys()],
        ended: this.ended,
        lost: { ...this.lost },
      };
      await writeAtomic(this.metaPath, JSON.stringify(meta));
    });
    const queued = this.metaQueued;
    this.metaChain = queued.catch((err: unknown) => this.logger.error({ err }, "cannot save the log spill's description"));
    return queued;
  }

  /**
   * No more output (idempotent): flushes every channel into the spill and
   * records the end beside it; the servers' channels are closed once they
   * hold everything.
   */
  end(): Promise<void> {
    this.ending ??= (async () => {
      this.ended = true;
      for (const channel of this.channels.values()) channel.flush();
      for (const channel of this.channels.values()) await channel.spilled();
      this.sealed = true;
      if (this.dirReady) await this.saveMeta();
      for (const s of this.senders) s.start();
      this.changed();
    })();
    return this.ending;
  }

  /** Where the log stands now. */
  report(): ShipperReport {
    const servers = this.senders.map((s): ServerReport => {
      const ackedSeq: Record<string, number> = {};
      for (const c of this.channels.values()) ackedSeq[c.name] = s.acked.get(c.name) ?? 0;
      const complete = s.finished && s.refused.size === 0;
      const problem = complete ? undefined : s.refused.size > 0 ? [...s.refused.values()][0].why : (s.lastProblem ?? "not every frame is acknowledged yet");
      return { url: s.url, complete, ackedSeq, ...(problem === undefined ? {} : { problem }) };
    });
    const refused = this.senders.find((s) => s.refused.size > 0);
    const bytesLost = this.lost.cap + this.lost.failed + Math.max(0, ...this.senders.map((s) => s.refusedBytes()));
    const settled = this.senders.every((s) => s.finished);
    const complete = settled && bytesLost === 0 && refused === undefined;
    const status = bytesLost > 0 || refused ? "incomplete" : complete ? "complete" : "shipping";
    let problem: string | undefined;
    if (this.lost.cap > 0) problem = "spill cap reached";
    else if (this.lost.failed > 0) problem = `spill write failed: ${this.lost.failure}`;
    else if (refused) problem = `log server ${refused.url} refused the log: ${[...refused.refused.values()][0].why}`;
    else if (!complete) {
      const waiting = this.senders.find((s) => !s.finished);
      if (waiting) problem = `waiting for log server ${waiting.url}${waiting.lastProblem ? ` (${waiting.lastProblem})` : ""}`;
    }
    return { status, complete, settled, bytesLost, ...(problem === undefined ? {} : { problem }), servers };
  }

  /** Ends the log, then waits up to `timeoutMs` for it to settle; the report as it stands then. */
  async settle(timeoutMs: number): Promise<ShipperReport> {
    await this.end();
    const deadline = Date.now() + timeoutMs;
    while (!this.report().settled && !this.stopped && Date.now() < deadline) {
      await this.changes.wait({ timeoutMs: Math.min(1000, Math.max(1, deadline - Date.now())) });
    }
    return this.report();
  }

  /**
   * Ends the log, waits until every server holds everything it ever will and
   * closed its channels, removes the spill and reports (idempotent). With
   * `finishTimeoutMs`, answers by then with the report as it stands, while
   * the shipping goes on. After close(), answers at once, the spill kept.
   */
  finish(): Promise<ShipperReport> {
    this.shipped ??= (async () => {
      await this.end();
      while (!this.report().settled && !this.stopped) await this.changes.wait({ timeoutMs: 1000 });
      const report = this.report();
      if (!report.settled) return report;
      await this.options.onShipped?.(report);
      await this.stopSenders();
      for (const channel of this.channels.values()) await channel.spill.destroy();
      await this.metaChain;
      await rm(this.metaPath, { force: true });
      this.logger[report.complete ? "info" : "warn"](
        { bytesLost: report.bytesLost, problem: report.problem, servers: report.servers.map((r) => ({ url: r.url, complete: r.complete, problem: r.problem })) },
        report.complete ? "job log shipped" : "job log incomplete on some log servers",
      );
      return report;
    })();
    const bound = this.options.finishTimeoutMs;
    if (bound === undefined) return this.shipped;
    return Promise.race([this.shipped, this.settle(bound)]);
  }

  /** Stops shipping now (idempotent): flushes what is buffered, keeps the spill on disk for `resume`. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      for (const channel of this.channels.values()) channel.flush();
      for (const channel of this.channels.values()) await channel.spilled();
      await this.stopSenders();
      for (const channel of this.channels.values()) await channel.spill.close();
      await this.metaChain;
    })();
    return this.closing;
  }

  private async stopSenders(): Promise<void> {
    this.stopped = true;
    this.changes.notify();
    await Promise.all(this.senders.map((s) => s.stop()));
    this.senders.forEach((s) => s.release());
  }
}

function nowMicros(): number {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

function timestampFromMicros(micros: number) {
  const seconds = Math.floor(micros / 1e6);
  return { seconds: BigInt(seconds), nanos: Math.round(micros - seconds * 1e6) * 1000 };
}

function safe(s: string): string {
  return s.replace(/[^A-Za-z0-9_.-]/g, "_");
}
