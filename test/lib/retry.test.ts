import { describe, it, expect, jest, afterEach } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { backoff, isTransientError, retry, sleep } from "../../lib/retry.js";

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
        { initialMs: 1, maxMs: 1, isRetryable: isTransientError },
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

describe("isTransientError", () => {
  it("accepts retryable rpc codes and network errors only", () => {
    expect(isTransientError(new ConnectError("x", Code.Unavailable))).toBe(true);
    expect(isTransientError(new ConnectError("x", Code.DeadlineExceeded))).toBe(true);
    expect(isTransientError(new ConnectError("x", Code.PermissionDenied))).toBe(false);
    expect(isTransientError(Object.assign(new Error("refused"), { code: "ECONNREFUSED" }))).toBe(true);
    expect(isTransientError(new Error("bug"))).toBe(false);
  });
});
