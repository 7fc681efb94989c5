/**
 * Append and Read over the hand-written gRPC handler (lib/server/raw-grpc.ts):
 * the same LogServiceImpl methods, without connect-node's per-message
 * pipeline, which cost the log server most of its CPU per frame (the logs
 * benchmark). gRPC-Web and Connect requests, and the other methods, fall
 * through to the Connect adapter, which serves the same implementation.
 *
 * Responses a method yields back to back go out in one socket write: a
 * message is written without waiting, and only a full stream is waited for.
 */
import { create, toBinary, type DescMessage, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  AppendRequestSchema,
  AppendResponseSchema,
  LogService,
  ReadRequestSchema,
  ReadResponseSchema,
  type AppendRequest,
} from "../../gen/treadmill/log/v1/log_service_pb.js";
import type { Logger } from "../../lib/logger.js";
import type { ExtraHttpHandler } from "../../lib/server.js";
import { createRawGrpcHandler, decodeMessage, drained, frame, type RawGrpcCall } from "../../lib/server/raw-grpc.js";
import type { LogServiceImpl, RequestContext } from "./log-service.js";

/** Returns the `http` handler of createServer that answers Append and Read. */
export function createLogGrpcHandler(
  service: LogServiceImpl,
  maxMessageBytes: number,
  logger: Logger,
): ExtraHttpHandler {
  return createRawGrpcHandler({
    procedures: {
      [`/${LogService.typeName}/Append`]: (call) => serveAppend(call, service),
      [`/${LogService.typeName}/Read`]: (call) => serveRead(call, service),
    },
    maxMessageBytes,
    logger,
  });
}

function context(call: RawGrpcCall): RequestContext {
  return { requestHeader: call.headers, signal: call.signal };
}

async function serveAppend(call: RawGrpcCall, service: LogServiceImpl): Promise<void> {
  const requests = (async function* (): AsyncGenerator<AppendRequest> {
    for await (const bytes of call.messages()) yield decodeMessage(AppendRequestSchema, bytes);
  })();
  await send(call, AppendResponseSchema, service.append(requests, context(call)));
}

async function serveRead(call: RawGrpcCall, service: LogServiceImpl): Promise<void> {
  let request: ReturnType<typeof decodeMessage<typeof ReadRequestSchema>> | undefined;
  for await (const bytes of call.messages()) {
    if (request) throw new ConnectError("read takes exactly one request message", Code.InvalidArgument);
    request = decodeMessage(ReadRequestSchema, bytes);
  }
  if (!request) throw new ConnectError("read takes exactly one request message", Code.InvalidArgument);
  await send(call, ReadResponseSchema, service.read(request, context(call)));
}

/** Writes every response; waits only when the stream is full. */
async function send<S extends DescMessage>(call: RawGrpcCall, schema: S, responses: AsyncIterable<MessageInitShape<S>>): Promise<void> {
  for await (const init of responses) {
    if (!call.stream.write(frame(toBinary(schema, create(schema, init))))) await drained(call.stream, call.signal);
  }
}
