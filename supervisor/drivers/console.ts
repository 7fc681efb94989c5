/**
 * A console bridged to a Unix socket: every byte of the console goes to every
 * connected client, and whatever a client sends goes to the console's input.
 * Several clients may be attached at once (the proxy's tunnels, an operator's
 * `socat - UNIX:...`); none gets the history (that is in the log server).
 *
 * Never a TCP port (issue #17): a port on the host's loopback is open to
 * every process of the machine, jobs sharing the host's network included.
 * The socket is 0600 and must be made in a directory only the supervisor can
 * enter (machine.ts `privateSocketDir`), so only the supervisor (and root)
 * can connect.
 */

import { chmod, unlink } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import type { Logger } from "../../lib/logger.js";

/** A client further behind than this is disconnected rather than buffered without bound. */
const MAX_CLIENT_BACKLOG = 4 * 1024 * 1024;

export class ConsoleBridge {
  private readonly clients = new Set<Socket>();
  private server: Server | undefined;
  private closed = false;

  private constructor(
    /** The socket's path. */
    readonly path: string,
    private readonly onInput: (bytes: Buffer) => void,
    private readonly logger: Logger,
  ) {}

  /** Listens on the Unix socket `path` (a stale socket there is replaced), mode 0600. */
  static async listen(options: { path: string; onInput: (bytes: Buffer) => void; logger: Logger }): Promise<ConsoleBridge> {
    const bridge = new ConsoleBridge(options.path, options.onInput, options.logger);
    const server = createServer((socket) => bridge.accept(socket));
    await unlink(options.path).catch(() => undefined);
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen({ path: options.path }, () => {
        server.off("error", reject);
        resolve();
      });
    });
    await chmod(options.path, 0o600);
    bridge.server = server;
    return bridge;
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

  /** Stops listening, removes the socket and disconnects every client (after flushing what was written). Idempotent. */
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
