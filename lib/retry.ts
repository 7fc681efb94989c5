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
  /** Whether an error is worth another attempt; default: every error. */
  isRetryable?: (err: unknown) => boolean;
  /** Give up after this many attempts (the first one counts); default unlimited. */
  maxAttempts?: number;
  /** Called before each sleep, e.g. to log. `attempt` is the one that failed (1-based). */
  onRetry?: (err: unknown, attempt: number, delayMs: number) => void;
}

/**
 * Calls `fn` until it succeeds, a failure is not retryable, the attempts run
 * out (the last error is thrown) or the signal aborts (its reason is thrown).
 */
export async function retry<T>(
  fn: (attempt: number, signal: AbortSignal | undefined) => Promise<T>,
  options: RetryOptions,
): Promise<T> {
  const { signal, isRetryable = () => true, maxAttempts = Infinity, onRetry } = options;
  const delays = backoff(options);
  for (let attempt = 1; ; attempt++) {
    signal?.throwIfAborted();
    try {
      return await fn(attempt, signal);
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      if (attempt >= maxAttempts || !isRetryable(err)) throw err;
      const delay = delays.next().value;
      onRetry?.(err, attempt, delay);
      await sleep(delay, signal);
    }
  }
}

const TRANSIENT_CODES = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.Aborted]);
const TRANSIENT_ERRNO = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH"]);

/**
 * A default for `isRetryable` on RPCs: the codes DESIGN.md calls retryable
 * (Unavailable, DeadlineExceeded, Aborted) and network errors.
 */
export function isTransientError(err: unknown): boolean {
  if (err instanceof ConnectError) return TRANSIENT_CODES.has(err.code) || isRefusedStream(err);
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && TRANSIENT_ERRNO.has(code);
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
