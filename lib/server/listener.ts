import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import type { Duplex } from "node:stream";
import { setTimeout as delay } from "node:timers/promises";
import type { Logger } from "../logger.js";
import type { HttpHandler } from "./http.js";

/** What a client speaking HTTP/2 without TLS ("prior knowledge") sends first. */
const H2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");

/**
 * HTTP/2 receive windows. Node's defaults (64 KiB) cap a stream's throughput
 * at window/RTT; FACTS.md: raising only the stream window or only the
 * connection window does nothing, both must grow on the receiving side.
 */
const H2_STREAM_WINDOW = 4 * 1024 * 1024;
const H2_SESSION_WINDOW = 16 * 1024 * 1024;

/** A cleartext connection must show its first bytes within this time. */
const SNIFF_TIMEOUT_MS = 10_000;

export interface ListenerOptions {
  logger: Logger;
  handler: HttpHandler;
  /** PEM certificate and key; without them the port is cleartext. */
  tls?: { cert: string | Buffer; key: string | Buffer };
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
 * it needs to drain them on close().
 */
export class OnePortListener {
  readonly #log: Logger;
  readonly #front: net.Server;
  readonly #h1: http.Server;
  readonly #h2: http2.Http2Server;
  /** Every accepted TCP connection, to force-close what outlives the drain. */
  readonly #sockets = new Set<net.Socket>();
  /** Connections whose protocol is not known yet. */
  readonly #pending = new Set<net.Socket>();
  readonly #sessions = new Set<http2.ServerHttp2Session>();
  /** HTTP/1.1 connections and how many requests each has in progress. */
  readonly #h1Busy = new Map<Duplex, number>();
  #draining = false;

  constructor(options: ListenerOptions) {
    this.#log = options.logger;
    this.#h1 = http.createServer((req, res) => {
      this.#trackH1Request(req, res);
      options.handler(req, res);
    });
    const upgrade = options.upgrade;
    if (upgrade) {
      this.#h1.on("upgrade", (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
        this.#h1Busy.delete(socket);
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
      const front = tls.createServer({ ...options.tls, ALPNProtocols: ["h2", "http/1.1"] });
      front.on("secureConnection", (socket: tls.TLSSocket) => {
        this.#dispatch(socket, socket.alpnProtocol === "h2");
      });
      front.on("tlsClientError", (err) => this.#log.debug({ err }, "tls handshake failed"));
      this.#front = front;
    } else {
      this.#front = net.createServer((socket) => this.#sniff(socket));
    }
    // "connection" gives the TCP socket in both modes (before TLS).
    this.#front.on("connection", (socket: net.Socket) => {
      // RPC answers are small and waited for (acknowledgements, stream
      // messages): Nagle's algorithm would hold each one back until the
      // peer's ACK of the one before. gRPC servers turn it off too.
      socket.setNoDelay(true);
      this.#sockets.add(socket);
      socket.once("close", () => this.#sockets.delete(socket));
    });
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
    for (const [socket, busy] of this.#h1Busy) if (busy === 0) socket.end();

    const timer = new AbortController();
    const drained = await Promise.race([closed.then(() => true), delay(graceMs, false, { signal: timer.signal })]);
    timer.abort(); // clears the timer when the drain won (race already handles its rejection)
    if (drained) return;
    this.#log.warn({ connections: this.#sockets.size }, "grace period over, closing connections");
    beforeForce();
    for (const socket of this.#sockets) socket.destroy();
    await closed;
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
      socket.setTimeout(0);
      this.#pending.delete(socket);
      socket.unshift(head);
      this.#dispatch(socket, isH2);
    };
    socket.on("readable", onReadable);
    socket.on("error", onError);
    socket.setTimeout(SNIFF_TIMEOUT_MS, () => socket.destroy());
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
      this.#h1Busy.set(socket, 0);
      socket.once("close", () => this.#h1Busy.delete(socket));
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
  }

  /** Counts HTTP/1.1 requests per connection so the drain can close idle ones. */
  #trackH1Request(req: http.IncomingMessage, res: http.ServerResponse): void {
    const socket = req.socket;
    this.#h1Busy.set(socket, (this.#h1Busy.get(socket) ?? 0) + 1);
    // Tell the client this connection ends with this response.
    if (this.#draining) res.setHeader("Connection", "close");
    res.once("close", () => {
      const busy = this.#h1Busy.get(socket);
      if (busy === undefined) return; // the connection is already gone
      this.#h1Busy.set(socket, busy - 1);
      if (this.#draining && busy === 1) socket.end();
    });
  }
}
