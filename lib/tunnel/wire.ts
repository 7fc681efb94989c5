/**
 * The tunnel byte streams' wire (DESIGN.md §8, docs/proxy.md), spoken by the
 * proxy's Dial and Tunnel handlers and by their clients (the supervisor's
 * exposer, `tml console`): the four message directions of Dial and Tunnel,
 * their limits, and a codec that frames data messages by hand (a header,
 * then the caller's bytes, no copy) and recognises a received data message
 * without the protobuf runtime. Framing is lib/grpc/wire.ts's.
 */
import type http2 from "node:http2";
import { create, toBinary, type DescMessage } from "@bufbuild/protobuf";
import type { CloseReason } from "../../gen/treadmill/proxy/v1/tunnel_pb.js";
import { RendezvousService, TunnelRequestSchema, TunnelResponseSchema } from "../../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import { DialRequestSchema, DialResponseSchema, TunnelService } from "../../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { bytesFieldHeader, decodeMessage, frame, soleBytesField, soleBytesFieldPieces } from "../grpc/wire.js";

/** Largest `data` of one tunnel message that any side accepts (the protos' limit). */
export const MAX_TUNNEL_DATA = 1024 * 1024;

/**
 * How many bytes a sender packs into one data message when more are waiting
 * (FACTS.md: 256 KiB-1 MiB per message is best); a lone small write still
 * goes out at once as its own message.
 */
export const TUNNEL_BATCH_BYTES = 256 * 1024;

/** Largest whole tunnel message (data plus its field header, or a control message). */
export const MAX_TUNNEL_MESSAGE = MAX_TUNNEL_DATA + 1024;

export const DIAL_PATH = `/${TunnelService.typeName}/Dial`;
export const TUNNEL_PATH = `/${RendezvousService.typeName}/Tunnel`;

/**
 * One message of a tunnel byte stream, as its `payload` oneof: `data`,
 * `halfClose`, `resize`, `open`/`opened`, `close`/`closed`.
 */
export interface TunnelPayload {
  case: string | undefined;
  value?: unknown;
}

/**
 * One direction of a tunnel RPC: its message schema (a `payload` oneof whose
 * `data` is bytes) and the case of its last message, if it has one. The four
 * directions of Dial and Tunnel differ only in these.
 */
export interface TunnelWire {
  readonly schema: DescMessage;
  /** Field number of `data`. */
  readonly dataField: number;
  /** The case that ends the stream with a reason (`close`, `closed`); none for DialRequest. */
  readonly closeCase: string | undefined;
}

function wire(schema: DescMessage, closeCase: string | undefined): TunnelWire {
  return { schema, dataField: schema.field.data.number, closeCase };
}

/** Dial, client to proxy. */
export const DIAL_REQUEST = wire(DialRequestSchema, undefined);
/** Dial, proxy to client. */
export const DIAL_RESPONSE = wire(DialResponseSchema, "closed");
/** Tunnel, supervisor to proxy. */
export const TUNNEL_REQUEST = wire(TunnelRequestSchema, "close");
/** Tunnel, proxy to supervisor. */
export const TUNNEL_RESPONSE = wire(TunnelResponseSchema, "close");

/** A framed message with this payload (any case; data is better sent with writeData). */
export function encodeTunnelMessage(w: TunnelWire, payload: TunnelPayload): Buffer {
  return frame(toBinary(w.schema, create(w.schema, { payload } as never)));
}

/**
 * A received message's payload. A data message is recognised without the
 * protobuf runtime and its bytes are a view, not a copy. Throws
 * InvalidArgument for malformed bytes.
 */
export function decodeTunnelMessage(w: TunnelWire, bytes: Uint8Array): TunnelPayload {
  const data = soleBytesField(bytes, w.dataField);
  if (data !== undefined) return { case: "data", value: data };
  return (decodeMessage(w.schema, bytes) as unknown as { payload: TunnelPayload }).payload;
}

/**
 * A received message in pieces (readMessagePieces) as its payload; `data` is
 * the list of the payload's pieces, views of what was received.
 */
export function decodeTunnelPieces(w: TunnelWire, pieces: Buffer[]): TunnelPayload {
  const data = soleBytesFieldPieces(pieces, w.dataField);
  if (data !== undefined) return { case: "data", value: data };
  return decodeTunnelMessage(w, pieces.length === 1 ? pieces[0] : Buffer.concat(pieces));
}

/**
 * Writes `parts` as data messages of at most TUNNEL_BATCH_BYTES each: a
 * header, then the parts' own bytes (no copy), in one writev. Returns false
 * when the stream wants the writer to wait for 'drain'.
 */
export function writeData(stream: http2.Http2Stream, w: TunnelWire, parts: readonly Uint8Array[]): boolean {
  let batch: Uint8Array[] = [];
  let size = 0;
  let ok = true;
  const flush = () => {
    ok = stream.write(bytesFieldHeader(w.dataField, size));
    for (const p of batch) ok = stream.write(p);
    batch = [];
    size = 0;
  };
  stream.cork();
  for (const whole of parts) {
    let part = whole;
    while (part.byteLength > 0) {
      const piece = part.byteLength <= TUNNEL_BATCH_BYTES - size ? part : part.subarray(0, TUNNEL_BATCH_BYTES - size);
      batch.push(piece);
      size += piece.byteLength;
      part = part.subarray(piece.byteLength);
      if (size === TUNNEL_BATCH_BYTES) flush();
    }
  }
  if (size > 0) flush();
  stream.uncork();
  return ok;
}

/** How a tunnel ended. */
export interface TunnelClosed {
  reason: CloseReason;
  message: string;
}
