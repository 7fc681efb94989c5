/**
 * How a raw route (server.ts) turns the frames of a call into what its
 * ServiceImpl method takes, and what the method yields into frames: the one
 * part of the raw path that differs per procedure. `protobufCodec` is the
 * plain case (the protobuf runtime, one copy per message as connect-node
 * makes); a bulk procedure's codec keeps its payload out of that copy:
 * decoded as views of the frames it arrived in (splitBulkMessage,
 * wire.ts), encoded as a hand-written head followed by the payload itself
 * (encodeBulkMessage).
 */
import { create, toBinary, type DescMessage, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import { bytesFieldHeader, decodeMessage, frame } from "./wire.js";

/** A procedure's messages on the raw path. */
export interface RawCodec<I, O> {
  /** A request message from its pieces (views of the frames it came in); malformed: InvalidArgument. */
  decode(pieces: Buffer[]): I;
  /** A response message, framed (5-byte prefix first), as the buffers to write in order. */
  encode(response: O): readonly Uint8Array[];
}

/**
 * Requests decoded by the protobuf runtime (then passed through `check`, what
 * the component's request interceptors check on the Connect path), responses
 * as a ServiceImpl yields them (messages or their init shapes).
 */
export function protobufCodec<I extends DescMessage, O extends DescMessage>(
  input: I,
  output: O,
  check: (message: MessageShape<I>) => MessageShape<I> = (message) => message,
): RawCodec<MessageShape<I>, MessageInitShape<O>> {
  return {
    decode: (pieces) => check(decodeMessage(input, pieces.length === 1 ? pieces[0] : Buffer.concat(pieces))),
    encode: (response) => [frame(toBinary(output, create(output, response)))],
  };
}

/**
 * A message whose last field is the bytes field `dataField`, framed without
 * copying that field: the prefix and the other fields (encoded by the
 * runtime), then `data` as it is.
 */
export function encodeBulkMessage<S extends DescMessage>(schema: S, message: MessageShape<S>, dataField: number, data: Uint8Array): Uint8Array[] {
  const head = toBinary(schema, message);
  return [bytesFieldHeader(dataField, data.length, head), data];
}
