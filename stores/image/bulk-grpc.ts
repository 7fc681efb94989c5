/**
 * The two bulk RPCs, PutBlob and GetBlob, as hand-written gRPC procedures
 * (lib/grpc/server.ts) mounted on the store's port ahead of the Connect
 * adapter. gRPC-Web, Connect and JSON requests fall through to the adapter,
 * which serves the same methods. Either way the server's authorization hook
 * (authorize.ts) checks the token's scope before a message is read, and the
 * service methods check its digest. Blob bytes are never copied here: PutBlob's data is hashed and written
 * from the HTTP/2 frames it arrived in, GetBlob's follows a hand-encoded
 * header.
 */
import { toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { GetBlobRequestSchema, ImageStoreService, PutBlobRequestSchema, PutBlobResponseSchema } from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { splitBulkMessage } from "../../lib/grpc/wire.js";
import type { Logger } from "../../lib/logger.js";
import { createRawGrpcHandler, type RawGrpcCall } from "../../lib/grpc/server.js";
import { decodeMessage, drained, frame, varint } from "../../lib/grpc/wire.js";
import type { ExtraHttpHandler } from "../../lib/server.js";
import { MAX_CHUNK_BYTES, type BlobPiece, type ImageStoreServiceImpl } from "./store-service.js";

/** A message is at most 3 MiB of data plus its fields. */
const MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 64 * 1024;

/** Returns the `http` handler of createServer that answers the bulk RPCs. */
export function createBulkGrpcHandler(service: ImageStoreServiceImpl, logger: Logger): ExtraHttpHandler {
  return createRawGrpcHandler({
    procedures: {
      [`/${ImageStoreService.typeName}/PutBlob`]: (call) => servePut(call, service),
      [`/${ImageStoreService.typeName}/GetBlob`]: (call) => serveGet(call, service),
    },
    maxMessageBytes: MAX_MESSAGE_BYTES,
    logger,
  });
}

async function servePut(call: RawGrpcCall, service: ImageStoreServiceImpl): Promise<void> {
  // Each message's data stays in the frames it arrived in: hashed and
  // written (writev) from there, never copied.
  const messages = (async function* (): AsyncGenerator<BlobPiece> {
    for await (const pieces of call.pieces()) {
      const { message, data } = splitBulkMessage(PutBlobRequestSchema, pieces, PutBlobRequestSchema.field.data.number, Code.InvalidArgument);
      yield { digest: message.digest, size: message.size, offset: message.offset, data };
    }
  })();
  const response = await service.receiveBlob(call.headers, call.signal, messages);
  await call.write(frame(toBinary(PutBlobResponseSchema, response)));
}

async function serveGet(call: RawGrpcCall, service: ImageStoreServiceImpl): Promise<void> {
  let request: ReturnType<typeof decodeMessage<typeof GetBlobRequestSchema>> | undefined;
  for await (const bytes of call.messages()) {
    if (request) throw new ConnectError("get_blob takes exactly one request message", Code.InvalidArgument);
    request = decodeMessage(GetBlobRequestSchema, bytes);
  }
  if (!request) throw new ConnectError("get_blob takes exactly one request message", Code.InvalidArgument);
  const chunks = await service.openBlob(call.headers, request);
  const { stream, signal } = call;
  // Read the next chunk from disk while the current one drains to the socket.
  let pending = chunks.next();
  try {
    for (;;) {
      const next = await pending;
      if (next.done) break;
      const { offset, data, size } = next.value;
      const head = chunkHeader(offset, data.length, size);
      pending = chunks.next();
      stream.write(head);
      const flushed = stream.write(data);
      if (!flushed) await drained(stream, signal);
    }
  } finally {
    // Stops reading (closes the file) when the call ends early.
    await pending.catch(() => undefined);
    await chunks.return(undefined);
  }
}

/**
 * The 5-byte gRPC prefix plus a GetBlobResponse's fields up to the length of
 * `data`, whose bytes follow without being copied: field 1 offset (varint),
 * field 3 size (varint, first chunk), field 2 data (length-delimited).
 */
function chunkHeader(offset: number, dataLength: number, size: number | undefined): Buffer {
  const fields: number[] = [];
  if (offset > 0) fields.push(0x08, ...varint(offset));
  if (size !== undefined && size > 0) fields.push(0x18, ...varint(size));
  fields.push(0x12, ...varint(dataLength));
  const head = Buffer.allocUnsafe(5 + fields.length);
  head[0] = 0;
  head.writeUInt32BE(fields.length + dataLength, 1);
  head.set(fields, 5);
  return head;
}
