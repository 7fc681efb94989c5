/**
 * The server side of the WebSocket protocol (RFC 6455), as much as the
 * browser entrance needs: the opening handshake, masked client frames,
 * fragmentation, ping/pong, close; binary and text messages out. Reads are
 * pulled from the socket (TCP backpressure); writes wait for drain.
 */
import { createHash } from "node:crypto";
import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const OP_CONTINUATION = 0x0;
const OP_TEXT = 0x1;
const OP_BINARY = 0x2;
const OP_CLOSE = 0x8;
const OP_PING = 0x9;
const OP_PONG = 0xa;

/** A message from the client. */
export type WebSocketMessage = { type: "binary"; data: Buffer } | { type: "text"; text: string };

/** Thrown by `messages()` when the client breaks the protocol; the connection has been closed with `code`. */
export class WebSocketProtocolError extends Error {
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(message);
  }
}

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

/** A server-side WebSocket on an upgraded socket. */
export class WebSocket {
  #closeSent = false;
  #closed = false;
  readonly #maxMessageBytes: number;

  private constructor(
    readonly socket: Duplex,
    private head: Buffer,
    maxMessageBytes: number,
  ) {
    this.#maxMessageBytes = maxMessageBytes;
    socket.on("error", () => socket.destroy());
    socket.once("close", () => (this.#closed = true));
  }

  /** Completes the handshake (101) on a request that passed handshakeProblem(). */
  static accept(
    req: IncomingMessage,
    socket: Duplex,
    head: Buffer,
    options: { protocol?: string; maxMessageBytes?: number } = {},
  ): WebSocket {
    const accept = createHash("sha1")
      .update(`${req.headers["sec-websocket-key"] as string}${GUID}`)
      .digest("base64");
    const lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade", `Sec-WebSocket-Accept: ${accept}`];
    if (options.protocol !== undefined) lines.push(`Sec-WebSocket-Protocol: ${options.protocol}`);
    socket.write(`${lines.join("\r\n")}\r\n\r\n`);
    if ("setNoDelay" in socket && typeof socket.setNoDelay === "function") socket.setNoDelay(true);
    return new WebSocket(socket, head, options.maxMessageBytes ?? 1024 * 1024);
  }

  get isClosed(): boolean {
    return this.#closed;
  }

  /**
   * The client's messages. Ends when the client sends a close frame (answered)
   * or the socket ends; throws WebSocketProtocolError on a protocol error.
   */
  async *messages(): AsyncGenerator<WebSocketMessage> {
    let buffer = this.head;
    this.head = Buffer.alloc(0);
    let fragments: Buffer[] = [];
    let fragmentBytes = 0;
    let fragmentOp = 0;
    const chunks = (this.socket as Duplex & { iterator(o: { destroyOnReturn: boolean }): AsyncIterable<Buffer> }).iterator({
      destroyOnReturn: false,
    });
    const it = chunks[Symbol.asyncIterator]();
    const fail = (code: number, message: string): never => {
      this.close(code, message);
      throw new WebSocketProtocolError(code, message);
    };
    for (;;) {
      // Parse every complete frame in the buffer.
      for (;;) {
        if (buffer.length < 2) break;
        const b0 = buffer[0];
        const b1 = buffer[1];
        const fin = (b0 & 0x80) !== 0;
        const opcode = b0 & 0x0f;
        if ((b0 & 0x70) !== 0) fail(1002, "reserved bits set");
        if ((b1 & 0x80) === 0) fail(1002, "client frames must be masked");
        let length = b1 & 0x7f;
        let at = 2;
        if (length === 126) {
          if (buffer.length < 4) break;
          length = buffer.readUInt16BE(2);
          at = 4;
        } else if (length === 127) {
          if (buffer.length < 10) break;
          const big = buffer.readBigUInt64BE(2);
          if (big > BigInt(this.#maxMessageBytes)) fail(1009, "message too big");
          length = Number(big);
          at = 10;
        }
        if (length > this.#maxMessageBytes) fail(1009, "message too big");
        if (buffer.length < at + 4 + length) break;
        const mask = buffer.subarray(at, at + 4);
        const payload = Buffer.from(buffer.subarray(at + 4, at + 4 + length));
        for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3];
        buffer = buffer.subarray(at + 4 + length);

        if (opcode >= 0x8) {
          if (!fin || length > 125) fail(1002, "bad control frame");
          if (opcode === OP_PING) this.#sendFrame(OP_PONG, payload);
          else if (opcode === OP_CLOSE) {
            const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1000;
            this.close(code === 1005 || code === 1006 ? 1000 : code, "");
            return;
          } else if (opcode !== OP_PONG) fail(1002, "unknown control frame");
          continue;
        }
        if (opcode === OP_CONTINUATION) {
          if (fragmentOp === 0) fail(1002, "continuation without a message");
        } else if (opcode === OP_TEXT || opcode === OP_BINARY) {
          if (fragmentOp !== 0) fail(1002, "new message inside a fragmented one");
          fragmentOp = opcode;
        } else {
          fail(1002, "unknown opcode");
        }
        fragments.push(payload);
        fragmentBytes += payload.length;
        if (fragmentBytes > this.#maxMessageBytes) fail(1009, "message too big");
        if (!fin) continue;
        const data = fragments.length === 1 ? fragments[0] : Buffer.concat(fragments);
        const op = fragmentOp;
        fragments = [];
        fragmentBytes = 0;
        fragmentOp = 0;
        if (op === OP_BINARY) yield { type: "binary", data };
        else {
          const text = new TextDecoder("utf-8", { fatal: true });
          let decoded: string;
          try {
            decoded = text.decode(data);
          } catch {
            return fail(1007, "text message is not utf-8");
          }
          yield { type: "text", text: decoded };
        }
      }
      const next = await it.next();
      if (next.done) return;
      buffer = buffer.length === 0 ? next.value : Buffer.concat([buffer, next.value]);
    }
  }

  /** Sends a binary message; resolves when the socket has room, false once closed. */
  sendBinary(data: Uint8Array): Promise<boolean> {
    return this.#send(OP_BINARY, data);
  }

  /** Sends a text message; resolves when the socket has room, false once closed. */
  sendText(text: string): Promise<boolean> {
    return this.#send(OP_TEXT, Buffer.from(text, "utf8"));
  }

  async #send(opcode: number, data: Uint8Array): Promise<boolean> {
    if (this.#closeSent || this.#closed) return false;
    if (this.#sendFrame(opcode, data)) return true;
    return new Promise<boolean>((resolve) => {
      const done = (ok: boolean) => {
        this.socket.off("drain", onDrain);
        this.socket.off("close", onClose);
        resolve(ok);
      };
      const onDrain = () => done(true);
      const onClose = () => done(false);
      this.socket.on("drain", onDrain);
      this.socket.on("close", onClose);
    });
  }

  /** Writes one unmasked frame; false when the socket's buffer is full. */
  #sendFrame(opcode: number, data: Uint8Array): boolean {
    if (this.#closed || this.socket.writableEnded) return false;
    let header: Buffer;
    if (data.length < 126) {
      header = Buffer.from([0x80 | opcode, data.length]);
    } else if (data.length < 65536) {
      header = Buffer.alloc(4);
      header[0] = 0x80 | opcode;
      header[1] = 126;
      header.writeUInt16BE(data.length, 2);
    } else {
      header = Buffer.alloc(10);
      header[0] = 0x80 | opcode;
      header[1] = 127;
      header.writeBigUInt64BE(BigInt(data.length), 2);
    }
    this.socket.write(header);
    return this.socket.write(data);
  }

  /**
   * Sends a close frame (once) after what is queued and ends the socket's
   * sending side; the client answers and closes. `reason` is cut to the
   * 123 bytes a close frame allows.
   */
  close(code: number, reason: string): void {
    if (this.#closeSent || this.#closed) return;
    this.#closeSent = true;
    let text = Buffer.from(reason, "utf8");
    if (text.length > 123) text = text.subarray(0, 120);
    const payload = Buffer.alloc(2 + text.length);
    payload.writeUInt16BE(code, 0);
    text.copy(payload, 2);
    this.#sendFrame(OP_CLOSE, payload);
    this.socket.end();
  }

  /** Cuts the connection at once. */
  destroy(): void {
    this.socket.destroy();
  }
}
