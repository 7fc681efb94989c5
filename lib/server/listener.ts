import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import type { Duplex } from "node:stream";
import { setTimeout as delay } from "node:timers/promises";
import type { Logger } from "../logger.js";
import type { HttpHandler } from "./http.js";
import type { ConnectionMetrics } from "./metrics.js";

/** What a client speaking HTTP/2 without TLS ("prior knowledge") sends first. */
const H2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");

/**
 * HTTP/2 receive windows. Node's defaults (64 KiB) cap a stream's throughput
 * at window/RTT; FACTS.md: raising only the stream window or only the
 * connection window does nothing, both must grow on the receiving side.
 */
const H2_STREAM_WINDOW = 4 * 1024 * 1024;
const H2_SESSION_WINDOW = 16 * 1024 * 1024;

/**
 * A connection must finish its TLS handshake, or show the first bytes that
 * tell its protocol, within this time (or the idle timeout, if shorter).
 */
const HANDSHAKE_TIMEOUT_MS = 10_000;

/** An idle HTTP/2 session told to go away (GOAWAY) is destroyed if still open after this. */
const GOAWAY_FORCE_MS = 2000;

/** At most one log line per address this often while the address is refused. */
const REFUSAL_LOG_INTERVAL_MS = 60_000;

/** What a listener allows each connection and each client address. */
export interface ConnectionLimits {
  /**
   * A connection with no open stream (HTTP/2) or request (HTTP/1.1) is closed
   * after this long; 0: never. A stream in progress, however quiet (a
   * supervisor's Attach, a log follow, a tunnel), keeps its connection.
   */
  idleTimeoutMs: number;
  /** Connections one client address may hold at once; 0: any number. */
  maxConnectionsPerAddress: number;
}

export interface ListenerOptions {
  logger: Logger;
  handler: HttpHandler;
  /** PEM certificate and key; without them the port is cleartext. */
  tls?: { cert: string | Buffer; key: string | Buffer };
  limits: ConnectionLimits;
  metrics: ConnectionMetrics;
  /**
   * HTTP/1.1 `Upgrade` requests (WebSocket). The handler owns the socket from
   * then on; the drain no longer ends it (the component closes it), only the
   * force after the grace period destroys it. Without a handler, Node answers
   * upgrade requests as plain requests.
   */
  upgrade?: (req: http.IncomingMessage, socket: Duplex, head: Buffer) => void;
}

/**
 * One TCP port for HTTP/1.1 and HTTP/2, so that gRPC (HTTP/2 only), Connect
 * and gRPC-Web (either) reach the same address.
 *
 * A front server accepts each connection and decides its protocol: with TLS by
 * ALPN, in cleartext by looking for the HTTP/2 preface. It then hands the
 * socket to one of two back servers that never listen themselves (an
 * http.Server and an http2 server sharing one request handler). The same path
 * serves both modes, and this class sees every connection and session, which
 * it needs to drain them on close() and to enforce the ConnectionLimits:
 * connections beyond an address's limit are closed as they are accepted, and
 * a connection is closed once it has had no open stream or request for the
 * idle timeout (before its protocol is known: the handshake timeout).
 */
export class OnePortListener {
  readonly #log: Logger;
  readonly #limits: ConnectionLimits;
  readonly #metrics: ConnectionMetrics;
  readonly #handshakeTimeoutMs: number;
  readonly #front: net.Server;
  readonly #tls: tls.Server | undefined;
  readonly #h1: http.Server;
  readonly #h2: http2.Http2Server;
  /** Every accepted TCP connection, to force-close what outlives the drain. */
  readonly #sockets = new Set<net.Socket>();
  /** Cleartext connections whose protocol is not known yet. */
  readonly #pending = new Set<net.Socket>();
  readonly #sessions = new Set<http2.ServerHttp2Session>();
  /** HTTP/1.1 connections: requests in progress, and the idle timer while there are none. */
  readonly #h1Connections = new Map<Duplex, { busy: number; idle?: NodeJS.Timeout }>();
  /** Open connections per client address (only addresses that hold one). */
  readonly #byAddress = new Map<string, { open: number; refused: number; loggedAt: number }>();
  #draining = false;

  constructor(options: ListenerOptions) {
    this.#log = options.logger;
    this.#limits = options.limits;
    this.#metrics = options.metrics;
    this.#handshakeTimeoutMs = options.limits.idleTimeoutMs > 0 ? Math.min(HANDSHAKE_TIMEOUT_MS, options.limits.idleTimeoutMs) : HANDSHAKE_TIMEOUT_MS;
    this.#h1 = http.createServer((req, res) => {
      this.#trackH1Request(req, res);
      options.handler(req, res);
    });
    // The idle timer below closes idle HTTP/1.1 connections, as it does the
    // HTTP/2 ones; Node's own keep-alive timeout would be a second clock.
    this.#h1.keepAliveTimeout = 0;
    const upgrade = options.upgrade;
    if (upgrade) {
      this.#h1.on("upgrade", (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
        // The component owns the socket now, and its idleness.
        clearTimeout(this.#h1Connections.get(socket)?.idle);
        this.#h1Connections.delete(socket);
        if (this.#draining) {
          socket.destroy();
          return;
        }
        upgrade(req, socket, head);
      });
    }
    this.#h2 = http2.createServer({ settings: { initialWindowSize: H2_STREAM_WINDOW } }, options.handler);
    this.#h2.on("session", (session) => this.#onSession(session));

    if (options.tls) {
      // Like the back servers, the TLS server never listens: the front hands
      // it each connection it accepts, so that limits apply before TLS.
      this.#tls = tls.createServer({ ...options.tls, ALPNProtocols: ["h2", "http/1.1"], handshakeTimeout: this.#handshakeTimeoutMs });
      this.#tls.on("secureConnection", (socket: tls.TLSSocket) => {
        this.#dispatch(socket, socket.alpnProtocol === "h2");
      });
      this.#tls.on("tlsClientError", (err: NodeJS.ErrnoException, socket: tls.TLSSocket) => {
        if (err.code === "ERR_TLS_HANDSHAKE_TIMEOUT") this.#metrics.closedIdle();
        this.#log.debug({ err }, "tls handshake failed");
        // Node leaves a connection whose handshake timed out open once
        // anyone listens for this event.
        socket.destroy();
      });
    }
    this.#front = net.createServer((socket) => this.#accept(socket));
  }

  /** Binds; rejects if the address is taken. */
  listen(host: string, port: number): Promise<net.AddressInfo> {
    return new Promise((resolve, reject) => {
      const onError = (err: Error) => reject(err);
      this.#front.once("error", onError);
      this.#front.listen({ host, port }, () => {
        this.#front.off("error", onError);
        this.#front.on("error", (err) => this.#log.error({ err }, "listener failed"));
        resolve(this.#front.address() as net.AddressInfo);
      });
    });
  }

  /**
   * Stops accepting connections and drains the open ones: HTTP/2 sessions get
   * GOAWAY (their open streams may finish), idle HTTP/1.1 connections close,
   * busy ones close after their response. After `graceMs`, `beforeForce` runs
   * (to let handlers know) and every remaining connection is destroyed.
   * Resolves when every connection is gone.
   */
  async close(graceMs: number, beforeForce: () => void): Promise<void> {
    this.#draining = true;
    const closed = new Promise<void>((resolve) => this.#front.close(() => resolve()));
    for (const socket of this.#pending) socket.destroy();
    for (const session of this.#sessions) session.close();
    for (const [socket, connection] of this.#h1Connections) {
      clearTimeout(connection.idle);
      if (connection.busy === 0) socket.end();
    }

    const timer = new AbortController();
    const drained = await Promise.race([closed.then(() => true), delay(graceMs, false, { signal: timer.signal })]);
    timer.abort(); // clears the timer when the drain won (race already handles its rejection)
    if (drained) return;
    this.#log.warn({ connections: this.#sockets.size }, "grace period over, closing connections");
    beforeForce();
    for (const socket of this.#sockets) socket.destroy();
    await closed;
  }

  /** Counts a new TCP connection against its address's limit; hands it on, or closes it at once. */
  #accept(socket: net.Socket): void {
    const address = clientAddress(socket);
    const limit = this.#limits.maxConnectionsPerAddress;
    const entry = this.#byAddress.get(address) ?? { open: 0, refused: 0, loggedAt: -Infinity };
    if (limit > 0 && entry.open >= limit) {
      socket.destroy();
      this.#metrics.refused();
      entry.refused++;
      const now = performance.now();
      if (now - entry.loggedAt >= REFUSAL_LOG_INTERVAL_MS) {
        this.#log.warn({ address, limit, refused: entry.refused }, "connections refused: the address holds its limit of connections");
        entry.loggedAt = now;
        entry.refused = 0;
      }
      return;
    }
    entry.open++;
    this.#byAddress.set(address, entry);
    this.#sockets.add(socket);
    this.#metrics.opened();
    socket.once("close", () => {
      this.#sockets.delete(socket);
      this.#metrics.closed();
      if (--entry.open === 0) this.#byAddress.delete(address);
    });
    // RPC answers are small and waited for (acknowledgements, stream
    // messages): Nagle's algorithm would hold each one back until the
    // peer's ACK of the one before. gRPC servers turn it off too.
    socket.setNoDelay(true);
    if (this.#tls) this.#tls.emit("connection", socket);
    else this.#sniff(socket);
  }

  /**
   * Reads the first bytes of a cleartext connection and puts them back before
   * handing the socket on. The http2 session takes the bytes already read
   * from the socket's buffer, so unshift() is safe on both paths.
   */
  #sniff(socket: net.Socket): void {
    this.#pending.add(socket);
    let head = Buffer.alloc(0);
    const onError = (err: Error) => {
      this.#log.debug({ err }, "connection failed before its first request");
      socket.destroy();
    };
    const onReadable = () => {
      for (let chunk: Buffer | null; (chunk = socket.read() as Buffer | null) !== null; ) {
        head = Buffer.concat([head, chunk]);
      }
      const n = Math.min(head.length, H2_PREFACE.length);
      const isH2 = head.subarray(0, n).equals(H2_PREFACE.subarray(0, n));
      // Still a prefix of the preface (or nothing yet): wait for more bytes.
      if (isH2 && head.length < H2_PREFACE.length) return;
      socket.off("readable", onReadable);
      socket.off("error", onError);
      clearTimeout(timer);
      this.#pending.delete(socket);
      socket.unshift(head);
      this.#dispatch(socket, isH2);
    };
    socket.on("readable", onReadable);
    socket.on("error", onError);
    const timer = setTimeout(() => {
      this.#metrics.closedIdle();
      socket.destroy();
    }, this.#handshakeTimeoutMs).unref();
    socket.once("close", () => clearTimeout(timer));
  }

  #dispatch(socket: net.Socket | tls.TLSSocket, isH2: boolean): void {
    // A connection that got through the handshake or sniffing after the drain
    // began is not served.
    if (this.#draining) {
      socket.destroy();
      return;
    }
    if (isH2) {
      this.#h2.emit("connection", socket);
    } else {
      const connection: { busy: number; idle?: NodeJS.Timeout } = { busy: 0 };
      this.#h1Connections.set(socket, connection);
      this.#armH1Idle(socket, connection);
      socket.once("close", () => {
        clearTimeout(connection.idle);
        this.#h1Connections.delete(socket);
      });
      this.#h1.emit("connection", socket);
    }
  }

  #onSession(session: http2.ServerHttp2Session): void {
    this.#sessions.add(session);
    session.once("close", () => this.#sessions.delete(session));
    // The connection-level window is not a setting: it grows by a
    // WINDOW_UPDATE that this call sends.
    session.setLocalWindowSize(H2_SESSION_WINDOW);
    if (this.#draining) session.close();
    else this.#watchSessionIdle(session);
  }

  /**
   * Closes a session once it has had no open stream for the idle timeout:
   * GOAWAY (a client opens its next call on a new connection), then, if the
   * peer does not let it close, destroyed. A stream in progress, however
   * quiet, keeps the session. A call that crosses the GOAWAY is refused
   * unprocessed (REFUSED_STREAM; nghttp2 here sends no shutdown notice), and
   * the clients in lib/ send it again (`refusedStreamRetry`).
   */
  #watchSessionIdle(session: http2.ServerHttp2Session): void {
    const ms = this.#limits.idleTimeoutMs;
    if (ms === 0) return;
    let open = 0;
    let timer: NodeJS.Timeout | undefined;
    const onIdle = () => {
      this.#metrics.closedIdle();
      session.close();
      timer = setTimeout(() => session.destroy(), GOAWAY_FORCE_MS).unref();
    };
    session.on("stream", (stream: http2.ServerHttp2Stream) => {
      open++;
      clearTimeout(timer);
      stream.once("close", () => {
        if (--open === 0 && !session.closed && !session.destroyed) timer = setTimeout(onIdle, ms).unref();
      });
    });
    session.once("close", () => clearTimeout(timer));
    timer = setTimeout(onIdle, ms).unref();
  }

  /** Starts the idle timer of an HTTP/1.1 connection with no request in progress. */
  #armH1Idle(socket: Duplex, connection: { busy: number; idle?: NodeJS.Timeout }): void {
    const ms = this.#limits.idleTimeoutMs;
    if (ms === 0 || this.#draining) return;
    clearTimeout(connection.idle);
    connection.idle = setTimeout(() => {
      this.#metrics.closedIdle();
      socket.destroy();
    }, ms).unref();
  }

  /** Counts HTTP/1.1 requests per connection so the drain and the idle timer can close idle ones. */
  #trackH1Request(req: http.IncomingMessage, res: http.ServerResponse): void {
    const socket = req.socket;
    const connection = this.#h1Connections.get(socket);
    if (connection) {
      connection.busy++;
      clearTimeout(connection.idle);
    }
    // Tell the client this connection ends with this response, or how long
    // it may stay idle (what Node says by itself for its own keep-alive timer).
    if (this.#draining) res.setHeader("Connection", "close");
    else if (this.#limits.idleTimeoutMs > 0) res.setHeader("Keep-Alive", `timeout=${Math.floor(this.#limits.idleTimeoutMs / 1000)}`);
    res.once("close", () => {
      if (!connection || this.#h1Connections.get(socket) !== connection) return; // gone, or upgraded
      connection.busy--;
      if (connection.busy > 0) return;
      if (this.#draining) socket.end();
      else this.#armH1Idle(socket, connection);
    });
  }
}

/**
 * The address a connection's limit is counted against: its peer's IP, an
 * IPv4-mapped IPv6 address as the IPv4 address it is.
 */
function clientAddress(socket: net.Socket): string {
  const address = socket.remoteAddress ?? "unknown";
  return address.startsWith("::ffff:") && net.isIPv4(address.slice(7)) ? address.slice(7) : address;
}
