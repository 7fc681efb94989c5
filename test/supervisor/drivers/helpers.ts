import { connect, type Socket } from "node:net";
import { Writable } from "node:stream";
import { createLogger, type Logger } from "../../../lib/logger.js";
import type { JobOutput, OutputChannel } from "../../../supervisor/drivers/driver.js";

/** A JobOutput that keeps everything and lets a test wait for text on a channel. */
export class CollectedOutput implements JobOutput {
  readonly chunks: Record<OutputChannel, Buffer[]> = { console: [], stdout: [], stderr: [], supervisor: [] };
  private waiters: (() => void)[] = [];

  write(channel: OutputChannel, bytes: Buffer): void {
    this.chunks[channel].push(Buffer.from(bytes));
    for (const w of [...this.waiters]) w();
  }

  text(channel: OutputChannel): string {
    return Buffer.concat(this.chunks[channel]).toString("utf8");
  }

  all(): string {
    return (["console", "stdout", "stderr", "supervisor"] as const).map((c) => this.text(c)).join("\n");
  }

  /** Resolves once `pattern` matches the channel's text so far. */
  waitFor(channel: OutputChannel, pattern: RegExp, timeoutMs = 20000): Promise<string> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const m = pattern.exec(this.text(channel));
        if (m === null) return false;
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w !== waiter);
        resolve(m[0]);
        return true;
      };
      const waiter = () => void check();
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        reject(new Error(`no ${pattern} on ${channel} within ${timeoutMs} ms; got:\n${this.all()}`));
      }, timeoutMs);
      if (!check()) this.waiters.push(waiter);
    });
  }
}

/** A logger whose lines the test can read (JSON strings, as pino writes them). */
export function capturingLogger(): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      lines.push(...chunk.toString("utf8").split("\n").filter(Boolean));
      done();
    },
  });
  return { logger: createLogger({ level: "debug", component: "test", destination }), lines };
}

/** A client of a stream socket (a Unix socket path, or a TCP port on 127.0.0.1) whose received text can be awaited. */
export async function socketClient(
  to: string | number,
): Promise<{ socket: Socket; text(): string; waitFor(p: RegExp, timeoutMs?: number): Promise<void> }> {
  const socket = typeof to === "string" ? connect({ path: to }) : connect({ host: "127.0.0.1", port: to });
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  let received = "";
  const waiters: (() => void)[] = [];
  socket.on("data", (b: Buffer) => {
    received += b.toString("utf8");
    for (const w of [...waiters]) w();
  });
  return {
    socket,
    text: () => received,
    waitFor: (pattern, timeoutMs = 20000) =>
      new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no ${pattern} from ${to}; got ${JSON.stringify(received)}`)), timeoutMs);
        const check = () => {
          if (!pattern.test(received)) return;
          clearTimeout(timer);
          const i = waiters.indexOf(check);
          if (i !== -1) waiters.splice(i, 1);
          resolve();
        };
        waiters.push(check);
        check();
      }),
  };
}
