/**
 * The client side of a rendezvous proxy (DESIGN.md §8, docs/proxy.md):
 * `dialTunnel` opens `TunnelService.Dial` and returns a Node Duplex of the
 * exposure's bytes (what `tml console` and `tml port-forward` pipe to a
 * terminal or a local socket), and `attachTerminal` runs an interactive
 * console session on it. Also the pieces the supervisor's side shares: a
 * bounded outbox for a bidi call's requests and an HTTP/2 transport with
 * wide flow-control windows on its own connection.
 */
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import { Duplex } from "node:stream";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import { CloseReason, type Exposure } from "../gen/treadmill/proxy/v1/tunnel_pb.js";
import { type DialRequest, DialRequestSchema, TunnelService } from "../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { bearerInterceptor } from "./coordinator-client.js";

/** Largest data message of the tunnel protocols. */
export const TUNNEL_CHUNK = 64 * 1024;

/** HTTP/2 receive windows of tunnel clients (FACTS.md: both must grow on the receiving side). */
const STREAM_WINDOW = 4 * 1024 * 1024;
const SESSION_WINDOW = 16 * 1024 * 1024;

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

/** An Http2SessionManager whose connection-level receive window is wide (connect-node has no option for it). */
class WideSessionManager extends Http2SessionManager {
  readonly #tuned = new WeakSet<http2.Http2Session>();

  override async request(...args: Parameters<Http2SessionManager["request"]>): Promise<http2.ClientHttp2Stream> {
    const stream = await super.request(...args);
    // Connect stops listening once a call is done; closing the connection
    // afterwards must not turn a late stream error into a crash.
    stream.on("error", () => undefined);
    const session = stream.session;
    if (session && !this.#tuned.has(session)) {
      this.#tuned.add(session);
      session.setLocalWindowSize(SESSION_WINDOW);
    }
    return stream;
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
    createConnection: (authority: URL) => {
      const port = Number(authority.port || (authority.protocol === "https:" ? 443 : 80));
      const host = authority.hostname.replace(/^\[|\]$/g, "");
      const socket =
        authority.protocol === "https:"
          ? tls.connect({ host, port, servername: net.isIP(host) ? undefined : host, ALPNProtocols: ["h2"] })
          : net.connect({ host, port });
      socket.setNoDelay(true);
      return socket;
    },
  });
  const transport = createGrpcTransport({
    baseUrl: url,
    sessionManager,
    interceptors: [bearerInterceptor(token)],
    acceptCompression: [],
  });
  return { transport, close: () => sessionManager.abort() };
}

/** How a tunnel ended. */
export interface TunnelClosed {
  reason: CloseReason;
  message: string;
}

/** The bytes of one exposure, as a Node Duplex; `end()` half-closes. */
export interface TunnelStream extends Duplex {
  /** The proxy's id of the connection. */
  readonly connectionId: string;
  /** The exposure reached (kind, whether resizable). */
  readonly exposure: Exposure;
  /** Tells a resizable console the terminal's size (ignored otherwise). */
  resize(cols: number, rows: number): void;
  /** Resolves when the tunnel has ended, with the proxy's reason. */
  readonly closeReason: Promise<TunnelClosed>;
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
  const { transport, close: closeTransport } = tunnelTransport(options.proxyUrl, () => options.token);
  const client = createClient(TunnelService, transport);
  const controller = new AbortController();
  const onAbort = () => controller.abort(options.signal?.reason);
  options.signal?.addEventListener("abort", onAbort, { once: true });
  const requests = new Outbox<DialRequest>(256 * 1024, (r) => (r.payload.case === "data" ? r.payload.value.byteLength : 32));
  void requests.push(
    create(DialRequestSchema, {
      payload: {
        case: "open",
        value: {
          protocolVersion: { major: 1, minor: 0 },
          jobId: options.jobId,
          portName: options.port,
          hostId: options.hostId ?? "",
          windowSize: options.windowSize,
        },
      },
    }),
  );
  const cleanup = () => {
    options.signal?.removeEventListener("abort", onAbort);
    requests.end();
    controller.abort();
    closeTransport();
  };
  const responses = client.dial(requests.drain(), { signal: controller.signal })[Symbol.asyncIterator]();
  let first;
  try {
    first = await responses.next();
  } catch (err) {
    cleanup();
    throw ConnectError.from(err);
  }
  if (first.done || first.value.payload.case !== "opened") {
    cleanup();
    if (!first.done && first.value.payload.case === "closed") {
      throw new ConnectError(`tunnel closed: ${first.value.payload.value.message}`, Code.Unavailable);
    }
    throw new ConnectError("the proxy did not open the tunnel", Code.Unavailable);
  }
  const opened = first.value.payload.value;
  const closed = deferred<TunnelClosed>();
  let reading: Promise<void> | undefined;
  let wantMore: (() => void) | undefined;

  const stream = new Duplex({
    allowHalfOpen: true,
    // Ended both ways is not the end of the tunnel: its close (with the
    // reason) follows; the pump destroys the stream then.
    autoDestroy: false,
    write(chunk: Buffer, _encoding, callback) {
      void (async () => {
        for (let at = 0; at < chunk.byteLength; at += TUNNEL_CHUNK) {
          const value = chunk.subarray(at, at + TUNNEL_CHUNK);
          if (!(await requests.push(create(DialRequestSchema, { payload: { case: "data", value } })))) {
            callback(new Error("tunnel closed"));
            return;
          }
        }
        callback();
      })();
    },
    final(callback) {
      void requests.push(create(DialRequestSchema, { payload: { case: "halfClose", value: {} } })).then(() => callback());
    },
    read() {
      const waiter = wantMore;
      wantMore = undefined;
      waiter?.();
      reading ??= pump();
    },
    destroy(err, callback) {
      closed.resolve({ reason: CloseReason.CLIENT_GONE, message: "destroyed by the client" });
      cleanup();
      callback(err);
    },
  }) as unknown as TunnelStream;

  const pump = async () => {
    try {
      for (;;) {
        const next = await responses.next();
        if (next.done) {
          closed.resolve({ reason: CloseReason.SUPERVISOR_GONE, message: "the proxy ended the tunnel without a reason" });
          break;
        }
        const { payload } = next.value;
        if (payload.case === "data") {
          if (!stream.push(payload.value)) await new Promise<void>((resolve) => (wantMore = resolve));
        } else if (payload.case === "halfClose") {
          stream.push(null);
        } else if (payload.case === "closed") {
          closed.resolve({ reason: payload.value.reason, message: payload.value.message });
          break;
        }
      }
      cleanup();
      // Destroyed once the reader has had every byte.
      if (stream.readableEnded) stream.destroy();
      else {
        stream.once("end", () => stream.destroy());
        stream.push(null);
      }
    } catch (err) {
      closed.resolve({ reason: CloseReason.SUPERVISOR_GONE, message: ConnectError.from(err).rawMessage });
      stream.destroy(ConnectError.from(err));
    }
  };

  Object.defineProperties(stream, {
    connectionId: { value: opened.connectionId },
    exposure: { value: opened.exposure },
    closeReason: { value: closed.promise },
    resize: {
      value: (cols: number, rows: number) => {
        void requests.push(create(DialRequestSchema, { payload: { case: "resize", value: { cols, rows } } }));
      },
    },
  });
  return stream;
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
