import { describe, expect, it } from "@jest/globals";
import { randomBytes } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { BinaryWriter } from "@bufbuild/protobuf/wire";
import { AppendRequestSchema } from "../../../gen/treadmill/log/v1/log_service_pb.js";
import { decodeAppendPieces } from "../../../stores/log/log-grpc.js";
import { appendPayload, type AppendPayload } from "../../../stores/log/log-service.js";
import { joinPieces } from "../../../stores/log/segment.js";

/** `bytes` cut at `cuts`, as views of one buffer (as HTTP/2 DATA frames arrive). */
function split(bytes: Uint8Array, cuts: number[]): Buffer[] {
  const buf = Buffer.from(bytes);
  const at = [0, ...cuts.filter((c) => c > 0 && c < buf.length).sort((a, b) => a - b), buf.length];
  return at.slice(1).map((end, i) => buf.subarray(at[i], end));
}

/** A payload with its frame's data joined, to compare. */
function plain(p: AppendPayload) {
  if (p.case !== "frame") return p;
  return { ...p, value: { ...p.value, data: Buffer.from(joinPieces(p.value.data)) } };
}

function frameRequest(data: Uint8Array, seq: bigint, withTime = true) {
  return toBinary(
    AppendRequestSchema,
    create(AppendRequestSchema, {
      payload: {
        case: "frame",
        value: { channel: "serial-0", seq, data, captureTime: withTime ? { seconds: 1_795_000_000n, nanos: 123_456_789 } : undefined },
      },
    }),
  );
}

describe("decodeAppendPieces", () => {
  it("reads a frame spread over pieces like the protobuf runtime, keeping large data as views", () => {
    const data = randomBytes(16384);
    const bytes = frameRequest(data, 42n);
    for (const cuts of [[], [8], [30, 9000], [16384 - 5], [1, 2, 3, 4, 5, 6, 7, 8, 100]]) {
      const pieces = split(bytes, cuts);
      const got = decodeAppendPieces(pieces);
      expect(plain(got)).toEqual(plain(appendPayload(fromBinary(AppendRequestSchema, bytes))));
      if (got.case !== "frame") throw new Error("not a frame");
      expect(got.value.length).toBe(data.length);
      expect(got.value.captureMicros).toBe(1_795_000_000_123_456);
      // With the frame's head in the first piece, the data are views of the
      // pieces' buffer, not a copy (a head cut apart goes the runtime's way).
      const headWhole = cuts.length === 0 || cuts[0] >= 40;
      for (const piece of got.value.data) expect(piece.buffer === pieces[0].buffer).toBe(headWhole);
    }
  });

  it("copies small data out of the buffers it arrived in", () => {
    const bytes = frameRequest(Buffer.from("hello\n"), 1n, false);
    const pieces = split(bytes, [12]);
    const got = decodeAppendPieces(pieces);
    if (got.case !== "frame") throw new Error("not a frame");
    expect(Buffer.from(joinPieces(got.value.data)).toString()).toBe("hello\n");
    expect(got.value.captureMicros).toBeUndefined();
    expect(got.value.data).toHaveLength(1);
    // A copy: the buffers it arrived in may change (be reused) without it changing.
    for (const piece of pieces) piece.fill(0);
    expect(Buffer.from(got.value.data[0]).toString()).toBe("hello\n");
  });

  it("leaves hellos, unusual field orders and unknown fields to the protobuf runtime", () => {
    const hello = toBinary(
      AppendRequestSchema,
      create(AppendRequestSchema, { payload: { case: "hello", value: { jobId: "j", attempt: 2, writer: "w" } } }),
    );
    expect(plain(decodeAppendPieces(split(hello, [3])))).toEqual(plain(appendPayload(fromBinary(AppendRequestSchema, hello))));

    // Frame with data first, then seq and channel, and an unknown field 9.
    const inner = new BinaryWriter().uint32(0x22).bytes(Buffer.from("xyz")).uint32(0x10).int64(7n).uint32(0x0a).string("out");
    inner.uint32(0x48).uint32(5);
    const odd = new BinaryWriter().uint32(0x12).bytes(inner.finish()).finish();
    const got = decodeAppendPieces(split(odd, [4]));
    expect(plain(got)).toEqual(plain(appendPayload(fromBinary(AppendRequestSchema, odd))));
    expect(got.case === "frame" && got.value.seq).toBe(7n);
  });

  it("rejects a malformed message as the protobuf runtime does", () => {
    const bytes = frameRequest(randomBytes(100), 3n);
    expect(() => decodeAppendPieces([Buffer.from(bytes.subarray(0, bytes.length - 10))])).toThrow("malformed");
  });
});
