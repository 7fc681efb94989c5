/**
 * A bounded queue between a producer and a stream writer: `push` resolves
 * only once the queued bytes are under capacity, which is the backpressure;
 * the writer drains it as an async iterable (a bidi call's requests, a
 * Connect handler's `yield*`).
 */
export class Outbox<T> {
  #items: T[] = [];
  #bytes = 0;
  #ended = false;
  #error: unknown;
  #failed = false;
  #pullWaiter: (() => void) | undefined;
  #pushWaiters: (() => void)[] = [];

  constructor(
    private readonly capacityBytes: number,
    private readonly sizeOf: (item: T) => number,
  ) {}

  get ended(): boolean {
    return this.#ended;
  }

  /** Queues `item`; resolves true once there is room, false when the outbox has ended (the item is dropped). */
  async push(item: T): Promise<boolean> {
    if (this.#ended) return false;
    this.#items.push(item);
    this.#bytes += this.sizeOf(item);
    this.#wakePull();
    while (this.#bytes > this.capacityBytes && !this.#ended) {
      await new Promise<void>((resolve) => this.#pushWaiters.push(resolve));
    }
    return !this.#ended;
  }

  /** Ends after what is queued, and `last` if given. Idempotent. */
  end(last?: T): void {
    if (this.#ended) return;
    if (last !== undefined) this.#items.push(last);
    this.#ended = true;
    this.#wakePull();
    this.#wakePushers();
  }

  /** Ends at once: what is queued is dropped and the drain throws `err`. */
  fail(err: unknown): void {
    if (this.#failed) return;
    this.#items = [];
    this.#bytes = 0;
    this.#error = err;
    this.#failed = true;
    this.#ended = true;
    this.#wakePull();
    this.#wakePushers();
  }

  async *drain(): AsyncGenerator<T, void, undefined> {
    for (;;) {
      if (this.#failed) throw this.#error;
      const item = this.#items.shift();
      if (item !== undefined) {
        this.#bytes -= this.sizeOf(item);
        if (this.#bytes <= this.capacityBytes) this.#wakePushers();
        yield item;
        continue;
      }
      if (this.#ended) return;
      await new Promise<void>((resolve) => (this.#pullWaiter = resolve));
    }
  }

  #wakePull(): void {
    const waiter = this.#pullWaiter;
    this.#pullWaiter = undefined;
    waiter?.();
  }

  #wakePushers(): void {
    for (const waiter of this.#pushWaiters.splice(0)) waiter();
  }
}
