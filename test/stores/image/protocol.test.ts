// The bulk RPCs (PutBlob, GetBlob) are served by a hand-written gRPC handler;
// these tests check that it is plain gRPC for any client, and that the
// other protocols still reach the same methods through Connect.
import { describe, expect, it } from "@jest/globals";
import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import http2 from "node:http2";
import {
  GetBlobRequestSchema,
  GetBlobResponseSchema,
  ImageStoreService,
  PutBlobRequestSchema,
  PutBlobResponseSchema,
  type GetBlobResponse,
  type PutBlobResponse,
} from "../../../gen/treadmill/image/v1/image_store_service_pb.js";
import { frame } from "../../../lib/grpc/wire.js";
import { collect, randomBlob, storeWithImage } from "../../support/image-store.js";

const MIB = 1024 * 1024;

/** One raw HTTP/2 gRPC call: returns the response body and trailers. */
function rawCall(url: string, path: string, headers: Record<string, string>, body: Buffer[], endBody = true) {
  const session = http2.connect(url);
  const stream = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers", ...headers });
  for (const b of body) stream.write(b);
  if (endBody) stream.end();
  return new Promise<{ trailers: http2.IncomingHttpHeaders; headers: http2.IncomingHttpHeaders; data: Buffer }>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let head: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    stream.on("response", (h) => (head = h));
    stream.on("trailers", (t) => (trailers = t));
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("error", reject);
    stream.on("close", () => {
      session.close();
      // A trailers-only response carries the status in its headers.
      resolve({ headers: head, trailers: trailers["grpc-status"] ? trailers : head, data: Buffer.concat(chunks) });
    });
  });
}

describe("the bulk gRPC handler", () => {
  const blob = randomBlob(3 * MIB + 11);
  const fx = storeWithImage([blob]);
  const put = `/${ImageStoreService.typeName}/PutBlob`;
  const get = `/${ImageStoreService.typeName}/GetBlob`;

  it("serves GetBlob and PutBlob to a grpc-js client", async () => {
    const client = new grpc.Client(`127.0.0.1:${fx.store.component.address().port}`, grpc.credentials.createInsecure());
    try {
      const md = new grpc.Metadata();
      md.set("authorization", `Bearer ${fx.readToken}`);
      const call = client.makeServerStreamRequest(
        get,
        (m: ReturnType<typeof create<typeof GetBlobRequestSchema>>) => Buffer.from(toBinary(GetBlobRequestSchema, m)),
        (b: Buffer) => fromBinary(GetBlobResponseSchema, b),
        create(GetBlobRequestSchema, { digest: blob.digest }),
        md,
      );
      const chunks: GetBlobResponse[] = [];
      for await (const m of call) chunks.push(m as GetBlobResponse);
      expect(Number(chunks[0].size)).toBe(blob.size);
      expect(Buffer.concat(chunks.map((c) => c.data)).equals(blob.data)).toBe(true);

      const fresh = randomBlob(MIB + 1);
      const wmd = new grpc.Metadata();
      wmd.set("authorization", `Bearer ${fx.writeToken}`);
      const result = await new Promise<PutBlobResponse>((resolve, reject) => {
        const up = client.makeClientStreamRequest(
          put,
          (m: ReturnType<typeof create<typeof PutBlobRequestSchema>>) => Buffer.from(toBinary(PutBlobRequestSchema, m)),
          (b: Buffer) => fromBinary(PutBlobResponseSchema, b),
          wmd,
          (err, value) => (err ? reject(err) : resolve(value!)),
        );
        up.write(create(PutBlobRequestSchema, { digest: fresh.digest, size: BigInt(fresh.size), offset: 0n, data: fresh.data.subarray(0, MIB) }));
        up.write(create(PutBlobRequestSchema, { offset: BigInt(MIB), data: fresh.data.subarray(MIB) }));
        up.end();
      });
      expect(result).toMatchObject({ complete: true, committedSize: BigInt(fresh.size) });

      // Errors arrive as gRPC statuses with their messages.
      const denied = client.makeServerStreamRequest(
        get,
        (m: ReturnType<typeof create<typeof GetBlobRequestSchema>>) => Buffer.from(toBinary(GetBlobRequestSchema, m)),
        (b: Buffer) => fromBinary(GetBlobResponseSchema, b),
        create(GetBlobRequestSchema, { digest: blob.digest }),
      );
      const err = await collect(denied as AsyncIterable<unknown>).catch((e: unknown) => e as grpc.ServiceError);
      expect((err as grpc.ServiceError).code).toBe(grpc.status.UNAUTHENTICATED);
      expect((err as grpc.ServiceError).details).toMatch(/^missing token: /);
    } finally {
      client.close();
    }
  });

  it("serves the same methods over the Connect protocol on HTTP/1.1", async () => {
    const transport = createConnectTransport({
      baseUrl: fx.store.url,
      httpVersion: "1.1",
      interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${fx.readToken}`), next(req))],
    });
    const chunks = await collect(createClient(ImageStoreService, transport).getBlob({ digest: blob.digest, offset: 5n, length: 100n }));
    expect(Buffer.concat(chunks.map((c) => c.data)).equals(blob.data.subarray(5, 105))).toBe(true);
  });

  it("honours grpc-timeout with DeadlineExceeded and keeps what arrived", async () => {
    const fresh = randomBlob(2 * MIB);
    const first = toBinary(PutBlobRequestSchema, create(PutBlobRequestSchema, { digest: fresh.digest, size: BigInt(fresh.size), data: fresh.data.subarray(0, MIB) }));
    // The client sends one MiB and never ends the call: the deadline ends it.
    const call = rawCall(fx.store.url, put, { authorization: `Bearer ${fx.writeToken}`, "grpc-timeout": "3S" }, [frame(first)], false);
    const committed = async () => Number((await fx.store.client(fx.writeToken).queryUpload({ digest: fresh.digest })).committedOffset);
    // What arrived is committed while the call is still open...
    for (const deadline = Date.now() + 2500; (await committed()) < MIB && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 20));
    const res = await call;
    expect(res.trailers["grpc-status"]).toBe("4");
    // ...and kept after the deadline ended it.
    expect(await committed()).toBe(MIB);
  });

  it("takes PutBlob messages whose data field is not the last one", async () => {
    // The store reads data in place when it is the message's last field (as
    // encoders write it); any other order is decoded whole.
    const fresh = randomBlob(MIB + 9);
    const message = (offset: number, data: Buffer, head: boolean) => {
      const fields = toBinary(
        PutBlobRequestSchema,
        create(PutBlobRequestSchema, head ? { digest: fresh.digest, size: BigInt(fresh.size), offset: BigInt(offset) } : { offset: BigInt(offset) }),
      );
      const dataField = toBinary(PutBlobRequestSchema, create(PutBlobRequestSchema, { data }));
      return frame(Buffer.concat([dataField, fields]));
    };
    const res = await rawCall(fx.store.url, put, { authorization: `Bearer ${fx.writeToken}` }, [
      message(0, fresh.data.subarray(0, MIB), true),
      message(MIB, fresh.data.subarray(MIB), false),
    ]);
    expect(res.trailers["grpc-status"]).toBe("0");
    const reply = fromBinary(PutBlobResponseSchema, res.data.subarray(5));
    expect(reply).toMatchObject({ complete: true, committedSize: BigInt(fresh.size) });
    expect((await fx.store.client(fx.writeToken).queryUpload({ digest: fresh.digest })).exists).toBe(true);
  });

  it("refuses compressed messages and unsupported encodings", async () => {
    const body = toBinary(GetBlobRequestSchema, create(GetBlobRequestSchema, { digest: blob.digest }));
    const flagged = frame(body);
    flagged[0] = 1; // the compressed flag
    const compressed = await rawCall(fx.store.url, get, { authorization: `Bearer ${fx.readToken}` }, [flagged]);
    expect(compressed.trailers["grpc-status"]).toBe("3");
    const gzip = await rawCall(fx.store.url, get, { authorization: `Bearer ${fx.readToken}`, "grpc-encoding": "gzip" }, [frame(body)]);
    expect(gzip.trailers["grpc-status"]).toBe("12");
    expect(gzip.trailers["grpc-accept-encoding"] ?? gzip.headers["grpc-accept-encoding"]).toBe("identity");
    const garbage = await rawCall(fx.store.url, get, { authorization: `Bearer ${fx.readToken}` }, [frame(Buffer.from([0xff, 0xff, 0xff]))]);
    expect(garbage.trailers["grpc-status"]).toBe("3");
    const ok = await rawCall(fx.store.url, get, { authorization: `Bearer ${fx.readToken}` }, [frame(body)]);
    expect(ok.trailers["grpc-status"]).toBe("0");
    expect(ok.data.length).toBeGreaterThan(blob.size);
  });
});
