/**
 * The byte splice at the heart of the proxy: one client connection (a Dial
 * stream, a WebSocket or a TCP socket) joined to one supervisor Tunnel stream,
 * with backpressure both ways, half-close, an idle timeout, the dial token's
 * expiry and one close with a reason that both sides hear.
 *
 * Every entrance and the supervisor's Tunnel are adapted to a `Side`: a
 * stream of events from that side and a `send` that resolves only when there
 * is room, so a pump that awaits `send` stops reading its source, and the
 * source's own flow control (HTTP/2 windows, TCP) pushes back to the sender.
 */
import { CloseReason } from "../gen/treadmill/proxy/v1/tunnel_pb.js";
import type { Logger } from "../lib/logger.js";
import { deferred } from "../lib/async/deferred.js";
import { TUNNEL_BATCH_BYTES } from "../lib/tunnel/wire.js";

/** Largest data event an entrance emits (a data message's worth, lib/tunnel/wire.ts). */
export const MAX_CHUNK = TUNNEL_BATCH_BYTES;

/** Bytes in `chunks`. */
export function byteLength(chunks: readonly Uint8Array[]): number {
  let n = 0;
  for (const c of chunks) n += c.byteLength;
  return n;
}

/** What a side of a connection says. */
export type TunnelEvent =
  /** Bytes, possibly in several pieces (views of what was received, never copied). */
  | { kind: "data"; chunks: readonly Uint8Array[] }
  | { kind: "half-close" }
  | { kind: "resize"; cols: number; rows: number }
  | { kind: "close"; reason: CloseReason; message: string };

/** One end of a spliced connection. */
export interface Side {
  /**
   * Events from this side. Ending normally means "will send no more" (a
   * half-close); throwing means the side is gone.
   */
  readonly events: AsyncIterable<TunnelEvent>;
  /** Sends to this side; resolves when there is room again, false once it is closed. */
  send(event: Exclude<TunnelEvent, { kind: "close" }>): Promise<boolean>;
  /** Ends this side: flushes what is queued, then tells it why (if it can hear a reason). Idempotent. */
  close(reason: CloseReason, message: string): void;
  /** Tears this side down at once (a reset): for a side that does not finish after close. */
  abort(): void;
  /** Resolves when the transport under this side is gone (cancelled, reset, socket closed). */
  readonly gone: Promise<void>;
  /** Resolves when the side has finished after close (its last message written). */
  readonly finished: Promise<void>;
}

/** How a connection ended. */
export interface Closed {
  reason: CloseReason;
  message: string;
  bytesUp: number;
  bytesDown: number;
}

export interface ConnectionOptions {
  id: string;
  idleTimeoutMs: number;
  /** The dial token's expiry: the connection ends then with TOKEN_EXPIRED. */
  expiresAtMs: number;
  /** How long a side may take to finish after the close before it is reset. */
  forceAfterMs: number;
  logger: Logger;
  clock?: () => number;
}

/**
 * One client connection spliced to one supervisor tunnel. `start` pumps both
 * ways until either side closes or goes away, the idle timeout or the token's
 * expiry; `closed` resolves with the reason, and both sides have been told.
 */
export class Connection {
  readonly id: string;
  readonly closed: Promise<Closed>;
  #resolveClosed: (closed: Closed) => void;
  #client: Side | undefined;
  #supervisor: Side | undefined;
  #done = false;
  #clientHalfClosed = false;
  #supervisorHalfClosed = false;
  #lastActivity: number;
  #bytesUp = 0;
  #bytesDown = 0;
  #idleTimer: NodeJS.Timeout | undefined;
  #expiryTimer: NodeJS.Timeout | undefined;
  readonly #options: ConnectionOptions;
  readonly #clock: () => number;

  constructor(options: ConnectionOptions) {
    this.id = options.id;
    this.#options = options;
    this.#clock = options.clock ?? Date.now;
    this.#lastActivity = this.#clock();
    const { promise, resolve } = deferred<Closed>();
    this.closed = promise;
    this.#resolveClosed = resolve;
  }

  get isClosed(): boolean {
    return this.#done;
  }

  /** Joins the two sides and pumps until the connection ends. */
  start(client: Side, supervisor: Side): void {
    this.#client = client;
    this.#supervisor = supervisor;
    if (this.#done) {
      // Closed while the tunnel was being set up (withdrawn, shutdown).
      this.#closeSides();
      return;
    }
    void client.gone.then(() => this.close(CloseReason.CLIENT_GONE, "client went away"));
    void supervisor.gone.then(() => this.close(CloseReason.SUPERVISOR_GONE, "supervisor tunnel went away"));
    void this.#pump(client, supervisor, "client");
    void this.#pump(supervisor, client, "supervisor");
    this.#armIdle(this.#options.idleTimeoutMs);
    const untilExpiry = this.#options.expiresAtMs - this.#clock();
    if (Number.isFinite(untilExpiry)) {
      // setTimeout holds at most 2^31-1 ms; longer expiries are re-armed.
      const arm = (ms: number) => {
        this.#expiryTimer = setTimeout(() => {
          const left = this.#options.expiresAtMs - this.#clock();
          if (left > 0) arm(left);
          else this.close(CloseReason.TOKEN_EXPIRED, "the dial token expired");
        }, Math.min(Math.max(ms, 0), 2 ** 31 - 1));
      };
      arm(untilExpiry);
    }
  }

  /** Ends the connection once; both sides hear `reason`. */
  close(reason: CloseReason, message: string): void {
    if (this.#done) return;
    this.#done = true;
    clearTimeout(this.#idleTimer);
    clearTimeout(this.#expiryTimer);
    this.#options.logger.debug(
      { connectionId: this.id, reason: CloseReason[reason], bytesUp: this.#bytesUp, bytesDown: this.#bytesDown },
      "connection closed",
    );
    this.#closeSides(reason, message);
    this.#resolveClosed({ reason, message, bytesUp: this.#bytesUp, bytesDown: this.#bytesDown });
  }

  #closeSides(reason: CloseReason = CloseReason.SHUTDOWN, message = "closed before the tunnel was up"): void {
    for (const side of [this.#client, this.#supervisor]) {
      if (side === undefined) continue;
      side.close(reason, message);
      // A side that cannot take its last message (a client that never
      // reads) is reset rather than held open.
      const timer = setTimeout(() => side.abort(), this.#options.forceAfterMs);
      void side.finished.then(() => clearTimeout(timer));
      void side.gone.then(() => clearTimeout(timer));
    }
  }

  #touch(): void {
    this.#lastActivity = this.#clock();
  }

  #armIdle(ms: number): void {
    if (this.#options.idleTimeoutMs <= 0) return;
    this.#idleTimer = setTimeout(() => {
      const idle = this.#clock() - this.#lastActivity;
      if (idle >= this.#options.idleTimeoutMs) {
        this.close(CloseReason.IDLE_TIMEOUT, `no bytes for ${this.#options.idleTimeoutMs} ms`);
      } else {
        this.#armIdle(this.#options.idleTimeoutMs - idle);
      }
    }, ms);
  }

  async #pump(from: Side, to: Side, name: "client" | "supervisor"): Promise<void> {
    try {
      for await (const event of from.events) {
        if (this.#done) return;
        switch (event.kind) {
          case "data":
            this.#touch();
            if (name === "client") this.#bytesUp += byteLength(event.chunks);
            else this.#bytesDown += byteLength(event.chunks);
            if (!(await to.send(event))) return;
            this.#touch();
            break;
          case "resize":
            // Only a client resizes a console.
            if (name === "client") await to.send(event);
            break;
          case "half-close":
            if (!(await this.#halfClose(to, name))) return;
            break;
          case "close":
            this.close(event.reason, event.message);
            return;
        }
      }
      // The end of a side's stream is its half-close.
      if (!this.#done) await this.#halfClose(to, name);
    } catch (err) {
      if (this.#done) return;
      this.#options.logger.debug({ err, connectionId: this.id, side: name }, "side failed");
      this.close(
        name === "client" ? CloseReason.CLIENT_GONE : CloseReason.SUPERVISOR_GONE,
        name === "client" ? "client went away" : "supervisor tunnel went away",
      );
    }
  }

  async #halfClose(to: Side, name: "client" | "supervisor"): Promise<boolean> {
    if (name === "client") {
      if (this.#clientHalfClosed) return true;
      this.#clientHalfClosed = true;
    } else {
      if (this.#supervisorHalfClosed) return true;
      this.#supervisorHalfClosed = true;
    }
    const sent = await to.send({ kind: "half-close" });
    if (this.#clientHalfClosed && this.#supervisorHalfClosed) {
      this.close(CloseReason.NORMAL, "both sides finished");
      return false;
    }
    return sent;
  }
}
