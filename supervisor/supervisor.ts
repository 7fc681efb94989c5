import { randomUUID } from "node:crypto";
import { hostname } from "node:os";
import { mkdir } from "node:fs/promises";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { DriverKind } from "../gen/treadmill/coordinator/v1/host_pb.js";
import {
  type AttachRequest,
  AttachRequestSchema,
  SupervisorService,
} from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { Logger } from "../lib/logger.js";
import { backoff, sleep } from "../lib/retry.js";
import type { SupervisorConfig } from "./config.js";

/** The version this supervisor speaks on `Attach`. */
export const PROTOCOL_VERSION = { major: 1, minor: 0 };

/**
 * Where the supervisor is in its life. `refused` is final: the coordinator
 * said this supervisor may not attach (bad credential, incompatible protocol),
 * and retrying would only repeat that.
 */
export type SupervisorState = "idle" | "connecting" | "attached" | "backing-off" | "refused" | "stopped";

export interface Supervisor {
  readonly name: string;
  readonly coordinatorUrl: string;
  start(): Promise<void>;
  /** Idempotent: closes the stream and resolves once the loop has ended. */
  stop(): Promise<void>;
  state(): SupervisorState;
}

const driverKinds = {
  process: DriverKind.PROCESS,
  board: DriverKind.BOARD,
  qemu: DriverKind.QEMU,
} as const;

/** Codes after which attaching again cannot succeed without an operator. */
const FINAL_CODES = new Set([Code.Unauthenticated, Code.PermissionDenied, Code.FailedPrecondition]);

/**
 * The supervisor core: holds the `Attach` stream to the coordinator, forever,
 * reconnecting with exponential backoff and jitter. This foundation sends the
 * full state (`Hello`: idle, no jobs) and answers commands it cannot carry out
 * yet with a failed `CommandAck`; drivers, images, logs and tunnels come with
 * the supervisor issue.
 */
export function createSupervisor({
  config,
  logger,
  transport,
}: {
  config: SupervisorConfig;
  logger: Logger;
  /** For tests; by default gRPC over HTTP/2 to `coordinatorUrl`. */
  transport?: Transport;
}): Supervisor {
  const name = config.name === "" ? hostname() : config.name;
  const instanceId = randomUUID();
  const abort = new AbortController();
  let state: SupervisorState = "idle";
  let loop: Promise<void> | undefined;

  const auth: Interceptor = (next) => (req) => {
    if (config.hostCredential !== "") req.header.set("authorization", `Bearer ${config.hostCredential}`);
    return next(req);
  };
  const client = createClient(
    SupervisorService,
    transport ?? createGrpcTransport({ baseUrl: config.coordinatorUrl, interceptors: [auth] }),
  );

  /** One stream's life: resolves when the coordinator ends it, throws on error. */
  async function attachOnce(onAttached: () => void): Promise<void> {
    const outbox = new Outbox<AttachRequest>(abort.signal);
    outbox.push(
      create(AttachRequestSchema, {
        payload: {
          case: "hello",
          value: {
            protocolVersion: PROTOCOL_VERSION,
            supervisorVersion: "0.1.0",
            instanceId,
            driverKind: driverKinds[config.driver],
            capacity: 1,
            jobs: [],
          },
        },
      }),
    );
    for await (const message of client.attach(outbox, { signal: abort.signal })) {
      const { payload } = message;
      switch (payload.case) {
        case "welcome":
          state = "attached";
          onAttached();
          logger.info({ hostId: payload.value.host?.id }, "attached to coordinator");
          break;
        case "startJob":
        case "stopJob":
        case "takeSnapshot":
          // Honest refusal: this supervisor cannot run jobs yet.
          logger.warn({ command: payload.case }, "command not supported by this supervisor yet");
          outbox.push(
            create(AttachRequestSchema, {
              payload: {
                case: "commandAck",
                value: {
                  requestId: payload.value.requestId,
                  ok: false,
                  errorCode: Code.Unimplemented,
                  errorMessage: `supervisor cannot ${payload.case} yet`,
                },
              },
            }),
          );
          break;
        default:
          break;
      }
    }
  }

  async function run(): Promise<void> {
    const newDelays = () => backoff({ initialMs: Math.min(250, config.reconnectMaxMs), maxMs: config.reconnectMaxMs, jitter: "full" });
    let delays = newDelays();
    // The same failure again (the coordinator is still down) is logged at
    // debug: an operator needs the first line and the change, not one a minute.
    let lastFailure = "";
    while (!abort.signal.aborted) {
      state = "connecting";
      try {
        // A stream that got as far as a welcome starts the backoff afresh.
        await attachOnce(() => {
          delays = newDelays();
          lastFailure = "";
        });
        logger.info("coordinator closed the stream");
      } catch (err) {
        if (abort.signal.aborted) break;
        const error = ConnectError.from(err);
        if (FINAL_CODES.has(error.code)) {
          state = "refused";
          logger.error(
            { code: Code[error.code], reason: error.rawMessage },
            "coordinator refused this supervisor; not retrying (check the host credential and version)",
          );
          return;
        }
        const failure = `${Code[error.code]}: ${error.rawMessage}`;
        const level = failure === lastFailure ? "debug" : "warn";
        lastFailure = failure;
        logger[level]({ code: Code[error.code], reason: error.rawMessage }, "cannot attach to coordinator");
      }
      state = "backing-off";
      await sleep(delays.next().value, abort.signal).catch(() => undefined);
    }
  }

  return {
    name,
    coordinatorUrl: config.coordinatorUrl,
    async start() {
      await mkdir(config.workDir, { recursive: true });
      if (config.hostCredential === "") {
        logger.warn("no host credential configured: the coordinator will refuse to attach this supervisor");
      }
      loop ??= run().finally(() => {
        if (state !== "refused") state = "stopped";
      });
    },
    async stop() {
      abort.abort(new ConnectError("supervisor stopping", Code.Canceled));
      await loop;
      state = state === "refused" ? state : "stopped";
    },
    state: () => state,
  };
}

/**
 * The request side of a bidi stream: an async iterable that yields what is
 * pushed, and ends when the signal aborts.
 */
class Outbox<T> implements AsyncIterable<T> {
  private readonly queue: T[] = [];
  private wake: (() => void) | undefined;

  constructor(private readonly signal: AbortSignal) {
    signal.addEventListener("abort", () => this.wake?.(), { once: true });
  }

  push(item: T): void {
    this.queue.push(item);
    this.wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<T> {
    while (!this.signal.aborted) {
      const item = this.queue.shift();
      if (item !== undefined) {
        yield item;
        continue;
      }
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
  }
}
