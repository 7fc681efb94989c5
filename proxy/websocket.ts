/**
 * The browser entrance's WebSocket (RFC 6455), on the `ws` package: the
 * handshake checks that word the proxy's own refusals, then `ws` for the
 * framing (masking, fragmentation, ping/pong, close, UTF-8 and size limits).
 * What the entrance needs on top: the client's messages pulled one at a time
 * (the socket is paused while one waits, so TCP pushes back) and sends that
 * resolve when the socket has room.
 *
 * It replaces a hand-written framing that had no measured reason: in
 * `npm run bench -- proxy` (64 MB cases, five runs each, alternated, on a
 * 2-core machine at load 8-10) one WebSocket entrance connection echoed at
 * 16-36 MB/s (median 31) with the hand-written framing and 19-57 MB/s
 * (median 28) on `ws`, and the 64-byte round trip p50 was 185-397 us (median
 * 219) against 197-291 us (median 220): the same within the noise.
 */
import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import { WebSocketServer, type WebSocket as WsSocket } from "ws";

/** A message from the client. */
export type WebSocketMessage = { type: "binary"; data: Buffer } | { type: "text"; text: string };

/** Thrown by `messages()` when the client breaks the protocol; `ws` has closed the connection (1002, 1007 or 1009). */
export class WebSocketProtocolError extends Error {}

/** Answers a request that cannot be upgraded, then closes the socket. */
export function refuseUpgrade(socket: Duplex, status: number, reason: string, message: string): void {
  const body = `${message}\n`;
  socket.end(
    `HTTP/1.1 ${status} ${reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}

/** Why a request is not a WebSocket handshake this server accepts, or undefined. */
export function handshakeProblem(req: IncomingMessage): string | undefined {
  if (req.method !== "GET") return "a websocket handshake is a GET";
  if ((req.headers.upgrade ?? "").toLowerCase() !== "websocket") return "upgrade must be websocket";
  if (req.headers["sec-websocket-version"] !== "13") return "sec-websocket-version must be 13";
  const key = req.headers["sec-websocket-key"];
  if (typeof key !== "string" || Buffer.from(key, "base64").length !== 16) return "sec-websocket-key is missing or malformed";
  return undefined;
}

/** The offered subprotocols of a handshake. */
export function offeredProtocols(req: IncomingMessage): string[] {
  const header = req.headers["sec-websocket-protocol"];
  if (header === undefined) return [];
  return (Array.isArray(header) ? header.join(",") : header)
    .split(",")
    .map((p) => p.trim())
    .filter((p) => p !== "");
}

/** A send waits for room once this much is queued (the socket's own high-water mark). */
const SEND_BUFFER_BYTES = 16 * 1024;

/** A server-side WebSocket on an upgraded socket. */
export class WebSocket {
  #error: WebSocketProtocolError | undefined;
  #closed = false;

  private constructor(
    readonly socket: Duplex,
    private readonly ws: WsSocket,
  ) {
    // A protocol error: `ws` closes the connection; messages() says why.
    ws.on("error", (err: Error) => {
      this.#error ??= new WebSocketProtocolError(err.message);
    });
    ws.once("close", () => (this.#closed = true));
  }

  /**
   * Completes the handshake (101) on a request that passed handshakeProblem();
   * undefined when the socket is gone already.
   */
  static accept(
    req: IncomingMessage,
    socket: Duplex,
    head: Buffer,
    options: { protocol?: string; maxMessageBytes?: number } = {},
  ): Promise<WebSocket | undefined> {
    const server = new WebSocketServer({
      noServer: true,
      clientTracking: false,
      maxPayload: options.maxMessageBytes ?? 1024 * 1024,
      handleProtocols: () => options.protocol ?? false,
    });
    return new Promise((resolve) => {
      socket.once("close", () => resolve(undefined));
      server.handleUpgrade(req, socket, head, (ws) => resolve(new WebSocket(socket, ws)));
    });
  }

  /**
   * The client's messages. Ends when the client sends a close frame (answered)
   * or the socket ends; throws WebSocketProtocolError on a protocol error.
   */
  async *messages(): AsyncGenerator<WebSocketMessage> {
    const queue: WebSocketMessage[] = [];
    let wake: (() => void) | undefined;
    const onMessage = (data: Buffer, isBinary: boolean) => {
      queue.push(isBinary ? { type: "binary", data } : { type: "text", text: data.toString("utf8") });
      // Read no more from the socket until this one is taken.
      this.ws.pause();
      wake?.();
    };
    const onEnd = () => wake?.();
    this.ws.on("message", onMessage);
    this.ws.on("close", onEnd);
    this.ws.on("error", onEnd);
    try {
      for (;;) {
        const next = queue.shift();
        if (next !== undefined) {
          if (queue.length === 0) this.ws.resume();
          yield next;
          continue;
        }
        if (this.#error) throw this.#error;
        if (this.#closed) return;
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
      }
    } finally {
      this.ws.off("message", onMessage);
      this.ws.off("close", onEnd);
      this.ws.off("error", onEnd);
    }
  }

  /** Sends a binary message; resolves when the socket has room, false once closed. */
  sendBinary(data: Uint8Array): Promise<boolean> {
    return this.#send(data, true);
  }

  /** Sends a text message; resolves when the socket has room, false once closed. */
  sendText(text: string): Promise<boolean> {
    return this.#send(Buffer.from(text, "utf8"), false);
  }

  #send(data: Uint8Array, binary: boolean): Promise<boolean> {
    if (this.ws.readyState !== this.ws.OPEN) return Promise.resolve(false);
    return new Promise<boolean>((resolve) => {
      const onClose = () => resolve(false);
      this.ws.send(data, { binary }, (err) => {
        this.ws.off("close", onClose);
        resolve(!err);
      });
      // Room left: go on at once; otherwise when this message has gone out.
      if (this.ws.bufferedAmount <= SEND_BUFFER_BYTES) resolve(true);
      else this.ws.once("close", onClose);
    });
  }

  /**
   * Sends a close frame (once) after what is queued; the client answers and
   * `ws` ends the socket. `reason` is cut to the 123 bytes a close frame allows.
   */
  close(code: number, reason: string): void {
    if (this.ws.readyState !== this.ws.OPEN) return;
    let text = Buffer.from(reason, "utf8");
    if (text.length > 123) text = text.subarray(0, 120);
    this.ws.close(code, text);
  }

  /** Cuts the connection at once. */
  destroy(): void {
    this.ws.terminate();
  }
}
