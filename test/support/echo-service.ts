import { setTimeout as delay } from "node:timers/promises";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  EchoService,
  type EchoBidiStreamRequest,
  type EchoClientStreamRequest,
  type EchoRequest,
  type EchoServerStreamRequest,
} from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import { silentLogger } from "../../lib/logger.js";
import { createServer, type Server, type ServerOptions } from "../../lib/server.js";

/** An async iterable fed by hand (for streaming requests). */
import { AsyncQueue as Pushable } from "../../lib/async/queue.js";
export { Pushable };

/**
 * The test-only EchoService (test/proto/treadmill/testing/v1/echo_service.proto):
 * one RPC of each kind, used to exercise the server runtime.
 */
export class EchoServiceImpl implements ServiceImpl<typeof EchoService> {
  /** Returns the text, or fails with `fail_code` when set. */
  echo(request: EchoRequest) {
    if (request.failCode !== 0) {
      if (Code[request.failCode] === undefined) {
        throw new ConnectError(`fail_code ${request.failCode} is not a status code`, Code.InvalidArgument);
      }
      throw new ConnectError(`echo failed as asked: ${request.text}`, request.failCode as Code);
    }
    return { text: request.text };
  }

  /** `count` responses, `interval_ms` apart; stops early when the call ends. */
  async *echoServerStream(request: EchoServerStreamRequest, context: HandlerContext) {
    for (let index = 0; index < request.count; index++) {
      if (index > 0 && request.intervalMs > 0) await delay(request.intervalMs, undefined, { signal: context.signal });
      yield { text: request.text, index };
    }
  }

  /** Every request's text, concatenated, once the client has sent them all. */
  async echoClientStream(requests: AsyncIterable<EchoClientStreamRequest>) {
    let text = "";
    let count = 0;
    for await (const request of requests) {
      text += request.text;
      count++;
    }
    return { text, count };
  }

  /** Each request's text as soon as it arrives. */
  async *echoBidiStream(requests: AsyncIterable<EchoBidiStreamRequest>) {
    for await (const request of requests) yield { text: request.text };
  }
}

/**
 * Starts a server on 127.0.0.1, port 0, serving EchoService (or `routes` when
 * given), with a silent logger unless the options say otherwise.
 */
export async function startEchoServer(options: Partial<ServerOptions> = {}): Promise<Server> {
  const server = createServer({
    name: "echo",
    logger: silentLogger(),
    routes: (router) => router.service(EchoService, new EchoServiceImpl()),
    ...options,
  });
  await server.start();
  return server;
}

/** `promise`, or a rejection naming `what` if it does not settle within `ms`. */
export async function within<T>(ms: number, promise: Promise<T>, what: string): Promise<T> {
  const timer = new AbortController();
  try {
    return await Promise.race([
      promise,
      delay(ms, undefined, { signal: timer.signal }).then(() => {
        throw new Error(`${what}: not within ${ms} ms`);
      }),
    ]);
  } finally {
    timer.abort();
  }
}

