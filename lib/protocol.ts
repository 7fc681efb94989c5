/**
 * The version of Treadmill's stream protocols: the hello that opens each
 * bidirectional stream carries it (the supervisor's `Attach`, the log
 * shipper's `Append`, the proxy's `Expose`, `Dial` and `Tunnel`), and the
 * server answers in its welcome. Both ends import this one constant. A
 * server refuses another major with `FailedPrecondition` (DESIGN.md §11);
 * minors only add, so a minor is never refused.
 */
export const PROTOCOL_VERSION: { readonly major: number; readonly minor: number } = { major: 1, minor: 0 };
