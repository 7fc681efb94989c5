/**
 * Append and Read on the raw gRPC path (lib/grpc/server.ts): the same
 * LogServiceImpl methods the Connect adapter serves, without connect-node's
 * per-message pipeline, which cost the log server most of its CPU per frame
 * (the logs benchmark). An Append frame's data stays as views of the HTTP/2
 * frames it arrived in, stored without being joined (decodeAppendPieces).
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import {
  AppendRequestSchema,
  AppendResponseSchema,
  LogService,
  ReadRequestSchema,
  ReadResponseSchema,
} from "../../gen/treadmill/log/v1/log_service_pb.js";
import { protobufCodec, type RawCodec } from "../../lib/grpc/codec.js";
import { biDiStreamingRoute, createRawGrpcHandler, serverStreamingRoute } from "../../lib/grpc/server.js";
import { decodeMessage, slicePieces } from "../../lib/grpc/wire.js";
import type { ExtraHttpHandler } from "../../lib/server.js";
import { appendPayload, type AppendInput, type AppendPayload, type LogServiceImpl } from "./log-service.js";
import { joinPieces } from "./segment.js";

/** Append's codec: frames decoded by hand (decodeAppendPieces), responses by the runtime. */
const appendCodec: RawCodec<AppendInput, MessageInitShape<typeof AppendResponseSchema>> = {
  decode: decodeAppendPieces,
  encode: protobufCodec(AppendRequestSchema, AppendResponseSchema).encode,
};

/** Returns the `http` handler of createServer that answers Append and Read over plain gRPC. */
export function createLogGrpcHandler(service: LogServiceImpl, maxMessageBytes: number): ExtraHttpHandler {
  return createRawGrpcHandler({
    routes: [
      biDiStreamingRoute(LogService.method.append, appendCodec, (requests, context) => service.append(requests, context)),
      serverStreamingRoute(LogService.method.read, protobufCodec(ReadRequestSchema, ReadResponseSchema), (request, context) =>
        service.read(request, context),
      ),
    ],
    maxMessageBytes,
  });
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
