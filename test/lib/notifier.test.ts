import { describe, it, expect, jest, afterEach } from "@jest/globals";
import { Notifier } from "../../lib/async/notifier.js";

afterEach(() => {
  jest.useRealTimers();
});

/** Whether `p` has settled once pending jobs ran. */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  await jest.advanceTimersByTimeAsync(0);
  return done;
}

describe("Notifier", () => {
  it("wakes every waiter of the moment at a notify, and none that comes later", async () => {
    jest.useFakeTimers();
    const notifier = new Notifier();
    const first = notifier.wait();
    const second = notifier.wait();
    expect(await settled(first)).toBe(false);
    notifier.notify();
    expect(await settled(first)).toBe(true);
    expect(await settled(second)).toBe(true);
    expect(await settled(notifier.wait())).toBe(false);
  });

  it("ends a wait at its timeout or its signal's abort, leaving no timer", async () => {
    jest.useFakeTimers();
    const notifier = new Notifier();
    const timed = notifier.wait({ timeoutMs: 100 });
    await jest.advanceTimersByTimeAsync(99);
    expect(await settled(timed)).toBe(false);
    await jest.advanceTimersByTimeAsync(1);
    expect(await settled(timed)).toBe(true);
    const controller = new AbortController();
    const aborted = notifier.wait({ signal: controller.signal, timeoutMs: 60_000 });
    controller.abort();
    expect(await settled(aborted)).toBe(true);
    expect(jest.getTimerCount()).toBe(0);
    expect(await settled(notifier.wait({ signal: controller.signal }))).toBe(true);
  });

  it("resolves until() with the check's value once a notify makes it hold", async () => {
    jest.useFakeTimers();
    const notifier = new Notifier();
    let value: string | undefined = undefined;
    const result = notifier.until(() => value, 1000, () => new Error("too late"));
    notifier.notify();
    expect(await settled(result)).toBe(false);
    value = "ready";
    notifier.notify();
    await expect(result).resolves.toBe("ready");
  });

  it("rejects until() with the caller's error when the deadline passes first", async () => {
    jest.useFakeTimers();
    const notifier = new Notifier();
    const result = notifier.until(() => false, 1000, () => new Error("no welcome within 1000 ms"));
    const assertion = expect(result).rejects.toThrow("no welcome within 1000 ms");
    await jest.advanceTimersByTimeAsync(1000);
    await assertion;
    expect(jest.getTimerCount()).toBe(0);
  });
});
