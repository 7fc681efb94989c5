/**
 * Wakes everyone waiting at each `notify()`: a condition variable without
 * the lock. A waiter re-checks its condition after every wake and waits again,
 * so a notify that finds no waiter is not lost to anyone who checks first. A
 * `wait` ends at the next notify, after its timeout, or when its signal
 * aborts, whichever comes first, and never rejects: the waiter's own check
 * says what happened. `until` is that check-and-wait loop with a deadline.
 */
export class Notifier {
  private readonly waiters = new Set<() => void>();

  /** Wakes every current waiter. */
  notify(): void {
    const waiting = [...this.waiters];
    this.waiters.clear();
    for (const wake of waiting) wake();
  }

  /** Resolves at the next notify, after `timeoutMs`, or when `signal` aborts (at once if it has). */
  wait(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    const { timeoutMs, signal } = options;
    return new Promise((resolve) => {
      if (signal?.aborted) {
        resolve();
        return;
      }
      let timer: ReturnType<typeof setTimeout> | undefined;
      const done = () => {
        this.waiters.delete(done);
        signal?.removeEventListener("abort", done);
        clearTimeout(timer);
        resolve();
      };
      this.waiters.add(done);
      signal?.addEventListener("abort", done, { once: true });
      if (timeoutMs !== undefined) timer = setTimeout(done, Math.max(0, timeoutMs));
    });
  }

  /**
   * Resolves with `check()`'s first truthy value, re-checked at every notify;
   * rejects with `timeout()` when `timeoutMs` passes first.
   */
  async until<T>(check: () => T | undefined | null | false, timeoutMs: number, timeout: () => Error): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const value = check();
      if (value) return value;
      const left = deadline - Date.now();
      if (left <= 0) throw timeout();
      await this.wait({ timeoutMs: left });
    }
  }
}
