/**
 * Append and Read over the hand-written gRPC handler (lib/grpc/server.ts):
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
} from "../../gen/treadmill/log/v1/log_service_pb.js";
import type { Logger } from "../../lib/logger.js";
import type { ExtraHttpHandler } from "../../lib/server.js";
import { createRawGrpcHandler, type RawGrpcCall } from "../../lib/grpc/server.js";
import { decodeMessage, drained, frame, slicePieces } from "../../lib/grpc/wire.js";
import { appendPayload, type AppendPayload, type LogServiceImpl, type RequestContext } from "./log-service.js";
import { joinPieces } from "./segment.js";

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
  const requests = (async function* (): AsyncGenerator<AppendPayload> {
    for await (const pieces of call.pieces()) yield decodeAppendPieces(pieces);
  })();
  await send(call, AppendResponseSchema, service.appendPayloads(requests, context(call)));
}

/** Frames up to this size are copied out of the buffers they arrived in, which they would otherwise keep alive. */
const COPY_BELOW_BYTES = 4096;

/** The shapes decodeFramePieces leaves to the protobuf runtime. */
class Unusual extends Error {}

/**
 * An AppendRequest from the pieces it arrived in: a frame's data stays as
 * views of those pieces. The usual frame (channel, seq, capture time, then
 * data, its head within the first piece) is read by hand; anything else
 * goes through the protobuf runtime.
 */
export function decodeAppendPieces(pieces: Buffer[]): AppendPayload {
  try {
    return decodeFramePieces(pieces);
  } catch (err) {
    if (!(err instanceof Unusual)) throw err;
    return appendPayload(decodeMessage(AppendRequestSchema, joinPieces(pieces)));
  }
}

function decodeFramePieces(pieces: Buffer[]): AppendPayload {
  const head = pieces[0];
  let total = 0;
  for (const p of pieces) total += p.length;
  let at = 0;
  const byte = (): number => {
    if (at >= head.length) throw new Unusual();
    return head[at++];
  };
  /** A varint of at most 7 bytes (below 2^49): seqs, lengths, seconds until the year 10^7. */
  const varint = (): number => {
    let value = 0;
    for (let shift = 1, n = 0; n < 7; n++, shift *= 128) {
      const b = byte();
      value += (b & 0x7f) * shift;
      if (b < 0x80) return value;
    }
    throw new Unusual();
  };
  // AppendRequest.frame (2, length-delimited) and nothing else.
  if (byte() !== 0x12 || varint() !== total - at) throw new Unusual();
  let channel = "";
  let seq = 0;
  let captureMicros: number | undefined;
  let data: Uint8Array[] = [];
  let length = 0;
  while (at < total) {
    const tag = varint();
    if (tag === 0x0a) {
      const n = varint();
      if (at + n > head.length) throw new Unusual();
      channel = head.toString("utf8", at, at + n);
      at += n;
    } else if (tag === 0x10) {
      seq = varint();
    } else if (tag === 0x1a) {
      const end = varint() + at;
      let seconds = 0;
      let nanos = 0;
      while (at < end) {
        const t = varint();
        if (t === 0x08) seconds = varint();
        else if (t === 0x10) nanos = varint();
        else throw new Unusual();
      }
      if (at !== end) throw new Unusual();
      captureMicros = seconds * 1e6 + Math.floor(nanos / 1000);
    } else if (tag === 0x22) {
      length = varint();
      if (at + length !== total) throw new Unusual(); // data last, as encoders write it
      data = slicePieces(pieces, at, total);
      if (length < COPY_BELOW_BYTES && data.length > 0) data = [Buffer.concat(data)];
      at = total;
    } else {
      throw new Unusual();
    }
  }
  return { case: "frame", value: { channel, seq: BigInt(seq), captureMicros, data, length } };
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
