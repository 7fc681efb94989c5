/**
 * A promise with its resolver outside: for a result that some later event
 * settles (a tunnel's close reason, a reply that a stream brings).
 */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}
