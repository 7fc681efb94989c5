/**
 * Reading a job's logs from its log servers (LogService.Read with a log:read
 * token from JobService.GetJobLogAccess): one reader per channel, failing
 * over to the next log server and resuming from the next seq, asking for a
 * fresh token when one expires. Followed channels are printed as frames
 * arrive; a finished log is merged across channels by capture time.
 */
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { JobService } from "../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LogService, ReadEndReason } from "../gen/treadmill/log/v1/log_service_pb.js";
import { STREAM_WINDOW, WideSessionManager } from "../lib/grpc/client.js";
import { clientTransport } from "../lib/grpc/transport.js";
import type { ClientTls } from "../lib/grpc/trust.js";
import { backoff, classify, sleep } from "../lib/retry.js";
import { msOf } from "./format.js";

export const DEFAULT_CHANNELS = ["console", "stdout", "stderr"];

export interface LogLine {
  channel: string;
  attempt: number;
  seq: number;
  captureMs: number;
  data: Uint8Array;
}

interface Access {
  urls: string[];
  token: string;
}

/** Log access for one job, refreshed on demand; transports per log server. */
export class JobLogAccess {
  #access: Promise<Access> | undefined;
  readonly #transports = new Map<string, Transport>();
  readonly #sessions: WideSessionManager[] = [];

  constructor(
    private readonly jobs: Client<typeof JobService>,
    readonly jobId: string,
    /** TLS options for https log servers (the context's CA). */
    private readonly tls?: ClientTls,
  ) {}

  access(refresh = false): Promise<Access> {
    if (refresh || this.#access === undefined) {
      const pending = this.jobs
        .getJobLogAccess({ jobId: this.jobId }, { timeoutMs: 15_000 })
        .then((r) => ({ urls: r.logServerUrls, token: r.readToken?.token ?? "" }));
      pending.catch(() => {
        if (this.#access === pending) this.#access = undefined;
      });
      this.#access = pending;
    }
    return this.#access;
  }

  client(url: string): Client<typeof LogService> {
    let transport = this.#transports.get(url);
    if (transport === undefined) {
      // Followed logs of many channels share the connection: wide windows.
      const sessionManager = new WideSessionManager(url, undefined, { ...this.tls, settings: { initialWindowSize: STREAM_WINDOW } });
      this.#sessions.push(sessionManager);
      transport = clientTransport({ baseUrl: url, sessionManager, token: () => this.#token });
      this.#transports.set(url, transport);
    }
    return createClient(LogService, transport);
  }

  #token = "";
  set token(value: string) {
    this.#token = value;
  }

  /** Closes the connections to the log servers. */
  close(): void {
    for (const session of this.#sessions.splice(0)) session.abort();
    this.#transports.clear();
  }
}

export interface ReadOptions {
  channel: string;
  /** 0: the latest attempt. */
  attempt: number;
  follow: boolean;
  /** Only frames captured at or after this time (ms since the epoch). */
  sinceMs?: number;
  signal: AbortSignal;
}

/**
 * The frames of one channel, in order. Without follow it ends at the end of
 * what is stored (nothing for a channel that does not exist); with follow it
 * ends when the channel is closed, or on abort. Fails over between the job's
 * log servers and resumes from the next seq. A pull, not keepStreaming: a
 * push of each message cannot hold a slow reader's backpressure (a big log piped on).
 */
export async function* readChannel(logs: JobLogAccess, options: ReadOptions): AsyncGenerator<LogLine> {
  const { channel, signal } = options;
  let attempt = options.attempt;
  let nextSeq = 1n;
  let server = 0;
  let failures = 0;
  let refreshed = false;
  const delays = backoff({ initialMs: 200, maxMs: 5000 });
  while (!signal.aborted) {
    const access = await logs.access(refreshed);
    refreshed = false;
    logs.token = access.token;
    if (access.urls.length === 0) return;
    const url = access.urls[server % access.urls.length];
    try {
      for await (const message of logs.client(url).read(
        { jobId: logs.jobId, attempt, channel, start: { case: "fromSeq", value: nextSeq }, follow: options.follow },
        { signal },
      )) {
        failures = 0;
        if (message.payload.case === "frame") {
          const frame = message.payload.value;
          attempt = frame.attempt;
          nextSeq = frame.seq + 1n;
          const captureMs = msOf(frame.captureTime) ?? 0;
          if (options.sinceMs !== undefined && captureMs < options.sinceMs) continue;
          yield { channel, attempt: frame.attempt, seq: Number(frame.seq), captureMs, data: frame.data };
        } else if (message.payload.case === "end") {
          const reason = message.payload.value.reason;
          if (reason !== ReadEndReason.UNSPECIFIED) return;
        }
      }
      // The stream ended without an `end` message: the server went away; resume.
      if (!options.follow) return;
    } catch (err) {
      if (signal.aborted) return;
      const error = ConnectError.from(err);
      if (error.code === Code.NotFound && !options.follow) return;
      if ((error.code === Code.Unauthenticated || error.code === Code.PermissionDenied) && !refreshed) {
        // The read token expired: ask for a new one, once per failure.
        refreshed = true;
        continue;
      }
      if (classify(error) === "permanent") throw error;
      server++;
      failures++;
      if (failures >= access.urls.length) {
        if (failures > access.urls.length * 5) throw error;
        await sleep(delays.next().value, signal).catch(() => undefined);
      }
    }
  }
}

/** Merges finished channels by capture time (then channel order), streaming. */
export async function* mergeByTime(sources: AsyncGenerator<LogLine>[]): AsyncGenerator<LogLine> {
  const heads = await Promise.all(sources.map((s) => s.next()));
  while (true) {
    let pick = -1;
    for (let i = 0; i < heads.length; i++) {
      const head = heads[i];
      if (head.done) continue;
      if (pick < 0 || head.value.captureMs < (heads[pick].value as LogLine).captureMs) pick = i;
    }
    if (pick < 0) return;
    yield heads[pick].value as LogLine;
    heads[pick] = await sources[pick].next();
  }
}

/** Where each channel's bytes go. */
export interface LogSink {
  write(line: LogLine): void;
}

/**
 * Followers of a job's channels, started per attempt. `finish()` is called
 * once the job is finalized: readers of channels that exist run to their
 * close (bounded by `graceMs`), readers waiting for channels that never
 * appeared stop at once.
 */
export class LogFollowers {
  readonly #readers: { channel: string; attempt: number; abort: AbortController; done: Promise<void> }[] = [];
  readonly #started = new Set<number>();
  #error: unknown;

  constructor(
    private readonly logs: JobLogAccess,
    private readonly channels: string[],
    private readonly sink: LogSink,
    private readonly options: { sinceMs?: number; signal: AbortSignal },
  ) {}

  /** Starts following `attempt` (once per attempt). */
  follow(attempt: number): void {
    if (this.#started.has(attempt)) return;
    this.#started.add(attempt);
    for (const channel of this.channels) {
      const abort = new AbortController();
      const signal = AbortSignal.any([abort.signal, this.options.signal]);
      const done = (async () => {
        try {
          for await (const line of readChannel(this.logs, { channel, attempt, follow: true, sinceMs: this.options.sinceMs, signal })) {
            this.sink.write(line);
          }
        } catch (err) {
          if (!signal.aborted) this.#error ??= err;
        }
      })();
      this.#readers.push({ channel, attempt, abort, done });
    }
  }

  /** Ends following after the job ended; resolves when every reader stopped. */
  async finish(graceMs: number): Promise<void> {
    const attempts = [...this.#started];
    let existing: Set<string> | undefined;
    try {
      const access = await this.logs.access();
      this.logs.token = access.token;
      for (const url of access.urls) {
        try {
          const listed = await this.logs.client(url).listChannels({ jobId: this.logs.jobId }, { timeoutMs: 10_000 });
          existing = new Set(listed.channels.map((c) => `${c.attempt}/${c.channel}`));
          break;
        } catch {
          // Try the next log server.
        }
      }
    } catch {
      // No access: stop every reader after the grace period.
    }
    for (const reader of this.#readers) {
      if (attempts.length > 0 && existing !== undefined && !existing.has(`${reader.attempt}/${reader.channel}`)) reader.abort.abort();
    }
    const all = Promise.all(this.#readers.map((r) => r.done));
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<void>((resolve) => (timer = setTimeout(resolve, graceMs)));
    await Promise.race([all, deadline]);
    clearTimeout(timer);
    for (const reader of this.#readers) reader.abort.abort();
    await all;
  }

  /** Stops every reader now. */
  async stop(): Promise<void> {
    for (const reader of this.#readers) reader.abort.abort();
    await Promise.all(this.#readers.map((r) => r.done));
  }

  /** The first non-abort error a reader hit, if any. */
  get error(): unknown {
    return this.#error;
  }
}
