/**
 * The client side of a rendezvous proxy (DESIGN.md §8, docs/proxy.md):
 * `dialTunnel` opens `TunnelService.Dial` and returns a Node Duplex of the
 * exposure's bytes (what `tml console` and `tml port-forward` pipe to a
 * terminal or a local socket), and `attachTerminal` runs an interactive
 * console session on it. Also the pieces the supervisor's side and the proxy
 * share: the tunnel messages' wire codec (data messages framed by hand, no
 * copy), `tunnelDuplex` over a raw gRPC call (lib/raw-grpc-client.ts), a
 * bounded outbox for a bidi call's requests and an HTTP/2 transport with
 * wide flow-control windows on its own connection (the control stream).
 *
 * Byte streams go through a hand-framed gRPC call rather than connect-node,
 * whose per-message cost held a tunnel to about a tenth of loopback TCP
 * (docs/proxy.md "Throughput").
 */
import type http2 from "node:http2";
import { Duplex } from "node:stream";
import { create, toBinary, type DescMessage } from "@bufbuild/protobuf";
import { Code, ConnectError, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { RendezvousService, TunnelRequestSchema, TunnelResponseSchema } from "../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import { CloseReason, type Exposure } from "../gen/treadmill/proxy/v1/tunnel_pb.js";
import { DialRequestSchema, DialResponseSchema, TunnelService } from "../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { bearerInterceptor } from "./coordinator-client.js";
import { refusedStreamRetry } from "./retry.js";
import { STREAM_WINDOW, WideSessionManager, connectHttp2, dialSocket, openRawCall, type RawClientCall } from "./raw-grpc-client.js";
import { bytesFieldHeader, decodeMessage, frame, soleBytesField, soleBytesFieldPieces } from "./server/raw-grpc.js";

/** Largest `data` of one tunnel message that any side accepts (the protos' limit). */
export const MAX_TUNNEL_DATA = 1024 * 1024;

/**
 * How many bytes a sender packs into one data message when more are waiting
 * (FACTS.md: 256 KiB-1 MiB per message is best); a lone small write still
 * goes out at once as its own message.
 */
export const TUNNEL_BATCH_BYTES = 256 * 1024;

/** Largest whole tunnel message (data plus its field header, or a control message). */
export const MAX_TUNNEL_MESSAGE = MAX_TUNNEL_DATA + 1024;

export const DIAL_PATH = `/${TunnelService.typeName}/Dial`;
export const TUNNEL_PATH = `/${RendezvousService.typeName}/Tunnel`;


/** A promise and its resolver. */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

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

/**
 * A gRPC transport on its own HTTP/2 connection with wide receive windows and
 * no compression, for one byte stream (or one control stream): a stalled
 * stream then holds back only its own connection's windows, never another
 * tunnel's. `close()` drops the connection.
 */
export function tunnelTransport(url: string, token: () => string): { transport: Transport; close(): void } {
  const sessionManager = new WideSessionManager(url, undefined, {
    settings: { initialWindowSize: STREAM_WINDOW },
    // Small messages (keystrokes, echoes) go out at once, not behind Nagle.
    createConnection: (authority: URL) => dialSocket(authority),
  });
  const transport = createGrpcTransport({
    baseUrl: url,
    sessionManager,
    interceptors: [refusedStreamRetry, bearerInterceptor(token)],
    acceptCompression: [],
  });
  return { transport, close: () => sessionManager.abort() };
}

/**
 * One message of a tunnel byte stream, as its `payload` oneof: `data`,
 * `halfClose`, `resize`, `open`/`opened`, `close`/`closed`.
 */
export interface TunnelPayload {
  case: string | undefined;
  value?: unknown;
}

/**
 * One direction of a tunnel RPC: its message schema (a `payload` oneof whose
 * `data` is bytes) and the case of its last message, if it has one. The four
 * directions of Dial and Tunnel differ only in these.
 */
export interface TunnelWire {
  readonly schema: DescMessage;
  /** Field number of `data`. */
  readonly dataField: number;
  /** The case that ends the stream with a reason (`close`, `closed`); none for DialRequest. */
  readonly closeCase: string | undefined;
}

function wire(schema: DescMessage, closeCase: string | undefined): TunnelWire {
  return { schema, dataField: schema.field.data.number, closeCase };
}

/** Dial, client to proxy. */
export const DIAL_REQUEST = wire(DialRequestSchema, undefined);
/** Dial, proxy to client. */
export const DIAL_RESPONSE = wire(DialResponseSchema, "closed");
/** Tunnel, supervisor to proxy. */
export const TUNNEL_REQUEST = wire(TunnelRequestSchema, "close");
/** Tunnel, proxy to supervisor. */
export const TUNNEL_RESPONSE = wire(TunnelResponseSchema, "close");

/** A framed message with this payload (any case; data is better sent with writeData). */
export function encodeTunnelMessage(w: TunnelWire, payload: TunnelPayload): Buffer {
  return frame(toBinary(w.schema, create(w.schema, { payload } as never)));
}

/**
 * A received message's payload. A data message is recognised without the
 * protobuf runtime and its bytes are a view, not a copy. Throws
 * InvalidArgument for malformed bytes.
 */
export function decodeTunnelMessage(w: TunnelWire, bytes: Uint8Array): TunnelPayload {
  const data = soleBytesField(bytes, w.dataField);
  if (data !== undefined) return { case: "data", value: data };
  return (decodeMessage(w.schema, bytes) as unknown as { payload: TunnelPayload }).payload;
}

/**
 * A received message in pieces (readMessagePieces) as its payload; `data` is
 * the list of the payload's pieces, views of what was received.
 */
export function decodeTunnelPieces(w: TunnelWire, pieces: Buffer[]): TunnelPayload {
  const data = soleBytesFieldPieces(pieces, w.dataField);
  if (data !== undefined) return { case: "data", value: data };
  return decodeTunnelMessage(w, pieces.length === 1 ? pieces[0] : Buffer.concat(pieces));
}

/**
 * Writes `parts` as data messages of at most TUNNEL_BATCH_BYTES each: a
 * header, then the parts' own bytes (no copy), in one writev. Returns false
 * when the stream wants the writer to wait for 'drain'.
 */
export function writeData(stream: http2.Http2Stream, w: TunnelWire, parts: readonly Uint8Array[]): boolean {
  let batch: Uint8Array[] = [];
  let size = 0;
  let ok = true;
  const flush = () => {
    ok = stream.write(bytesFieldHeader(w.dataField, size));
    for (const p of batch) ok = stream.write(p);
    batch = [];
    size = 0;
  };
  stream.cork();
  for (const whole of parts) {
    let part = whole;
    while (part.byteLength > 0) {
      const piece = part.byteLength <= TUNNEL_BATCH_BYTES - size ? part : part.subarray(0, TUNNEL_BATCH_BYTES - size);
      batch.push(piece);
      size += piece.byteLength;
      part = part.subarray(piece.byteLength);
      if (size === TUNNEL_BATCH_BYTES) flush();
    }
  }
  if (size > 0) flush();
  stream.uncork();
  return ok;
}

/** How a tunnel ended. */
export interface TunnelClosed {
  reason: CloseReason;
  message: string;
}

/** A tunnel's bytes as a Node Duplex over a raw gRPC call; `end()` half-closes. */
export interface TunnelDuplex extends Duplex {
  /** Resolves when the tunnel has ended, with the far side's reason. */
  readonly closeReason: Promise<TunnelClosed>;
  /** Sends a message that is not data (a resize; the supervisor's close). Ignored once the call is over. */
  sendControl(payload: TunnelPayload): void;
}

/** The bytes of one exposure, as a Node Duplex; `end()` half-closes. */
export interface TunnelStream extends TunnelDuplex {
  /** The proxy's id of the connection. */
  readonly connectionId: string;
  /** The exposure reached (kind, whether resizable). */
  readonly exposure: Exposure;
  /** Tells a resizable console the terminal's size (ignored otherwise). */
  resize(cols: number, rows: number): void;
}

export interface TunnelDuplexOptions {
  call: RawClientCall;
  /** The call's response messages in pieces (possibly past a first one already read). */
  responses: AsyncGenerator<Buffer[]>;
  /** What this side sends. */
  send: TunnelWire;
  /** What it receives. */
  receive: TunnelWire;
  /** Received messages that are neither data, half-close nor the close (a resize). */
  onControl?: (payload: TunnelPayload) => void;
  /** Runs once when the call is over (closes its connection). */
  onEnd: () => void;
}

/**
 * A Duplex over a tunnel call. Writes become data messages, batched when
 * several wait (writev) and sent at once otherwise; a write completes when
 * the HTTP/2 stream can take more, so a peer that does not read holds back
 * the writer. Reads follow the reader's pace (pushes stop at the high-water
 * mark, HTTP/2 flow control does the rest). A half-close is `end()` one way
 * and the readable's end the other; the far side's close resolves
 * `closeReason` and destroys the stream once every byte has been read.
 */
export function tunnelDuplex(options: TunnelDuplexOptions): TunnelDuplex {
  const { call, send, receive } = options;
  const closed = deferred<TunnelClosed>();
  let over = false;
  let reading: Promise<void> | undefined;
  let wantMore: (() => void) | undefined;
  const writable = () => !over && !call.stream.destroyed && !call.stream.writableEnded;
  const finish = (cancel: boolean) => {
    if (over) return;
    over = true;
    if (cancel) call.cancel();
    else call.end();
    options.onEnd();
  };
  const writeParts = (parts: Uint8Array[], callback: (err?: Error | null) => void) => {
    if (!writable()) {
      callback(new Error("tunnel closed"));
      return;
    }
    if (writeData(call.stream, send, parts)) callback();
    else call.drained().then(() => callback(), () => callback(new Error("tunnel closed")));
  };

  const stream = new Duplex({
    allowHalfOpen: true,
    // Ended both ways is not the end of the tunnel: its close (with the
    // reason) follows; the pump destroys the stream then.
    autoDestroy: false,
    writableHighWaterMark: TUNNEL_BATCH_BYTES,
    write(chunk: Buffer, _encoding, callback) {
      writeParts([chunk], callback);
    },
    writev(chunks, callback) {
      writeParts(chunks.map((c) => c.chunk as Buffer), callback);
    },
    final(callback) {
      if (writable()) call.write(encodeTunnelMessage(send, { case: "halfClose", value: {} }));
      callback();
    },
    read() {
      const waiter = wantMore;
      wantMore = undefined;
      waiter?.();
      reading ??= pump();
    },
    destroy(err, callback) {
      closed.resolve({ reason: CloseReason.CLIENT_GONE, message: "destroyed by the client" });
      finish(true);
      const waiter = wantMore;
      wantMore = undefined;
      waiter?.();
      callback(err);
    },
  }) as TunnelDuplex;

  const pump = async () => {
    try {
      for await (const pieces of options.responses) {
        const payload = decodeTunnelPieces(receive, pieces);
        if (payload.case === "data") {
          let more = true;
          for (const piece of payload.value as Buffer[]) more = stream.push(piece);
          if (!more && !stream.destroyed) await new Promise<void>((resolve) => (wantMore = resolve));
        } else if (payload.case === "halfClose") {
          stream.push(null);
        } else if (payload.case === receive.closeCase) {
          const { reason, message } = payload.value as TunnelClosed;
          closed.resolve({ reason, message });
        } else {
          options.onControl?.(payload);
        }
      }
      closed.resolve({ reason: CloseReason.SUPERVISOR_GONE, message: "the proxy ended the tunnel without a reason" });
      finish(false);
      // Destroyed once the reader has had every byte.
      if (stream.readableEnded) stream.destroy();
      else {
        stream.once("end", () => stream.destroy());
        stream.push(null);
      }
    } catch (err) {
      const error = ConnectError.from(err);
      closed.resolve({ reason: CloseReason.SUPERVISOR_GONE, message: error.rawMessage });
      finish(true);
      stream.destroy(error);
    }
  };

  Object.defineProperties(stream, {
    closeReason: { value: closed.promise },
    sendControl: {
      value: (payload: TunnelPayload) => {
        if (writable()) call.write(encodeTunnelMessage(send, payload));
      },
    },
  });
  return stream;
}

/** Request headers of a tunnel call. */
function authHeaders(token: string): Record<string, string> {
  return token === "" ? {} : { authorization: `Bearer ${token}` };
}

/**
 * Opens a tunnel call of `path` on a connection of its own (a stalled stream
 * then holds back only its own connection's windows, never another
 * tunnel's) and sends `open` as its first message.
 */
export function openTunnelCall(
  url: string,
  path: string,
  token: string,
  send: TunnelWire,
  open: TunnelPayload,
): { call: RawClientCall; responses: AsyncGenerator<Buffer[]>; close(): void } {
  const session = connectHttp2(url);
  const call = openRawCall(session, path, authHeaders(token), { maxMessageBytes: MAX_TUNNEL_MESSAGE });
  call.write(encodeTunnelMessage(send, open));
  return {
    call,
    responses: call.messagePieces(),
    close: () => {
      // Lets the last frames (the request's end) go out, then drops the connection.
      session.close();
      setTimeout(() => session.destroy(), 1000).unref();
    },
  };
}

export interface DialOptions {
  /** The proxy's URL (OpenJobSession's grpc_url). */
  proxyUrl: string;
  /** The `tunnel:dial` token (OpenJobSession's dial_token). */
  token: string;
  jobId: string;
  /** The exposure's name: `console`, `ssh`... */
  port: string;
  /** The job host; empty: the token's. */
  hostId?: string;
  /** The terminal's size now, for a resizable console. */
  windowSize?: { cols: number; rows: number };
  /** Aborting it cuts the tunnel. */
  signal?: AbortSignal;
}

/**
 * Dials an exposure through the proxy. Resolves once the proxy says the
 * tunnel is up; rejects with the proxy's ConnectError (NotFound, Unavailable,
 * PermissionDenied...) or, when it closed before opening, Unavailable with
 * its reason.
 */
export async function dialTunnel(options: DialOptions): Promise<TunnelStream> {
  const { call, responses, close } = openTunnelCall(options.proxyUrl, DIAL_PATH, options.token, DIAL_REQUEST, {
    case: "open",
    value: {
      protocolVersion: { major: 1, minor: 0 },
      jobId: options.jobId,
      portName: options.port,
      hostId: options.hostId ?? "",
      windowSize: options.windowSize,
    },
  });
  // Aborting cuts the call while it opens, the stream once it is open.
  const opening: { stream?: TunnelStream } = {};
  const onAbort = () => {
    if (opening.stream) opening.stream.destroy();
    else call.cancel();
  };
  if (options.signal?.aborted) onAbort();
  else options.signal?.addEventListener("abort", onAbort, { once: true });
  const fail = (err: ConnectError): never => {
    options.signal?.removeEventListener("abort", onAbort);
    call.cancel();
    close();
    throw err;
  };
  let first: IteratorResult<Buffer[]>;
  try {
    first = await responses.next();
  } catch (err) {
    return fail(ConnectError.from(err));
  }
  const payload = first.done ? undefined : decodeTunnelPieces(DIAL_RESPONSE, first.value);
  if (payload?.case !== "opened") {
    if (payload?.case === "closed") return fail(new ConnectError(`tunnel closed: ${(payload.value as TunnelClosed).message}`, Code.Unavailable));
    return fail(new ConnectError("the proxy did not open the tunnel", Code.Unavailable));
  }
  const opened = payload.value as { connectionId: string; exposure: Exposure };
  const tunnel = tunnelDuplex({
    call,
    responses,
    send: DIAL_REQUEST,
    receive: DIAL_RESPONSE,
    onEnd: () => {
      options.signal?.removeEventListener("abort", onAbort);
      close();
    },
  }) as TunnelStream;
  opening.stream = tunnel;
  Object.defineProperties(tunnel, {
    connectionId: { value: opened.connectionId },
    exposure: { value: opened.exposure },
    resize: { value: (cols: number, rows: number) => tunnel.sendControl({ case: "resize", value: { cols, rows } }) },
  });
  return tunnel;
}

/** A terminal, as `process` has: raw-mode input, sized output. */
export interface Terminal {
  stdin: NodeJS.ReadableStream & { isTTY?: boolean; setRawMode?: (mode: boolean) => unknown };
  stdout: NodeJS.WritableStream & { columns?: number; rows?: number; on(event: "resize", listener: () => void): unknown; off(event: "resize", listener: () => void): unknown };
}

/**
 * An interactive session on a tunnel: raw mode (keys go through as typed,
 * ^C included), output to the terminal, the window size sent at start and
 * on every resize. Resolves with the tunnel's close reason, the terminal
 * restored. Pass the terminal's size as `windowSize` to dialTunnel too, so the
 * console starts at the right size.
 */
export async function attachTerminal(tunnel: TunnelStream, terminal: Terminal): Promise<TunnelClosed> {
  const { stdin, stdout } = terminal;
  const raw = stdin.isTTY === true && typeof stdin.setRawMode === "function";
  if (raw) stdin.setRawMode!(true);
  const onResize = () => {
    if (stdout.columns && stdout.rows) tunnel.resize(stdout.columns, stdout.rows);
  };
  stdout.on("resize", onResize);
  onResize();
  const onInput = (chunk: Buffer) => {
    if (!tunnel.write(chunk)) stdin.pause();
  };
  tunnel.on("drain", () => stdin.resume());
  stdin.on("data", onInput);
  stdin.once("end", () => tunnel.end());
  tunnel.pipe(stdout, { end: false });
  tunnel.on("error", () => undefined);
  try {
    return await tunnel.closeReason;
  } finally {
    stdout.off("resize", onResize);
    stdin.off("data", onInput);
    if (raw) stdin.setRawMode!(false);
    stdin.pause();
    tunnel.unpipe(stdout);
  }
}
