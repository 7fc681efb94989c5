/**
 * Waiting for a state the tests can only poll (a row, a counter, a process
 * gone: nothing they could subscribe to), always with a deadline.
 */

/**
 * Polls `probe` every 20 ms until it gives a truthy value, which it returns;
 * fails naming `what` once `timeoutMs` has passed.
 */
export async function waitUntil<T>(
  probe: () => T | undefined | null | false | Promise<T | undefined | null | false>,
  what: string,
  timeoutMs = 20000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
