/**
 * PutBlob and GetBlob on the raw gRPC path (lib/grpc/server.ts): the same
 * ImageStoreServiceImpl methods the Connect adapter serves, with codecs that
 * never copy blob bytes. PutBlob's data is hashed and written (writev) from
 * the HTTP/2 frames it arrived in; GetBlob's follows a hand-encoded head,
 * the next chunk read from disk while the current one drains.
 */
import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import {
  GetBlobRequestSchema,
  GetBlobResponseSchema,
  ImageStoreService,
  PutBlobRequestSchema,
  PutBlobResponseSchema,
  type GetBlobRequest,
  type GetBlobResponse,
  type PutBlobResponse,
} from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { encodeBulkMessage, protobufCodec, type RawCodec } from "../../lib/grpc/codec.js";
import { clientStreamingRoute, createRawGrpcHandler, serverStreamingRoute } from "../../lib/grpc/server.js";
import { splitBulkMessage } from "../../lib/grpc/wire.js";
import type { ExtraHttpHandler } from "../../lib/server.js";
import { MAX_CHUNK_BYTES, type BlobPiece, type ImageStoreServiceImpl } from "./store-service.js";

/** A message is at most 3 MiB of data plus its fields. */
const MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 64 * 1024;

const PUT_DATA = PutBlobRequestSchema.field.data.number;
const GET_DATA = GetBlobResponseSchema.field.data.number;

const putBlobCodec: RawCodec<BlobPiece, PutBlobResponse> = {
  decode(pieces) {
    const { message, data } = splitBulkMessage(PutBlobRequestSchema, pieces, PUT_DATA, Code.InvalidArgument);
    return { digest: message.digest, size: message.size, offset: message.offset, data, digestAtEnd: message.digestAtEnd };
  },
  encode: protobufCodec(PutBlobRequestSchema, PutBlobResponseSchema).encode,
};

const getBlobCodec: RawCodec<GetBlobRequest, GetBlobResponse> = {
  decode: protobufCodec(GetBlobRequestSchema, GetBlobResponseSchema).decode,
  encode: (chunk) => encodeBulkMessage(GetBlobResponseSchema, create(GetBlobResponseSchema, { offset: chunk.offset, size: chunk.size }), GET_DATA, chunk.data),
};

/** Returns the `http` handler of createServer that answers PutBlob and GetBlob over plain gRPC. */
export function createBulkGrpcHandler(service: ImageStoreServiceImpl): ExtraHttpHandler {
  return createRawGrpcHandler({
    routes: [
      clientStreamingRoute(ImageStoreService.method.putBlob, putBlobCodec, (requests, context) => service.putBlob(requests, context)),
      serverStreamingRoute(ImageStoreService.method.getBlob, getBlobCodec, (request, context) => service.getBlob(request, context), {
        readAhead: true,
      }),
    ],
    maxMessageBytes: MAX_MESSAGE_BYTES,
  });
}
