/**
 * A minimal QMP client (the QEMU Machine Protocol, JSON lines on a unix
 * socket): the greeting, `qmp_capabilities`, then commands answered in
 * order by id. Events are passed to `onEvent`. Enough for the qemu driver's
 * stop, quit, powerdown and snapshot pauses.
 */

import { connect, type Socket } from "node:net";

export interface QmpEvent {
  event: string;
  data?: unknown;
}

/** A command QEMU answered with `error`. */
export class QmpError extends Error {
  override readonly name = "QmpError";
  constructor(
    readonly command: string,
    readonly errorClass: string,
    description: string,
  ) {
    super(`qmp ${command}: ${errorClass}: ${description}`);
  }
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

export class QmpClient {
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private greeted: () => void = () => undefined;
  private closedError: Error | undefined;

  private constructor(
    private readonly socket: Socket,
    private readonly onEvent: (event: QmpEvent) => void,
  ) {
    socket.setEncoding("utf8");
    socket.on("data", (text: string) => this.receive(text));
    socket.on("error", () => undefined);
    socket.on("close", () => this.fail(new Error("qmp connection closed")));
  }

  /** Connects to `path` and negotiates capabilities; rejects when the socket is not there (yet). */
  static async connect(path: string, onEvent: (event: QmpEvent) => void = () => undefined): Promise<QmpClient> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = connect(path);
      s.once("connect", () => {
        s.off("error", reject);
        resolve(s);
      });
      s.once("error", reject);
    });
    const client = new QmpClient(socket, onEvent);
    const greeting = new Promise<void>((resolve) => (client.greeted = resolve));
    await Promise.race([
      greeting,
      new Promise<never>((_, reject) => socket.once("close", () => reject(new Error("qmp closed before its greeting")))),
    ]);
    await client.execute("qmp_capabilities");
    return client;
  }

  private receive(text: string): void {
    this.buffer += text;
    for (let nl = this.buffer.indexOf("\n"); nl !== -1; nl = this.buffer.indexOf("\n")) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line === "") continue;
      let message: Record<string, unknown>;
      try {
        message = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      if ("QMP" in message) {
        this.greeted();
      } else if (typeof message.event === "string") {
        this.onEvent({ event: message.event, data: message.data });
      } else if (typeof message.id === "string") {
        const waiter = this.pending.get(message.id);
        if (waiter === undefined) continue;
        this.pending.delete(message.id);
        const error = message.error as { class?: string; desc?: string } | undefined;
        if (error !== undefined) waiter.reject(new QmpError(waiter.command, error.class ?? "GenericError", error.desc ?? ""));
        else waiter.resolve(message.return);
      }
    }
  }

  private fail(err: Error): void {
    this.closedError ??= err;
    for (const waiter of this.pending.values()) waiter.reject(err);
    this.pending.clear();
  }

  /** Runs one command; rejects with `QmpError` or when the connection closes first. */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closedError !== undefined) return Promise.reject(this.closedError);
    const id = `t${this.nextId++}`;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { command, resolve, reject });
      this.socket.write(`${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id })}\n`);
    });
  }

  close(): void {
    this.socket.destroy();
  }
}
