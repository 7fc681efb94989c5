/**
 * The client side of a rendezvous proxy (DESIGN.md §8, docs/proxy.md):
 * `dialTunnel` opens `TunnelService.Dial` and returns a Node Duplex of the
 * exposure's bytes (what `tml console` and `tml port-forward` pipe to a
 * terminal or a local socket), and `attachTerminal` runs an interactive
 * console session on it. The supervisor's side of `Tunnel` uses the same
 * pieces: `openTunnelCall` and `tunnelDuplex` over a raw gRPC call
 * (lib/grpc/client.ts), and `tunnelTransport`, an HTTP/2 transport with wide
 * flow-control windows on its own connection (the control stream). The
 * messages' codec, which the proxy shares, is lib/tunnel/wire.ts.
 *
 * Byte streams go through a hand-framed gRPC call rather than connect-node,
 * whose per-message cost held a tunnel to about a tenth of loopback TCP
 * (docs/proxy.md "Throughput").
 */
import { Duplex } from "node:stream";
import { Code, ConnectError, type Transport } from "@connectrpc/connect";
import { CloseReason, type Exposure } from "../../gen/treadmill/proxy/v1/tunnel_pb.js";
import { deferred } from "../async/deferred.js";
import { STREAM_WINDOW, WideSessionManager, connectHttp2, dialSocket, openRawCall, type RawClientCall } from "../grpc/client.js";
import { clientTransport } from "../grpc/transport.js";
import { PUBLIC_ROOTS, type ClientTls } from "../grpc/trust.js";
import { PROTOCOL_VERSION } from "../protocol.js";
import {
  DIAL_PATH,
  DIAL_REQUEST,
  DIAL_RESPONSE,
  MAX_TUNNEL_MESSAGE,
  TUNNEL_BATCH_BYTES,
  decodeTunnelPieces,
  encodeTunnelMessage,
  writeData,
  type TunnelClosed,
  type TunnelPayload,
  type TunnelWire,
} from "./wire.js";

/**
 * A gRPC transport on its own HTTP/2 connection with wide receive windows and
 * no compression, for one byte stream (or one control stream): a stalled
 * stream then holds back only its own connection's windows, never another
 * tunnel's. An https proxy is verified with `tls`. `close()` drops the
 * connection.
 */
export function tunnelTransport(url: string, token: () => string, tls: ClientTls = PUBLIC_ROOTS): { transport: Transport; close(): void } {
  const sessionManager = new WideSessionManager(url, undefined, {
    settings: { initialWindowSize: STREAM_WINDOW },
    // Small messages (keystrokes, echoes) go out at once, not behind Nagle.
    createConnection: (authority: URL) => dialSocket(authority, tls),
  });
  const transport = clientTransport({ baseUrl: url, sessionManager, token, acceptCompression: [] });
  return { transport, close: () => sessionManager.abort() };
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
 * tunnel's) and sends `open` as its first message. An https proxy is
 * verified with `tls`.
 */
export function openTunnelCall(
  url: string,
  path: string,
  token: string,
  send: TunnelWire,
  open: TunnelPayload,
  tls: ClientTls = PUBLIC_ROOTS,
): { call: RawClientCall; responses: AsyncGenerator<Buffer[]>; close(): void } {
  const session = connectHttp2(url, tls);
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
  /** The CAs an https proxy is verified with (the tml context's); default Node's roots. */
  tls?: ClientTls;
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
      protocolVersion: PROTOCOL_VERSION,
      jobId: options.jobId,
      portName: options.port,
      hostId: options.hostId ?? "",
      windowSize: options.windowSize,
    },
  }, options.tls);
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
