import { describe, it, expect, jest, afterEach } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { backoff, classify, isNetworkError, keepStreaming, retry, sleep, type StreamAttempt, type Verdict } from "../../lib/retry.js";

/** A deterministic sequence in [0, 1). */
function sequence(...values: number[]): () => number {
  let i = 0;
  return () => values[i++ % values.length];
}

function take(iterator: Iterator<number>, n: number): number[] {
  return Array.from({ length: n }, () => iterator.next().value as number);
}

afterEach(() => {
  jest.useRealTimers();
});

describe("backoff", () => {
  it("grows by the factor up to the maximum without jitter", () => {
    expect(take(backoff({ initialMs: 100, maxMs: 1000, jitter: "none" }), 6)).toEqual([100, 200, 400, 800, 1000, 1000]);
    expect(take(backoff({ initialMs: 100, maxMs: 10_000, factor: 3, jitter: "none" }), 3)).toEqual([100, 300, 900]);
  });

  it("keeps full jitter within [0, the exponential ceiling]", () => {
    expect(take(backoff({ initialMs: 100, maxMs: 1000, random: sequence(0.5) }), 5)).toEqual([50, 100, 200, 400, 500]);
    const delays = take(backoff({ initialMs: 100, maxMs: 1000 }), 200);
    delays.forEach((d, i) => {
      expect(d).toBeGreaterThanOrEqual(0);
      expect(d).toBeLessThanOrEqual(Math.min(1000, 100 * 2 ** i));
    });
  });

  it("keeps decorrelated jitter within [initial, min(max, previous * factor)]", () => {
    expect(take(backoff({ initialMs: 100, maxMs: 1000, jitter: "decorrelated", random: sequence(0.999999) }), 5)).toEqual([
      200, 400, 800, 1000, 1000,
    ]);
    expect(take(backoff({ initialMs: 100, maxMs: 1000, jitter: "decorrelated", random: sequence(0) }), 3)).toEqual([100, 100, 100]);
    let previous = 100;
    for (const d of take(backoff({ initialMs: 100, maxMs: 5000, jitter: "decorrelated", factor: 3 }), 200)) {
      expect(d).toBeGreaterThanOrEqual(100);
      expect(d).toBeLessThanOrEqual(Math.min(5000, Math.max(100, previous * 3)) + 1);
      previous = d;
    }
  });

  it("rejects nonsensical bounds", () => {
    expect(() => backoff({ initialMs: 10, maxMs: 5 }).next()).toThrow(RangeError);
  });
});

describe("sleep", () => {
  it("resolves after the delay", async () => {
    jest.useFakeTimers();
    let done = false;
    const p = sleep(1000).then(() => (done = true));
    await jest.advanceTimersByTimeAsync(999);
    expect(done).toBe(false);
    await jest.advanceTimersByTimeAsync(1);
    await p;
    expect(done).toBe(true);
  });

  it("rejects with the signal's reason at once when aborted", async () => {
    jest.useFakeTimers();
    const controller = new AbortController();
    const p = sleep(60_000, controller.signal);
    controller.abort(new Error("shutting down"));
    await expect(p).rejects.toThrow("shutting down");
    expect(jest.getTimerCount()).toBe(0);
    await expect(sleep(10, controller.signal)).rejects.toThrow("shutting down");
  });
});

describe("retry", () => {
  it("retries until success, sleeping the backoff delays", async () => {
    jest.useFakeTimers();
    const calls: number[] = [];
    const retries: Array<[number, number]> = [];
    const p = retry(
      async (attempt) => {
        calls.push(attempt);
        if (attempt < 3) throw new Error(`fail ${attempt}`);
        return "ok";
      },
      { initialMs: 100, maxMs: 1000, jitter: "none", onRetry: (_err, attempt, delay) => retries.push([attempt, delay]) },
    );
    await jest.advanceTimersByTimeAsync(99);
    expect(calls).toEqual([1]);
    await jest.advanceTimersByTimeAsync(1);
    expect(calls).toEqual([1, 2]);
    await jest.advanceTimersByTimeAsync(200);
    await expect(p).resolves.toBe("ok");
    expect(retries).toEqual([
      [1, 100],
      [2, 200],
    ]);
  });

  it("stops at the first error that is not retryable", async () => {
    let calls = 0;
    const err = new ConnectError("bad input", Code.InvalidArgument);
    await expect(
      retry(
        async () => {
          calls++;
          throw err;
        },
        { initialMs: 1, maxMs: 1 },
      ),
    ).rejects.toBe(err);
    expect(calls).toBe(1);
  });

  it("gives up after maxAttempts with the last error", async () => {
    jest.useFakeTimers();
    let calls = 0;
    const p = retry(
      async () => {
        calls++;
        throw new Error(`fail ${calls}`);
      },
      { initialMs: 10, maxMs: 10, jitter: "none", maxAttempts: 3 },
    );
    const assertion = expect(p).rejects.toThrow("fail 3");
    await jest.advanceTimersByTimeAsync(100);
    await assertion;
    expect(calls).toBe(3);
  });

  it("stops sleeping as soon as the signal aborts", async () => {
    jest.useFakeTimers();
    const controller = new AbortController();
    let calls = 0;
    const p = retry(
      async () => {
        calls++;
        throw new ConnectError("down", Code.Unavailable);
      },
      { initialMs: 60_000, maxMs: 60_000, jitter: "none", signal: controller.signal },
    );
    const assertion = expect(p).rejects.toThrow("stop now");
    await jest.advanceTimersByTimeAsync(0);
    controller.abort(new Error("stop now"));
    await assertion;
    expect(calls).toBe(1);
    expect(jest.getTimerCount()).toBe(0);
  });

  it("does not call fn when the signal is already aborted", async () => {
    const controller = new AbortController();
    controller.abort(new Error("already"));
    const fn = jest.fn(async () => "x");
    await expect(retry(fn, { initialMs: 1, maxMs: 1, signal: controller.signal })).rejects.toThrow("already");
    expect(fn).not.toHaveBeenCalled();
  });
});

describe("classify", () => {
  const refused = new ConnectError("stream closed", Code.PermissionDenied, undefined, undefined, new Error("Stream closed with error code NGHTTP2_REFUSED_STREAM"));
  const table: Array<{ what: string; err: unknown; verdict: Verdict }> = [
    { what: "unavailable (shutting down, a dependency down)", err: new ConnectError("x", Code.Unavailable), verdict: "retryable" },
    { what: "a passed deadline", err: new ConnectError("x", Code.DeadlineExceeded), verdict: "retryable" },
    { what: "a lost race or superseded stream", err: new ConnectError("x", Code.Aborted), verdict: "retryable" },
    { what: "a broken connection as connect-node reports it", err: new ConnectError("x", Code.Internal), verdict: "retryable" },
    { what: "an unknown failure", err: new ConnectError("x", Code.Unknown), verdict: "retryable" },
    { what: "a reset from the far side", err: new ConnectError("x", Code.Canceled), verdict: "retryable" },
    { what: "a refused stream, whatever its code", err: refused, verdict: "retryable" },
    { what: "a network error that is no ConnectError", err: Object.assign(new Error("connect ECONNREFUSED"), { code: "ECONNREFUSED" }), verdict: "retryable" },
    { what: "a plain error", err: new Error("socket hang up"), verdict: "retryable" },
    { what: "a malformed request", err: new ConnectError("x", Code.InvalidArgument), verdict: "permanent" },
    { what: "a missing entity", err: new ConnectError("x", Code.NotFound), verdict: "permanent" },
    { what: "an existing entity", err: new ConnectError("x", Code.AlreadyExists), verdict: "permanent" },
    { what: "a wrong state or protocol version", err: new ConnectError("x", Code.FailedPrecondition), verdict: "permanent" },
    { what: "a bad offset", err: new ConnectError("x", Code.OutOfRange), verdict: "permanent" },
    { what: "a missing credential", err: new ConnectError("x", Code.Unauthenticated), verdict: "permanent" },
    { what: "a refused credential", err: new ConnectError("x", Code.PermissionDenied), verdict: "permanent" },
    { what: "a full store or a limit", err: new ConnectError("x", Code.ResourceExhausted), verdict: "permanent" },
    { what: "a call the server lacks", err: new ConnectError("x", Code.Unimplemented), verdict: "permanent" },
    { what: "lost data", err: new ConnectError("x", Code.DataLoss), verdict: "permanent" },
  ];
  it.each(table)("calls $what $verdict", ({ err, verdict }) => {
    expect(classify(err)).toBe(verdict);
  });
});

describe("isNetworkError", () => {
  it("recognises a failed connection by its errno code, in the message or in a cause", () => {
    expect(isNetworkError(Object.assign(new Error("refused"), { code: "ECONNREFUSED" }))).toBe(true);
    expect(isNetworkError(new ConnectError("connect ECONNRESET 127.0.0.1:1", Code.Unavailable))).toBe(true);
    expect(isNetworkError(new ConnectError("x", Code.Internal, undefined, undefined, Object.assign(new Error("y"), { code: "ENOTFOUND" })))).toBe(true);
    expect(isNetworkError(new ConnectError("bad input", Code.InvalidArgument))).toBe(false);
    expect(isNetworkError(new Error("ECONNREFUSEDX"))).toBe(false);
  });
});

describe("keepStreaming", () => {
  /** Streams scripted per attempt: messages, then an end ("end") or a failure (an error). */
  function scripted(script: Array<{ messages: string[]; then: "end" | Error; healthy?: boolean }>) {
    const opened: number[] = [];
    const open = async function* (attempt: StreamAttempt): AsyncGenerator<string> {
      opened.push(Date.now());
      const step = script[Math.min(attempt.number, script.length) - 1];
      if (step.healthy) attempt.healthy();
      yield* step.messages;
      if (step.then !== "end") throw step.then;
    };
    return { opened, open };
  }
  const down = () => new ConnectError("coordinator down", Code.Unavailable);

  it("reopens a stream after it ends, after the backoff delay", async () => {
    jest.useFakeTimers({ now: 0 });
    const controller = new AbortController();
    const { opened, open } = scripted([{ messages: ["a", "b"], then: "end" }]);
    const received: string[] = [];
    const ends: number[] = [];
    const done = keepStreaming({
      open,
      onMessage: (m) => void received.push(m),
      onEnd: (attempt) => void ends.push(attempt.number),
      backoff: { initialMs: 100, maxMs: 1000, jitter: "none" },
      signal: controller.signal,
    });
    await jest.advanceTimersByTimeAsync(0);
    expect(opened).toEqual([0]);
    await jest.advanceTimersByTimeAsync(100);
    await jest.advanceTimersByTimeAsync(200);
    expect(opened).toEqual([0, 100, 300]);
    expect(received).toEqual(["a", "b", "a", "b", "a", "b"]);
    expect(ends).toEqual([1, 2, 3]);
    controller.abort();
    await expect(done).resolves.toBeUndefined();
  });

  it("reopens after a retryable failure, backing off further each time", async () => {
    jest.useFakeTimers({ now: 0 });
    const controller = new AbortController();
    const { opened, open } = scripted([{ messages: [], then: down() }]);
    const failures: Array<{ verdict: Verdict; repeated: boolean }> = [];
    const delays: number[] = [];
    const done = keepStreaming({
      open,
      onError: (_err, { verdict, repeated }) => void failures.push({ verdict, repeated }),
      onBackoff: (ms) => void delays.push(ms),
      backoff: { initialMs: 100, maxMs: 300, jitter: "none" },
      signal: controller.signal,
    });
    await jest.advanceTimersByTimeAsync(100 + 200 + 300 + 300);
    expect(opened).toEqual([0, 100, 300, 600, 900]);
    expect(delays.slice(0, 4)).toEqual([100, 200, 300, 300]);
    expect(failures.slice(0, 3)).toEqual([
      { verdict: "retryable", repeated: false },
      { verdict: "retryable", repeated: true },
      { verdict: "retryable", repeated: true },
    ]);
    controller.abort();
    await done;
  });

  it("starts the backoff afresh after a stream that proved healthy", async () => {
    jest.useFakeTimers({ now: 0 });
    const controller = new AbortController();
    const { opened, open } = scripted([
      { messages: [], then: down() },
      { messages: [], then: down() },
      { messages: ["welcome"], then: down(), healthy: true },
      { messages: [], then: down() },
    ]);
    const repeats: boolean[] = [];
    const done = keepStreaming({
      open,
      onError: (_err, { repeated }) => void repeats.push(repeated),
      backoff: { initialMs: 100, maxMs: 10_000, jitter: "none" },
      signal: controller.signal,
    });
    await jest.advanceTimersByTimeAsync(100 + 200 + 100);
    // Without the reset the fourth stream would open 400 ms after the third.
    expect(opened).toEqual([0, 100, 300, 400]);
    expect(repeats).toEqual([false, true, false, true]);
    controller.abort();
    await done;
  });

  it("stops at once when the signal aborts during the backoff, leaving no timer", async () => {
    jest.useFakeTimers({ now: 0 });
    const controller = new AbortController();
    const { opened, open } = scripted([{ messages: [], then: down() }]);
    const done = keepStreaming({ open, backoff: { initialMs: 60_000, maxMs: 60_000, jitter: "none" }, signal: controller.signal });
    await jest.advanceTimersByTimeAsync(0);
    controller.abort();
    await expect(done).resolves.toBeUndefined();
    expect(opened).toEqual([0]);
    expect(jest.getTimerCount()).toBe(0);
  });

  it("stops at a permanent failure and rejects with it", async () => {
    const refused = new ConnectError("host credential refused", Code.PermissionDenied);
    const { opened, open } = scripted([{ messages: ["a"], then: refused }]);
    const verdicts: Verdict[] = [];
    await expect(
      keepStreaming({
        open,
        onError: (_err, { verdict }) => void verdicts.push(verdict),
        backoff: { initialMs: 1, maxMs: 1 },
        signal: new AbortController().signal,
      }),
    ).rejects.toBe(refused);
    expect(opened).toHaveLength(1);
    expect(verdicts).toEqual(["permanent"]);
  });

  it("follows onError over the verdict: a permanent failure retried, a retryable one stopped, a delay of its own", async () => {
    jest.useFakeTimers({ now: 0 });
    const controller = new AbortController();
    const notFound = new ConnectError("registration expired", Code.NotFound);
    const { opened, open } = scripted([
      { messages: [], then: notFound },
      { messages: [], then: new ConnectError("bad flag", Code.InvalidArgument) },
      { messages: [], then: down() },
    ]);
    const done = keepStreaming({
      open,
      onError: (err) => {
        const code = ConnectError.from(err).code;
        if (code === Code.NotFound) return { retryInMs: 0 };
        if (code === Code.InvalidArgument) return "retry";
        return "stop";
      },
      backoff: { initialMs: 100, maxMs: 100, jitter: "none" },
      signal: controller.signal,
    });
    const assertion = expect(done).rejects.toThrow("coordinator down");
    await jest.advanceTimersByTimeAsync(100);
    await assertion;
    expect(opened).toEqual([0, 0, 100]);
  });

  it("ends for good when onEnd says stop", async () => {
    const { opened, open } = scripted([{ messages: ["last"], then: "end" }]);
    await keepStreaming({ open, onEnd: () => "stop", backoff: { initialMs: 1, maxMs: 1 }, signal: new AbortController().signal });
    expect(opened).toHaveLength(1);
  });
});
