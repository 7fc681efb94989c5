/**
 * A Side (splice.ts) over one bidi RPC of a Connect handler: the request
 * iterator is the side's events, an Outbox drained by the handler's
 * generator is what the side is sent. Used for both the client's Dial and the
 * supervisor's Tunnel.
 */
import http2 from "node:http2";
import { CloseReason } from "../gen/treadmill/proxy/v1/tunnel_pb.js";
import { MAX_CHUNK, Outbox, deferred, type Side, type TunnelEvent } from "./splice.js";

/** Bytes queued per direction of one tunnel before the pump waits. */
export const OUTBOX_BYTES = 256 * 1024;

/**
 * The request header the proxy's HTTP hook sets on every HTTP/2 request
 * (overwriting whatever a client sent) to find the raw stream of a call, so
 * that a call whose client never reads can be reset.
 */
export const STREAM_HEADER = "x-treadmill-proxy-stream";

/** Raw HTTP/2 streams of calls in progress, by the STREAM_HEADER value. */
export class StreamTable {
  #next = 0;
  readonly #streams = new Map<string, http2.ServerHttp2Stream>();

  /** Registers a request's stream; returns its id. */
  add(stream: http2.ServerHttp2Stream): string {
    const id = String(++this.#next);
    this.#streams.set(id, stream);
    stream.once("close", () => this.#streams.delete(id));
    return id;
  }

  /** Resets the call's stream (RST_STREAM CANCEL), if it is still there. */
  reset(id: string | null): void {
    if (id === null) return;
    const stream = this.#streams.get(id);
    if (stream && !stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL);
  }
}

export interface RpcSideOptions<Req, Res> {
  /** The requests after the first (`open`) one. */
  requests: AsyncIterator<Req>;
  /** A request as an event, or a protocol error message. */
  toEvent: (request: Req) => TunnelEvent | string;
  /** An event to send as a response message. */
  fromEvent: (event: Exclude<TunnelEvent, { kind: "close" }>) => Res;
  /** The last response message. */
  closeMessage: (reason: CloseReason, message: string) => Res;
  sizeOf: (response: Res) => number;
  signal: AbortSignal;
  /** Resets the call. */
  abort: () => void;
}

/** A Side over a bidi call, and the outbox its handler drains. */
export function rpcSide<Req, Res>(options: RpcSideOptions<Req, Res>): { side: Side; outbox: Outbox<Res>; finished: () => void } {
  const outbox = new Outbox<Res>(OUTBOX_BYTES, options.sizeOf);
  const gone = deferred();
  const finished = deferred();
  if (options.signal.aborted) gone.resolve();
  else options.signal.addEventListener("abort", () => gone.resolve(), { once: true });

  async function* events(): AsyncGenerator<TunnelEvent> {
    for (;;) {
      const next = await options.requests.next();
      if (next.done) return;
      const event = options.toEvent(next.value);
      if (typeof event === "string") {
        yield { kind: "close", reason: CloseReason.ERROR, message: event };
        return;
      }
      if (event.kind === "data" && event.bytes.byteLength === 0) continue;
      yield event;
    }
  }

  const side: Side = {
    events: events(),
    async send(event) {
      if (event.kind !== "data" || event.bytes.byteLength <= MAX_CHUNK) return outbox.push(options.fromEvent(event));
      for (let at = 0; at < event.bytes.byteLength; at += MAX_CHUNK) {
        const bytes = event.bytes.subarray(at, at + MAX_CHUNK);
        if (!(await outbox.push(options.fromEvent({ kind: "data", bytes })))) return false;
      }
      return true;
    },
    close(reason, message) {
      outbox.end(options.closeMessage(reason, message));
    },
    abort() {
      outbox.fail(new Error("reset"));
      options.abort();
    },
    gone: gone.promise,
    finished: finished.promise,
  };
  return { side, outbox, finished: () => finished.resolve() };
}
