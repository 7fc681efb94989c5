/**
 * A sweep run every `intervalMs` and on demand (`wake()`), one at a time:
 * a wake while a sweep runs makes one more run right after it, so no wake is
 * lost and none piles up. A sweep that returns true asks for another run at
 * once (it stopped at a batch limit). A failed sweep goes to `onError` and
 * the loop goes on. `stop()` is idempotent: no sweep starts after it, and it
 * resolves when the running one has ended.
 */
export class SweepLoop {
  private timer: ReturnType<typeof setInterval> | undefined;
  private running: Promise<void> | undefined;
  private again = false;
  private stopped = false;

  constructor(
    private readonly sweep: () => Promise<boolean | void>,
    private readonly intervalMs: number,
    private readonly onError: (err: unknown) => void,
  ) {}

  /** Starts the period and runs a sweep now. */
  start(): void {
    this.timer = setInterval(() => this.wake(), this.intervalMs);
    this.timer.unref?.();
    this.wake();
  }

  get isStopped(): boolean {
    return this.stopped;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    await this.running;
  }

  /** Runs a sweep now, or once more right after the running one. */
  wake(): void {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = (async () => {
      do {
        this.again = false;
        try {
          if ((await this.sweep()) === true) this.again = true;
        } catch (err) {
          if (!this.stopped) this.onError(err);
        }
      } while (this.again && !this.stopped);
    })().finally(() => (this.running = undefined));
  }
}
