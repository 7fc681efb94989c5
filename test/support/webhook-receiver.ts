/**
 * A webhook receiver for the subscription tests: a real HTTP server on port
 * 0 that records every request (headers, exact body) and answers with the
 * status `answer` chooses; tests wait on what it received with a deadline.
 */
import { createServer, type IncomingHttpHeaders, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { Notifier } from "../../lib/async/notifier.js";

export interface ReceivedRequest {
  headers: IncomingHttpHeaders;
  body: string;
  status: number;
}

export class WebhookReceiver {
  readonly received: ReceivedRequest[] = [];
  /** The status of request number `n` (from 0); 200 unless replaced. */
  answer: (n: number, body: string) => number = () => 200;
  private readonly changes = new Notifier();
  private readonly server: Server;
  url = "";

  private constructor() {
    this.server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        const body = Buffer.concat(chunks).toString("utf8");
        const status = this.answer(this.received.length, body);
        this.received.push({ headers: req.headers, body, status });
        res.writeHead(status).end();
        this.changes.notify();
      });
    });
  }

  static async start(path = "/hook"): Promise<WebhookReceiver> {
    const r = new WebhookReceiver();
    await new Promise<void>((resolve) => r.server.listen(0, "127.0.0.1", resolve));
    r.url = `http://127.0.0.1:${(r.server.address() as AddressInfo).port}${path}`;
    return r;
  }

  /** Resolves with `check`'s first truthy value over what was received; rejects after `timeoutMs`. */
  until<T>(check: (received: ReceivedRequest[]) => T | undefined | false | null, timeoutMs = 15_000): Promise<T> {
    return this.changes.until(
      () => check(this.received),
      timeoutMs,
      () => new Error(`the receiver got ${this.received.length} requests, not what the test waits for`),
    );
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
