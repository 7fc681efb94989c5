/**
 * The gRPC wire as both ends of the raw path speak it (lib/grpc/server.ts,
 * lib/grpc/client.ts, the tunnel and blob codecs): the 5-byte message prefix,
 * splitting a byte stream into messages without copying them, protobuf
 * field headers written by hand so that a bulk payload follows its message
 * head without a copy, and the `grpc-timeout` and `grpc-message` headers.
 * Nothing here knows which side it runs on; malformed bytes are reported
 * with the code the caller names (InvalidArgument from a client's request,
 * Internal from a server's answer).
 */
import { fromBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Http2Stream } from "node:http2";
import { Readable } from "node:stream";

/** A protobuf varint's bytes. */
export function varint(n: number): number[] {
  const out: number[] = [];
  if (Number.isInteger(n) && n >= 0 && n <= 0xffffffff) {
    // The common case (lengths, offsets under 4 GiB) without BigInt.
    let v = n;
    while (v >= 0x80) {
      out.push((v & 0x7f) | 0x80);
      v = Math.floor(v / 128);
    }
    out.push(v);
    return out;
  }
  let v = BigInt(n);
  while (v >= 0x80n) {
    out.push(Number(v & 0x7fn) | 0x80);
    v >>= 7n;
  }
  out.push(Number(v));
  return out;
}

/** One uncompressed gRPC message: the 5-byte prefix, then the message. */
export function frame(message: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(5 + message.length);
  out[0] = 0;
  out.writeUInt32BE(message.length, 1);
  out.set(message, 5);
  return out;
}

/**
 * The 5-byte gRPC prefix of a message made of `fields` (already encoded
 * fields) followed by one length-delimited field `fieldNumber` of
 * `payloadLength` bytes, up to that payload, which the caller writes next
 * without copying it.
 */
export function bytesFieldHeader(fieldNumber: number, payloadLength: number, fields: ArrayLike<number> = []): Buffer {
  const tag = varint((fieldNumber << 3) | 2);
  const length = varint(payloadLength);
  const headLength = fields.length + tag.length + length.length;
  const head = Buffer.allocUnsafe(5 + headLength);
  head[0] = 0;
  head.writeUInt32BE(headLength + payloadLength, 1);
  let at = 5;
  for (let i = 0; i < fields.length; i++) head[at++] = fields[i];
  for (const b of tag) head[at++] = b;
  for (const b of length) head[at++] = b;
  return head;
}

/**
 * The payload of a message that holds nothing but one length-delimited field
 * `fieldNumber` (a oneof's `bytes data`), as a view of `message`; undefined
 * when the message is anything else (then decode it in full). Lets a byte
 * stream skip the protobuf runtime for its data messages.
 */
export function soleBytesField(message: Uint8Array, fieldNumber: number): Uint8Array | undefined {
  const at = soleBytesFieldStart(message, fieldNumber, message.length);
  return at === undefined ? undefined : message.subarray(at);
}

/**
 * soleBytesField for a message in pieces (readMessagePieces): the payload's
 * pieces, views, never copies. Undefined also when the field's header is
 * split between pieces (rare: then join the pieces and decode).
 */
export function soleBytesFieldPieces(pieces: readonly Buffer[], fieldNumber: number): Buffer[] | undefined {
  if (pieces.length === 0) return undefined;
  let total = 0;
  for (const p of pieces) total += p.length;
  const at = soleBytesFieldStart(pieces[0], fieldNumber, total);
  return at === undefined ? undefined : slicePieces(pieces, at, total);
}

/** The bytes [from, to) of a message's pieces taken together, as views (no copy). */
export function slicePieces(pieces: readonly Buffer[], from: number, to: number): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  for (const p of pieces) {
    const start = Math.max(from - at, 0);
    const stop = Math.min(to - at, p.length);
    if (stop > start) out.push(start === 0 && stop === p.length ? p : p.subarray(start, stop));
    at += p.length;
    if (at >= to) break;
  }
  return out;
}

/** Where the payload starts when the `total` bytes starting with `head` are exactly one bytes field. */
function soleBytesFieldStart(head: Uint8Array, fieldNumber: number, total: number): number | undefined {
  const tag = (fieldNumber << 3) | 2;
  if (tag > 0x7f || head.length < 2 || head[0] !== tag) return undefined;
  let length = 0;
  let shift = 1;
  let at = 1;
  for (;;) {
    if (at >= head.length || at > 5) return undefined;
    const b = head[at++];
    length += (b & 0x7f) * shift;
    if (b < 0x80) break;
    shift *= 128;
  }
  return at + length === total ? at : undefined;
}

/**
 * The gRPC messages of a length-prefixed byte stream (a request body, or a
 * response body on the client side), each as one contiguous buffer.
 *
 * A Node stream is read with 'data' events (HTTP/2 delivers the body in
 * frames of at most 16 KiB): each message is copied once out of its frames,
 * where Readable's async iterator would first concatenate what is buffered,
 * and the consumer wakes once per message rather than once per frame.
 */
export async function* readMessages(body: AsyncIterable<Buffer>, signal: AbortSignal, maxMessageBytes: number): AsyncGenerator<Uint8Array> {
  if (body instanceof Readable) {
    for await (const pieces of readMessagePieces(body, signal, maxMessageBytes)) yield joinPieces(pieces);
    return;
  }
  const splitter = new MessageSplitter(maxMessageBytes);
  const out: Buffer[][] = [];
  for await (const chunk of body) {
    if (signal.aborted) throw signal.reason;
    splitter.push(chunk, out);
    while (out.length > 0) yield joinPieces(out.shift()!);
  }
  splitter.end();
}

/** One buffer of a message's pieces (copied only when there are several). */
function joinPieces(pieces: Buffer[]): Buffer {
  return pieces.length === 1 ? pieces[0] : Buffer.concat(pieces);
}

/** Messages queued by readMessagePieces before it pauses the stream. */
const QUEUED_MESSAGE_BYTES = 4 * 1024 * 1024;

/**
 * Like readMessages, but each message comes as the list of its pieces, views
 * of the frames it arrived in, never copied: for bulk data that is hashed and
 * written (writev) piece by piece.
 */
export async function* readMessagePieces(body: Readable, signal: AbortSignal, maxMessageBytes: number): AsyncGenerator<Buffer[]> {
  const splitter = new MessageSplitter(maxMessageBytes);
  const queue: Buffer[][] = [];
  let queued = 0;
  let ended = false;
  let failure: unknown;
  let wake: (() => void) | undefined;
  const notify = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const onData = (chunk: Buffer) => {
    try {
      queued += splitter.push(chunk, queue);
    } catch (err) {
      failure ??= err;
      body.pause();
    }
    if (queued >= QUEUED_MESSAGE_BYTES) body.pause();
    notify();
  };
  const onEnd = () => {
    ended = true;
    notify();
  };
  const onError = (err: unknown) => {
    failure ??= err;
    notify();
  };
  const onClose = () => {
    if (!ended) failure ??= new Error("the stream closed before its end");
    notify();
  };
  body.on("data", onData);
  body.once("end", onEnd);
  body.once("error", onError);
  body.once("close", onClose);
  try {
    for (;;) {
      if (signal.aborted) throw signal.reason;
      const message = queue.shift();
      if (message !== undefined) {
        for (const piece of message) queued -= piece.length;
        if (queued < QUEUED_MESSAGE_BYTES && failure === undefined && body.isPaused()) body.resume();
        yield message;
        continue;
      }
      if (failure !== undefined) throw failure;
      if (ended) break;
      await new Promise<void>((resolve) => (wake = resolve));
    }
    splitter.end();
  } finally {
    body.off("data", onData);
    body.off("end", onEnd);
    body.off("error", onError);
    body.off("close", onClose);
  }
}

/**
 * Splits a length-prefixed byte stream, fed chunk by chunk, into messages,
 * each the list of its pieces (views of the chunks, no copy).
 */
class MessageSplitter {
  #parts: Buffer[] = [];
  #buffered = 0;
  /** Length of the message being assembled; -1: reading a prefix. */
  #want = -1;

  constructor(private readonly maxMessageBytes: number) {}

  /** Adds a chunk; appends the messages it completes to `out`; returns their bytes. */
  push(chunk: Buffer, out: Buffer[][]): number {
    this.#parts.push(chunk);
    this.#buffered += chunk.length;
    let bytes = 0;
    for (;;) {
      if (this.#want < 0) {
        if (this.#buffered < 5) return bytes;
        const prefix = joinPieces(this.#take(5));
        if ((prefix[0] & 1) !== 0) throw new ConnectError("compressed messages are not supported", Code.InvalidArgument);
        this.#want = prefix.readUInt32BE(1);
        if (this.#want > this.maxMessageBytes) {
          throw new ConnectError(`message of ${this.#want} bytes is larger than ${this.maxMessageBytes}`, Code.ResourceExhausted);
        }
      }
      if (this.#buffered < this.#want) return bytes;
      out.push(this.#want === 0 ? [Buffer.alloc(0)] : this.#take(this.#want));
      bytes += this.#want;
      this.#want = -1;
    }
  }

  /** The stream ended: throws when it ended inside a message. */
  end(): void {
    if (this.#want >= 0 || this.#buffered > 0) throw new ConnectError("stream ended inside a message", Code.InvalidArgument);
  }

  /** Takes the first n buffered bytes as views of the chunks. */
  #take(n: number): Buffer[] {
    const parts = this.#parts;
    const out: Buffer[] = [];
    let at = 0;
    let used = 0;
    while (at < n) {
      const p = parts[used];
      const k = Math.min(p.length, n - at);
      if (k === p.length) {
        out.push(p);
        used++;
      } else {
        out.push(p.subarray(0, k));
        parts[used] = p.subarray(k);
      }
      at += k;
    }
    parts.splice(0, used);
    this.#buffered -= n;
    return out;
  }
}

/** Resolves once the stream drains; rejects when the call ends first. */
export function drained(stream: Http2Stream, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = () => {
      stream.off("drain", done);
      stream.off("close", done);
      signal.removeEventListener("abort", done);
      if (signal.aborted) reject(signal.reason);
      else if (stream.destroyed) reject(new ConnectError("the stream closed", Code.Canceled));
      else resolve();
    };
    stream.once("drain", done);
    stream.once("close", done);
    signal.addEventListener("abort", done, { once: true });
  });
}

/** gRPC's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n). */
export function parseTimeout(value: string | string[] | undefined): number | undefined {
  if (typeof value !== "string") return undefined;
  const match = /^(\d{1,8})([HMSmun])$/.exec(value);
  if (!match) throw new ConnectError("grpc-timeout is malformed", Code.InvalidArgument);
  const n = Number(match[1]);
  const unitMs = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 }[match[2] as "H"];
  return Math.max(1, Math.ceil(n * unitMs));
}

/** Decodes a percent-encoded grpc-message (a client reading a status). */
export function decodeGrpcMessage(value: string): string {
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

/** Percent-encodes a grpc-message as the gRPC spec says. */
export function encodeGrpcMessage(message: string): string {
  const bytes = Buffer.from(message, "utf8");
  let out = "";
  for (const b of bytes) {
    out += b >= 0x20 && b <= 0x7e && b !== 0x25 ? String.fromCharCode(b) : `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

/**
 * Decodes a message. Malformed bytes are `code`: InvalidArgument (the
 * default) for a request a server received, Internal for a response a
 * client received.
 */
export function decodeMessage<S extends DescMessage>(schema: S, bytes: Uint8Array, code: Code = Code.InvalidArgument): MessageShape<S> {
  try {
    return fromBinary(schema, bytes);
  } catch {
    throw new ConnectError(code === Code.Internal ? "response message is malformed" : "request message is malformed", code);
  }
}

/** How far into a message splitBulkMessage looks for the bytes field. */
const BULK_HEAD_BYTES = 256;

/**
 * Decodes a bulk message (PutBlobRequest, GetBlobResponse) that came as
 * pieces (readMessagePieces) without copying its bytes field `dataField`:
 * when that field is the last one (as every Treadmill sender and the usual
 * encoders write it), the fields before it are decoded and its bytes are
 * returned as views of the pieces; otherwise the message is joined and
 * decoded whole. `message`'s own bytes field is left empty. Malformed bytes
 * are `code` (Internal from a server, InvalidArgument from a client).
 */
export function splitBulkMessage<S extends DescMessage>(
  schema: S,
  pieces: Buffer[],
  dataField: number,
  code: Code,
): { message: MessageShape<S>; data: Buffer[] } {
  let total = 0;
  for (const p of pieces) total += p.length;
  const head = pieces[0].length >= Math.min(total, BULK_HEAD_BYTES) ? pieces[0] : Buffer.concat(pieces, Math.min(total, BULK_HEAD_BYTES));
  const end = Math.min(head.length, BULK_HEAD_BYTES);
  let at = 0;
  const varintAt = (): number | undefined => {
    let value = 0;
    for (let shift = 1, i = 0; i < 8 && at < end; i++, shift *= 128) {
      const b = head[at++];
      value += (b & 0x7f) * shift;
      if (b < 0x80) return value;
    }
    return undefined;
  };
  while (at < end) {
    const fieldStart = at;
    const tag = varintAt();
    if (tag === undefined) break;
    const wireType = tag & 7;
    if (wireType === 0) {
      if (varintAt() === undefined) break;
    } else if (wireType === 2) {
      const length = varintAt();
      if (length === undefined) break;
      if (Math.floor(tag / 8) === dataField && at + length === total) {
        const message = decodeMessage(schema, head.subarray(0, fieldStart), code);
        return { message, data: slicePieces(pieces, at, total) };
      }
      at += length;
    } else if (wireType === 1) {
      at += 8;
    } else if (wireType === 5) {
      at += 4;
    } else {
      break;
    }
  }
  const whole = pieces.length === 1 ? pieces[0] : Buffer.concat(pieces);
  const message = decodeMessage(schema, whole, code);
  const data = (message as Record<string, unknown>)[dataFieldName(schema, dataField)];
  return { message, data: data instanceof Uint8Array && data.length > 0 ? [Buffer.from(data.buffer, data.byteOffset, data.length)] : [] };
}

function dataFieldName(schema: DescMessage, number: number): string {
  const field = schema.fields.find((f) => f.number === number);
  if (!field) throw new Error(`${schema.typeName} has no field ${number}`);
  return field.localName;
}
