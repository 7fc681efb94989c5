import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";

/**
 * Exponential backoff with jitter, and a retry loop that stops on abort.
 *
 * Jitter spreads the retries of many clients that failed together (a
 * coordinator restart drops every supervisor at once), so they do not come back
 * in lockstep. "full": a uniform delay in [0, min(maxMs, initialMs * factor^n)].
 * "decorrelated": a uniform delay in [initialMs, min(maxMs, previous * factor)],
 * so each delay grows from the last one actually used. "none" is for tests and
 * for callers that add their own randomness.
 */
export interface BackoffOptions {
  /** The base delay: the first delay's ceiling (full jitter) or every delay's floor (decorrelated). */
  initialMs: number;
  /** No delay exceeds this. */
  maxMs: number;
  /** Growth per attempt; default 2. */
  factor?: number;
  /** Default "full". */
  jitter?: "full" | "decorrelated" | "none";
  /** Uniform in [0, 1); default Math.random. Inject for deterministic tests. */
  random?: () => number;
}

/** An endless sequence of delays in milliseconds (integers, within [0, maxMs]). */
export function* backoff(options: BackoffOptions): Generator<number, never, void> {
  const { initialMs, maxMs } = options;
  const factor = options.factor ?? 2;
  const jitter = options.jitter ?? "full";
  const random = options.random ?? Math.random;
  if (!(initialMs >= 0) || !(maxMs >= initialMs) || !(factor >= 1)) {
    throw new RangeError("backoff needs 0 <= initialMs <= maxMs and factor >= 1");
  }
  let ceiling = initialMs;
  let previous = initialMs;
  while (true) {
    let delay: number;
    if (jitter === "decorrelated") {
      const upper = Math.min(maxMs, Math.max(initialMs, previous * factor));
      delay = initialMs + random() * (upper - initialMs);
      previous = delay;
    } else {
      delay = jitter === "full" ? random() * ceiling : ceiling;
      ceiling = Math.min(maxMs, ceiling * factor);
    }
    yield Math.min(maxMs, Math.round(delay));
  }
}

/** Resolves after `ms`, or rejects with the signal's reason as soon as it aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

export interface RetryOptions extends BackoffOptions {
  /** Stops the loop: the pending sleep rejects with the signal's reason. */
  signal?: AbortSignal;
  /** Whether an error is worth another attempt; default: `classify`'s "retryable". */
  isRetryable?: (err: unknown) => boolean;
  /** Give up after this many attempts (the first one counts); default unlimited. */
  maxAttempts?: number;
  /** Called before each sleep, e.g. to log. `attempt` is the one that failed (1-based). */
  onRetry?: (err: unknown, attempt: number, delayMs: number) => void;
}

/**
 * Calls `fn` until it succeeds, a failure is not retryable, the attempts run
 * out (the last error is thrown) or the signal aborts (the call's own error
 * when it aborts during a call, the signal's reason when during a sleep).
 */
export async function retry<T>(
  fn: (attempt: number, signal: AbortSignal | undefined) => Promise<T>,
  options: RetryOptions,
): Promise<T> {
  const { signal, isRetryable = (err: unknown) => classify(err) === "retryable", maxAttempts = Infinity, onRetry } = options;
  const delays = backoff(options);
  for (let attempt = 1; ; attempt++) {
    signal?.throwIfAborted();
    try {
      return await fn(attempt, signal);
    } catch (err) {
      if (signal?.aborted || attempt >= maxAttempts || !isRetryable(err)) throw err;
      const delay = delays.next().value;
      onRetry?.(err, attempt, delay);
      await sleep(delay, signal);
    }
  }
}

/**
 * What a failure says about trying again (DESIGN.md §11): "retryable" when
 * the same call may succeed later, "permanent" when it will not until someone
 * changes the request, the credential or the flags.
 */
export type Verdict = "retryable" | "permanent";

/**
 * Retryable: `Unavailable` (shutting down, a dependency down),
 * `DeadlineExceeded`, `Aborted` (a lost race, a superseded stream), and what
 * a broken connection surfaces as: `Unknown` (any error that is not a
 * ConnectError, network errors included), `Internal` and `Canceled` (an
 * HTTP/2 reset from the far side). A caller that cancels its own call checks
 * its signal first: its own `Canceled` is no failure. A stream the server
 * refused before processing it is retryable whatever its code.
 */
const RETRYABLE_CODES: ReadonlySet<Code> = new Set([
  Code.Unavailable,
  Code.DeadlineExceeded,
  Code.Aborted,
  Code.Unknown,
  Code.Internal,
  Code.Canceled,
]);

/**
 * The one retryable/permanent split of the tree. Permanent: the request
 * (`InvalidArgument`, `NotFound`, `AlreadyExists`, `FailedPrecondition`,
 * `OutOfRange`), the credential (`Unauthenticated`, `PermissionDenied`), a
 * limit or a full store (`ResourceExhausted`), a server that lacks the call
 * (`Unimplemented`) and `DataLoss`. Pure: no I/O, no clock.
 */
export function classify(err: unknown): Verdict {
  if (isRefusedStream(err)) return "retryable";
  return RETRYABLE_CODES.has(ConnectError.from(err).code) ? "retryable" : "permanent";
}

/** The error codes of a connection that failed or went away (Node's errno names). */
export const NETWORK_ERRNO: ReadonlySet<string> = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EPIPE",
  "EAI_AGAIN",
  "ENOTFOUND",
  "EHOSTUNREACH",
  "ENETUNREACH",
]);

/** Of those, the ones that say no connection was opened: a request never left. */
const CONNECT_ERRNO: ReadonlySet<string> = new Set(["ECONNREFUSED", "EAI_AGAIN", "ENOTFOUND", "EHOSTUNREACH", "ENETUNREACH"]);

/**
 * Whether `err` (or a cause of it) is a connection that failed, however the
 * transport reported it: by errno code, or by its name in the message (the
 * Connect transports fold the errno into the text).
 */
export function isNetworkError(err: unknown): boolean {
  return hasErrno(err, NETWORK_ERRNO);
}

/**
 * Whether `err` says the connection could not be opened (refused, a name
 * that does not resolve, no route): the call never reached a server, so
 * sending it elsewhere cannot run it twice.
 */
export function isConnectFailure(err: unknown): boolean {
  // A server's answer (a ConnectError without a cause) is none, whatever its text says.
  if (err instanceof ConnectError && err.cause === undefined) return false;
  return hasErrno(err, CONNECT_ERRNO);
}

function hasErrno(err: unknown, names: ReadonlySet<string>): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && names.has(code)) return true;
    const message = e instanceof ConnectError ? e.rawMessage : e.message;
    if ((message.match(/\bE[A-Z_]+\b/g) ?? []).some((word) => names.has(word))) return true;
  }
  return false;
}

/**
 * Whether the server refused the stream before processing it (HTTP/2
 * REFUSED_STREAM): a server closing an idle or draining connection refuses a
 * call that crossed its GOAWAY. Such a call is safe to send again, on a new
 * connection, whatever the method.
 */
export function isRefusedStream(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    if (e.message.includes("REFUSED_STREAM")) return true;
  }
  return false;
}

/**
 * Sends a unary call again when the server refused its stream (at most twice
 * more): the race between a call and the server's idle close, which the
 * HTTP/2 servers here cannot close from their side. Streaming calls are left
 * alone: their requests cannot be replayed.
 */
export const refusedStreamRetry: Interceptor = (next) => async (req) => {
  if (req.stream) return next(req);
  for (let attempt = 1; ; attempt++) {
    try {
      return await next(req);
    } catch (err) {
      if (attempt >= 3 || !isRefusedStream(err) || req.signal.aborted) throw err;
    }
  }
};

/** One stream of `keepStreaming`, as its callbacks see it. */
export interface StreamAttempt {
  /** 1 for the first stream, then one more for each reopening. */
  readonly number: number;
  /** The loop's signal: pass it to the call. */
  readonly signal: AbortSignal;
  /** Says the stream proved good (a welcome came): the backoff starts afresh and failures count as new. */
  healthy(): void;
}

/** What `onError` decides: "retry" with backoff whatever the verdict, "stop", or a delay of its own (0: at once). */
export type FailureDecision = "retry" | "stop" | { retryInMs: number } | undefined;

export interface KeepStreamingOptions<T> {
  /**
   * Opens one stream: its messages (an async generator may set up before its
   * call and clean up in `finally`), or a promise of its end when the caller
   * reads the stream itself.
   */
  open: (attempt: StreamAttempt) => AsyncIterable<T> | Promise<void>;
  /** Each message, in order; a throw fails the stream. */
  onMessage?: (message: T, attempt: StreamAttempt) => void | Promise<void>;
  backoff: BackoffOptions;
  /** Stops the loop: a pending sleep ends at once; the stream must honour it too. */
  signal: AbortSignal;
  /** A stream ended without error; "stop" ends the loop (it resolves). */
  onEnd?: (attempt: StreamAttempt) => "stop" | undefined | void;
  /**
   * A stream failed (not by the signal). `verdict` is `classify(err)`;
   * `repeated` tells the same failure (code and message) as the last one since
   * a healthy stream, for logs that want the first line and the change only.
   * Returning nothing follows the verdict: retry with backoff, or stop.
   */
  onError?: (err: unknown, failure: { verdict: Verdict; repeated: boolean; attempt: StreamAttempt }) => FailureDecision | void;
  /** Called before each sleep with its delay (a state change, a metric). */
  onBackoff?: (delayMs: number) => void;
}

/**
 * Keeps a stream open: opens it, hands each message on, and reopens it after
 * it ends or fails, with backoff and jitter, until the signal aborts (it
 * resolves), `onEnd` says "stop" (it resolves) or a failure stops it (it
 * rejects with that failure). A stream marked healthy starts the backoff
 * afresh, so a long-lived stream that breaks is reopened after the first,
 * short delay, while a peer that keeps failing is tried less and less often,
 * up to `maxMs`.
 */
export async function keepStreaming<T>(options: KeepStreamingOptions<T>): Promise<void> {
  const { signal } = options;
  let delays = backoff(options.backoff);
  let lastFailure = "";
  for (let number = 1; !signal.aborted; number++) {
    const attempt: StreamAttempt = {
      number,
      signal,
      healthy() {
        delays = backoff(options.backoff);
        lastFailure = "";
      },
    };
    let delay: number | undefined;
    try {
      const stream = options.open(attempt);
      if (stream instanceof Promise) await stream;
      else for await (const message of stream) await options.onMessage?.(message, attempt);
      if (signal.aborted) return;
      if (options.onEnd?.(attempt) === "stop") return;
    } catch (err) {
      if (signal.aborted) return;
      const verdict = classify(err);
      const error = ConnectError.from(err);
      const failure = `${error.code}: ${error.rawMessage}`;
      const repeated = failure === lastFailure;
      lastFailure = failure;
      const decision = options.onError?.(err, { verdict, repeated, attempt });
      if (decision === "stop" || (decision === undefined && verdict === "permanent")) throw err;
      if (typeof decision === "object") delay = decision.retryInMs;
    }
    delay ??= delays.next().value;
    options.onBackoff?.(delay);
    if (delay > 0) await sleep(delay, signal).catch(() => undefined);
  }
}
