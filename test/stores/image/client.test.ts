// The image client's thin PutBlob/GetBlob (lib/image/client.ts) against a real
// store: what a Connect client gives (statuses, deadlines, cancellation) and
// what it adds (pieces without copies, a background writer), and a stock
// connect-node gRPC client against the store's bulk handler.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { open, readFile } from "node:fs/promises";
import { createServer, type AddressInfo } from "node:net";
import { join } from "node:path";
import { ImageStoreService } from "../../../gen/treadmill/image/v1/image_store_service_pb.js";
import { BackgroundWriter } from "../../../lib/image/blob-io.js";
import { imageStoreClient, imageStoreTransport, readBlobPieces } from "../../../lib/image/client.js";
import { codeOf, collect, makeTempDir, randomBlob, removeDir, storeWithImage } from "../../support/image-store.js";

const MIB = 1024 * 1024;

describe("the image client's bulk calls", () => {
  const blob = randomBlob(5 * MIB + 3);
  const fx = storeWithImage([blob]);

  it("reads a blob as pieces that join to its bytes, whole and by range", async () => {
    const reader = fx.store.client(fx.readToken);
    const whole = await collect(readBlobPieces(reader, { digest: blob.digest }));
    // Messages of at most one chunk, each in several pieces (HTTP/2 frames).
    expect(whole.length).toBe(6);
    expect(whole[0].length).toBeGreaterThan(1);
    expect(Buffer.concat(whole.flat()).equals(blob.data)).toBe(true);
    const range = await collect(readBlobPieces(reader, { digest: blob.digest, offset: MIB - 7, length: MIB + 20 }));
    expect(Buffer.concat(range.flat()).equals(blob.data.subarray(MIB - 7, 2 * MIB + 13))).toBe(true);
  });

  it("answers the store's statuses with their messages", async () => {
    const anonymous = fx.store.client("");
    const err = await collect(anonymous.getBlob({ digest: blob.digest })).catch((e: unknown) => e as Error);
    expect(await codeOf(collect(anonymous.getBlob({ digest: blob.digest })))).toBe(Code.Unauthenticated);
    expect((err as Error).message).toContain("missing token");
    expect(await codeOf(collect(fx.store.client(fx.readToken).getBlob({ digest: "sha256:abc" })))).toBe(Code.InvalidArgument);
    const other = randomBlob(10);
    expect(await codeOf(collect(fx.store.client(fx.readToken).getBlob({ digest: other.digest })))).toBe(Code.PermissionDenied);
    expect(
      await codeOf(
        fx.store.client(fx.readToken).putBlob(
          (async function* () {
            yield { digest: other.digest, size: 10n, data: other.data };
          })(),
        ),
      ),
    ).toBe(Code.PermissionDenied);
  });

  it("ends an upload at its deadline (DeadlineExceeded) and the store keeps what arrived", async () => {
    const fresh = randomBlob(3 * MIB);
    const client = fx.store.client(fx.writeToken);
    let release!: () => void;
    const stalled = new Promise<void>((r) => (release = r));
    const requests = async function* () {
      yield { digest: fresh.digest, size: BigInt(fresh.size), offset: 0n, data: fresh.data.subarray(0, MIB) };
      await stalled;
    };
    expect(await codeOf(client.putBlob(requests(), { timeoutMs: 1500 }))).toBe(Code.DeadlineExceeded);
    release();
    const deadline = Date.now() + 20_000;
    let committed = 0;
    while (committed < MIB && Date.now() < deadline) {
      committed = Number((await client.queryUpload({ digest: fresh.digest })).committedOffset);
      if (committed < MIB) await new Promise((r) => setTimeout(r, 20));
    }
    expect(committed).toBe(MIB);
  });

  it("cancels a download when the caller's signal aborts (Canceled)", async () => {
    const controller = new AbortController();
    let received = 0;
    const read = (async () => {
      for await (const pieces of readBlobPieces(fx.store.client(fx.readToken), { digest: blob.digest }, { signal: controller.signal })) {
        received += pieces.length;
        controller.abort();
      }
    })();
    expect(await codeOf(read)).toBe(Code.Canceled);
    expect(received).toBeGreaterThan(0);
    // The connection is still good for the next call.
    const again = await collect(readBlobPieces(fx.store.client(fx.readToken), { digest: blob.digest, length: 10 }));
    expect(Buffer.concat(again.flat()).equals(blob.data.subarray(0, 10))).toBe(true);
  });

  it("answers Unavailable when nothing listens at the store's address", async () => {
    const probe = createServer();
    await new Promise<void>((r) => probe.listen(0, "127.0.0.1", r));
    const port = (probe.address() as AddressInfo).port;
    await new Promise<void>((r) => probe.close(() => r()));
    const transport = imageStoreTransport(`http://127.0.0.1:${port}`, { token: fx.readToken });
    try {
      expect(await codeOf(collect(imageStoreClient(transport).getBlob({ digest: blob.digest })))).toBe(Code.Unavailable);
    } finally {
      transport.close();
    }
  });

  it("serves a stock connect-node gRPC client, which compresses nothing the store refuses", async () => {
    const transport = createGrpcTransport({
      baseUrl: fx.store.url,
      interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${fx.writeToken}`), next(req))],
    });
    const client = createClient(ImageStoreService, transport);
    const fresh = randomBlob(2 * MIB + 5);
    const put = await client.putBlob(
      (async function* () {
        yield { digest: fresh.digest, size: BigInt(fresh.size), offset: 0n, data: fresh.data.subarray(0, MIB) };
        yield { offset: BigInt(MIB), data: fresh.data.subarray(MIB) };
      })(),
    );
    expect(put).toMatchObject({ complete: true, committedSize: BigInt(fresh.size) });
    const reader = createClient(
      ImageStoreService,
      createGrpcTransport({
        baseUrl: fx.store.url,
        interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${fx.readToken}`), next(req))],
      }),
    );
    const chunks = await collect(reader.getBlob({ digest: blob.digest }));
    expect(Buffer.concat(chunks.map((c) => c.data)).equals(blob.data)).toBe(true);
  });
});

describe("BackgroundWriter", () => {
  let dir: string;

  beforeAll(async () => {
    dir = await makeTempDir();
  });

  afterAll(async () => {
    await removeDir(dir);
  });

  it("writes what it is given in order, from its position on", async () => {
    const path = join(dir, "ordered.bin");
    const data = randomBlob(3 * MIB + 17).data;
    const file = await open(path, "w");
    try {
      await file.write(Buffer.from("head"));
      const writer = new BackgroundWriter(file, 4, { maxBacklogBytes: MIB });
      // Pieces of odd sizes, queued without waiting for the disk between them.
      for (let at = 0; at < data.length; ) {
        const n = Math.min(data.length - at, 1 + ((at * 7919) % 300_000));
        await writer.write([data.subarray(at, at + Math.floor(n / 2)), data.subarray(at + Math.floor(n / 2), at + n)]);
        at += n;
      }
      await writer.settle();
      expect(writer.written).toBe(4 + data.length);
    } finally {
      await file.close();
    }
    expect((await readFile(path)).equals(Buffer.concat([Buffer.from("head"), data]))).toBe(true);
  });

  it("rejects every later write and settle once a write failed", async () => {
    const path = join(dir, "readonly.bin");
    await (await open(path, "w")).close();
    const file = await open(path, "r");
    try {
      const writer = new BackgroundWriter(file, 0);
      await writer.write([Buffer.alloc(100)]);
      await expect(writer.settle()).rejects.toThrow();
      await expect(writer.write([Buffer.alloc(1)])).rejects.toThrow();
      expect(writer.written).toBe(0);
    } finally {
      await file.close();
    }
  });
});
