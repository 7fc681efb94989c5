import { connect, type Socket } from "node:net";
import { Writable } from "node:stream";
import { Notifier } from "../../../lib/async/notifier.js";
import { createLogger, type Logger } from "../../../lib/logger.js";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import type { JobOutput, JobSpecForDriver, OutputChannel } from "../../../supervisor/drivers/driver.js";
import { buildFirmwareImage } from "../../support/images.js";

/** A JobOutput that keeps everything and lets a test wait for text on a channel. */
export class CollectedOutput implements JobOutput {
  readonly chunks: Record<OutputChannel, Buffer[]> = { console: [], stdout: [], stderr: [], supervisor: [] };
  private readonly written = new Notifier();

  write(channel: OutputChannel, bytes: Buffer): void {
    this.chunks[channel].push(Buffer.from(bytes));
    this.written.notify();
  }

  text(channel: OutputChannel): string {
    return Buffer.concat(this.chunks[channel]).toString("utf8");
  }

  all(): string {
    return (["console", "stdout", "stderr", "supervisor"] as const).map((c) => this.text(c)).join("\n");
  }

  /** Resolves once `pattern` matches the channel's text so far. */
  waitFor(channel: OutputChannel, pattern: RegExp, timeoutMs = 20000): Promise<string> {
    return this.written.until(
      () => pattern.exec(this.text(channel))?.[0],
      timeoutMs,
      () => new Error(`no ${pattern} on ${channel} within ${timeoutMs} ms; got:\n${this.all()}`),
    );
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
  const arrived = new Notifier();
  socket.on("data", (b: Buffer) => {
    received += b.toString("utf8");
    arrived.notify();
  });
  return {
    socket,
    text: () => received,
    waitFor: async (pattern, timeoutMs = 20000) => {
      await arrived.until(
        () => pattern.test(received),
        timeoutMs,
        () => new Error(`no ${pattern} from ${to}; got ${JSON.stringify(received)}`),
      );
    },
  };
}

/** A board job of firmware `script` (built under `dir`/images), with a fresh job id. */
export async function firmwareSpec(dir: string, script: string): Promise<JobSpecForDriver> {
  const image = await buildFirmwareImage({ dir: join(dir, "images"), script });
  return { jobId: `board-job-${randomUUID()}`, attempt: 1, parameters: [], image };
}
