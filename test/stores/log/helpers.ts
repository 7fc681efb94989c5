// Shared set-up of the log server tests: keys and tokens, a server on port 0
// over a temporary data directory, clients, and a hand-driven Append stream.
import http from "node:http";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { createClient, type Client } from "@connectrpc/connect";
import { Http2SessionManager, createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import {
  type AppendRequestSchema,
  type AppendResponse,
  FrameSchema,
  LogService,
  type ReadResponse,
} from "../../../gen/treadmill/log/v1/log_service_pb.js";
import type { ServingComponent } from "../../../lib/component.js";
import { silentLogger } from "../../../lib/logger.js";
import { loadLogServerConfig, type LogServerConfig } from "../../../stores/log/config.js";
import { createLogServer } from "../../../stores/log/log-server.js";
import type { Keys } from "../../support/keys.js";

export type { Keys };

/** An async iterable fed by hand (for streaming requests). */
import { AsyncQueue as Pushable } from "../../../lib/async/queue.js";
export { Pushable };

export { makeKeys } from "../../support/keys.js";

export async function tempDir(prefix = "treadmill-log-"): Promise<{ path: string; remove(): Promise<void> }> {
  const path = await mkdtemp(join(tmpdir(), prefix));
  return { path, remove: () => rm(path, { recursive: true, force: true }) };
}

/** A log server in this process on port 0. */
export async function startLogServer(
  dataDir: string,
  keys: Keys,
  overrides: Partial<LogServerConfig> = {},
): Promise<ServingComponent> {
  const config: LogServerConfig = {
    ...loadLogServerConfig({ env: {}, argv: [] }),
    port: 0,
    dataDir,
    graceMs: 1000,
    logLevel: "silent",
    retentionMaxAgeMs: 0,
    ...overrides,
  };
  const server = createLogServer({ config, logger: silentLogger(), keys: async () => keys.jwks });
  await server.start();
  return server;
}

export interface TestClient {
  client: Client<typeof LogService>;
  close(): void;
}

/** A gRPC (HTTP/2) client, or Connect over HTTP/1.1 (what a browser can do). */
export function logClient(url: string, protocol: "grpc" | "connect-h1" = "grpc"): TestClient {
  if (protocol === "grpc") {
    const sessionManager = new Http2SessionManager(url);
    return { client: createClient(LogService, createGrpcTransport({ baseUrl: url, sessionManager })), close: () => sessionManager.abort() };
  }
  const agent = new http.Agent({ keepAlive: true });
  return {
    client: createClient(LogService, createConnectTransport({ baseUrl: url, httpVersion: "1.1", nodeOptions: { agent } })),
    close: () => agent.destroy(),
  };
}

export const auth = (token: string) => ({ headers: { authorization: `Bearer ${token}` } });

type AppendRequestInit = MessageInitShape<typeof AppendRequestSchema>;

/** Races a promise against a generous deadline, naming what was awaited. */
export function within<T>(promise: Promise<T>, what: string, ms = 15000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    }),
  ]);
}

/** A hand-driven Append stream. */
export class AppendStream {
  readonly requests = new Pushable<AppendRequestInit>();
  private readonly iterator: AsyncIterator<AppendResponse>;
  readonly abort = new AbortController();

  constructor(client: Client<typeof LogService>, token: string, hello: { jobId: string; attempt?: number; major?: number }) {
    this.requests.push({
      payload: {
        case: "hello",
        value: { protocolVersion: { major: hello.major ?? 1, minor: 0 }, jobId: hello.jobId, attempt: hello.attempt ?? 1, writer: "test" },
      },
    });
    this.iterator = client.append(this.requests, { ...auth(token), signal: this.abort.signal })[Symbol.asyncIterator]();
  }

  frame(channel: string, seq: number, data: Uint8Array | string, captureMs = Date.now()): void {
    this.requests.push({
      payload: {
        case: "frame",
        value: create(FrameSchema, {
          channel,
          seq: BigInt(seq),
          captureTime: { seconds: BigInt(Math.floor(captureMs / 1000)), nanos: (captureMs % 1000) * 1e6 },
          data: typeof data === "string" ? Buffer.from(data) : data,
        }),
      },
    });
  }

  /** The next response (throws the stream's error). */
  async next(): Promise<AppendResponse["payload"]> {
    const r = await within(this.iterator.next(), "an append response");
    if (r.done) throw new Error("append stream ended");
    return r.value.payload;
  }

  /** Reads responses until an ack of `channel` reaches `seq`; returns everything else seen. */
  async untilAck(channel: string, seq: number): Promise<AppendResponse["payload"][]> {
    const others: AppendResponse["payload"][] = [];
    while (true) {
      const p = await this.next();
      if (p.case === "ack" && p.value.channel === channel && Number(p.value.seq) >= seq) return others;
      if (p.case !== "ack") others.push(p);
    }
  }

  /** Half-closes and reads the rest of the responses until the server ends the stream. */
  async finish(): Promise<AppendResponse["payload"][]> {
    this.requests.end();
    const rest: AppendResponse["payload"][] = [];
    while (true) {
      const r = await within(this.iterator.next(), "the end of the append stream");
      if (r.done) return rest;
      rest.push(r.value.payload);
    }
  }
}

/** Reads a whole channel (not following): the bytes and the end message. */
export async function readAll(
  client: Client<typeof LogService>,
  token: string,
  request: { jobId: string; channel: string; attempt?: number; fromSeq?: number; fromOffset?: number; lastBytes?: number },
): Promise<{ data: Buffer; frames: { seq: number; offset: number; data: Buffer }[]; end: Extract<ReadResponse["payload"], { case: "end" }>["value"] | undefined }> {
  const start =
    request.fromSeq !== undefined
      ? { case: "fromSeq" as const, value: BigInt(request.fromSeq) }
      : request.fromOffset !== undefined
        ? { case: "fromOffset" as const, value: BigInt(request.fromOffset) }
        : request.lastBytes !== undefined
          ? { case: "lastBytes" as const, value: BigInt(request.lastBytes) }
          : { case: undefined };
  const frames: { seq: number; offset: number; data: Buffer }[] = [];
  let end;
  for await (const res of client.read({ jobId: request.jobId, channel: request.channel, attempt: request.attempt ?? 0, start }, auth(token))) {
    if (res.payload.case === "frame") {
      frames.push({ seq: Number(res.payload.value.seq), offset: Number(res.payload.value.offset), data: Buffer.from(res.payload.value.data) });
    } else if (res.payload.case === "end") {
      end = res.payload.value;
    }
  }
  return { data: Buffer.concat(frames.map((f) => f.data)), frames, end };
}
