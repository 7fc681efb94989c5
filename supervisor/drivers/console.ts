/**
 * A console bridged to a host-local TCP port: every byte of the console goes
 * to every connected client, and whatever a client sends goes to the console's
 * input. Several clients may be attached at once (a user's terminal and the
 * proxy's tunnel, say); none gets the history (that is in the log server).
 */

import { createServer, type AddressInfo, type Server, type Socket } from "node:net";
import type { Logger } from "../../lib/logger.js";

/** A client further behind than this is disconnected rather than buffered without bound. */
const MAX_CLIENT_BACKLOG = 4 * 1024 * 1024;

export class ConsoleBridge {
  private readonly clients = new Set<Socket>();
  private server: Server | undefined;
  private closed = false;

  private constructor(
    private readonly onInput: (bytes: Buffer) => void,
    private readonly logger: Logger,
  ) {}

  /** Listens on 127.0.0.1 (port 0 picks a free one). */
  static async listen(options: { port?: number; onInput: (bytes: Buffer) => void; logger: Logger }): Promise<ConsoleBridge> {
    const bridge = new ConsoleBridge(options.onInput, options.logger);
    const server = createServer((socket) => bridge.accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen({ host: "127.0.0.1", port: options.port ?? 0 }, () => {
        server.off("error", reject);
        resolve();
      });
    });
    bridge.server = server;
    return bridge;
  }

  /** The port clients connect to. */
  get port(): number {
    return (this.server!.address() as AddressInfo).port;
  }

  /** Clients connected now. */
  get clientCount(): number {
    return this.clients.size;
  }

  private accept(socket: Socket): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    this.clients.add(socket);
    this.logger.debug({ clients: this.clients.size }, "console client attached");
    socket.on("data", (bytes: Buffer) => this.onInput(bytes));
    socket.on("error", () => socket.destroy());
    socket.on("close", () => {
      this.clients.delete(socket);
      this.logger.debug({ clients: this.clients.size }, "console client detached");
    });
  }

  /** Console output: sent to every client. */
  write(bytes: Buffer): void {
    for (const socket of this.clients) {
      if (socket.writableLength > MAX_CLIENT_BACKLOG) {
        this.logger.warn("console client too slow, disconnected");
        socket.destroy();
        continue;
      }
      socket.write(bytes);
    }
  }

  /** Stops listening and disconnects every client (after flushing what was written). Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const socket of this.clients) socket.end();
    const server = this.server;
    if (server === undefined) return;
    await new Promise<void>((resolve) => {
      // Clients that do not finish within a second are cut.
      const timer = setTimeout(() => {
        for (const socket of this.clients) socket.destroy();
      }, 1000);
      server.close(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }
}
