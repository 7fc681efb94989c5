/**
 * Sides (splice.ts) over the two byte-stream RPCs, the client's Dial and the
 * supervisor's Tunnel, on either transport:
 *
 * - plain gRPC (every gRPC client, ours included) goes through the raw path
 *   (lib/grpc/server.ts's rawProcedure, behind the same authorization hook
 *   and error rule) and frames data messages itself: a header, then the
 *   bytes as they came, no protobuf runtime and no copy;
 * - Connect and gRPC-Web fall through to the Connect adapter, whose handlers
 *   drain an Outbox of messages.
 *
 * Both reduce a call to a `ByteStream` (the payloads it receives and a
 * writer of the payloads it sends), so the oneof mapping to TunnelEvents,
 * the open handshake and the close are written once for both RPCs.
 */
import http2 from "node:http2";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext } from "@connectrpc/connect";
import { CloseReason } from "../gen/treadmill/proxy/v1/tunnel_pb.js";
import { type RawGrpcCall } from "../lib/grpc/server.js";
import { drained } from "../lib/grpc/wire.js";
import {
  MAX_TUNNEL_DATA,
  decodeTunnelPieces,
  encodeTunnelMessage,
  writeData,
  type TunnelPayload,
  type TunnelWire,
} from "../lib/tunnel/wire.js";
import { deferred } from "../lib/async/deferred.js";
import { Outbox } from "../lib/async/outbox.js";
import { byteLength, type Side, type TunnelEvent } from "./splice.js";

/** Bytes queued per direction of one Connect-path tunnel before the pump waits. */
export const OUTBOX_BYTES = 256 * 1024;

/**
 * The request header the proxy's HTTP hook sets on every HTTP/2 request
 * (overwriting whatever a client sent) to find the raw stream of a call, so
 * that a Connect-path call whose client never reads can be reset.
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

/** One byte-stream call, whatever its transport. */
export interface ByteStream {
  /** The payloads the peer sends, in order; ends when its request stream ends. */
  readonly payloads: AsyncIterator<TunnelPayload>;
  /** Sends a payload; resolves true once there is room again, false once the stream is closed. */
  write(payload: TunnelPayload): Promise<boolean>;
  /** Sends `last` after what is queued, then ends the call (OK). Idempotent. */
  end(last: TunnelPayload): void;
  /** Resets the call. */
  abort(): void;
  /** Resolves when the transport is gone (cancelled, reset). */
  readonly gone: Promise<void>;
  /** Resolves when the call has finished after end() (its last message written). */
  readonly finished: Promise<void>;
}

/**
 * Reads the first payload, which must be `open`; throws InvalidArgument
 * otherwise.
 */
export async function readOpen<T>(stream: ByteStream): Promise<T> {
  const first = await stream.payloads.next();
  if (first.done || first.value.case !== "open") throw new ConnectError("the first message must be open", Code.InvalidArgument);
  return first.value.value as T;
}

/** A received payload as an event, or a protocol error message. The one mapping of both RPCs' oneofs. */
function toEvent(payload: TunnelPayload, receive: TunnelWire): TunnelEvent | string {
  switch (payload.case) {
    case "data": {
      // A Connect call's data is one buffer, a raw call's its pieces.
      const value = payload.value as Uint8Array | Uint8Array[];
      const chunks = Array.isArray(value) ? value : [value];
      return byteLength(chunks) > MAX_TUNNEL_DATA ? `data messages are at most ${MAX_TUNNEL_DATA} bytes` : { kind: "data", chunks };
    }
    case "halfClose":
      return { kind: "half-close" };
    case "resize": {
      const { cols, rows } = payload.value as { cols: number; rows: number };
      return { kind: "resize", cols, rows };
    }
    case "open":
      return "open may only be the first message";
    case undefined:
      return "unknown message";
    default: {
      if (payload.case !== receive.closeCase) return "unknown message";
      const { reason, message } = payload.value as { reason: CloseReason; message: string };
      return { kind: "close", reason, message };
    }
  }
}

/** An event to send as a payload (the close is sent by Side.close). */
function toPayload(event: Exclude<TunnelEvent, { kind: "close" }>): TunnelPayload {
  switch (event.kind) {
    case "data":
      return { case: "data", value: event.chunks };
    case "half-close":
      return { case: "halfClose", value: {} };
    case "resize":
      return { case: "resize", value: { cols: event.cols, rows: event.rows } };
  }
}

/** The Side of a byte-stream call whose `open` has been read. */
export function streamSide(stream: ByteStream, receive: TunnelWire, send: TunnelWire): Side {
  async function* events(): AsyncGenerator<TunnelEvent> {
    for (;;) {
      const next = await stream.payloads.next();
      if (next.done) return;
      const event = toEvent(next.value, receive);
      if (typeof event === "string") {
        yield { kind: "close", reason: CloseReason.ERROR, message: event };
        return;
      }
      if (event.kind === "data" && byteLength(event.chunks) === 0) continue;
      yield event;
    }
  }
  return {
    events: events(),
    send: (event) => stream.write(toPayload(event)),
    close: (reason, message) => stream.end({ case: send.closeCase, value: { reason, message } }),
    abort: () => stream.abort(),
    gone: stream.gone,
    finished: stream.finished,
  };
}

/**
 * A ByteStream over a raw gRPC call (lib/grpc/server.ts): data goes out
 * as a header plus the bytes themselves, a write waits only when the HTTP/2
 * stream wants it to (its flow control is the backpressure).
 */
export function rawByteStream(call: RawGrpcCall, receive: TunnelWire, send: TunnelWire): ByteStream {
  const { stream } = call;
  const { signal } = call.context;
  const gone = deferred();
  const finished = deferred();
  if (signal.aborted) gone.resolve();
  else signal.addEventListener("abort", () => gone.resolve(), { once: true });
  let ended = false;
  const open = () => !ended && !stream.destroyed && !stream.writableEnded;
  const room = async (ok: boolean): Promise<boolean> => {
    if (ok) return true;
    return drained(stream, signal).then(
      () => !ended,
      () => false,
    );
  };
  const messages = call.pieces();
  const payloads = (async function* (): AsyncGenerator<TunnelPayload> {
    for await (const pieces of messages) yield decodeTunnelPieces(receive, pieces);
  })();
  return {
    payloads,
    write(payload) {
      if (!open()) return Promise.resolve(false);
      if (payload.case === "data") return room(writeData(stream, send, payload.value as Uint8Array[]));
      return room(stream.write(encodeTunnelMessage(send, payload)));
    },
    end(last) {
      if (ended) return;
      const writable = open();
      ended = true;
      if (!writable) {
        finished.resolve();
        return;
      }
      // The procedure returns (and the trailers go) once the close is out.
      if (stream.write(encodeTunnelMessage(send, last))) finished.resolve();
      else drained(stream, signal).then(() => finished.resolve(), () => undefined);
    },
    abort() {
      if (!stream.destroyed) stream.close(http2.constants.NGHTTP2_CANCEL);
    },
    gone: gone.promise,
    finished: finished.promise,
  };
}

/**
 * A ByteStream over a Connect handler's bidi call: payloads from its request
 * messages, writes queued in an Outbox that the handler drains (`yield*
 * outbox.drain()`, then `done()`).
 */
export function connectByteStream<Req extends { payload: unknown }, Res>(
  requests: AsyncIterable<Req>,
  send: TunnelWire,
  ctx: HandlerContext,
  streams: StreamTable,
): { stream: ByteStream; outbox: Outbox<Res>; done: () => void } {
  const outbox = new Outbox<Res>(OUTBOX_BYTES, (r) => {
    const payload = (r as { payload: TunnelPayload }).payload;
    return payload.case === "data" ? (payload.value as Uint8Array).byteLength : 64;
  });
  const message = (payload: TunnelPayload) => {
    if (payload.case === "data") {
      const chunks = payload.value as Uint8Array[];
      payload = { case: "data", value: chunks.length === 1 ? chunks[0] : Buffer.concat(chunks) };
    }
    return create(send.schema, { payload } as never) as Res;
  };
  const gone = deferred();
  const finished = deferred();
  if (ctx.signal.aborted) gone.resolve();
  else ctx.signal.addEventListener("abort", () => gone.resolve(), { once: true });
  const streamId = ctx.requestHeader.get(STREAM_HEADER);
  const payloads = (async function* (): AsyncGenerator<TunnelPayload> {
    for await (const request of requests) yield request.payload as TunnelPayload;
  })();
  const stream: ByteStream = {
    payloads,
    write: (payload) => outbox.push(message(payload)),
    end: (last) => outbox.end(message(last)),
    abort() {
      outbox.fail(new Error("reset"));
      streams.reset(streamId);
    },
    gone: gone.promise,
    finished: finished.promise,
  };
  return { stream, outbox, done: () => finished.resolve() };
}
