// PutBlob and GetBlob answer the same over Connect, gRPC-Web and the raw
// gRPC path (stores/image/bulk-grpc.ts): answers, errors, auth refusals.
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { rm } from "node:fs/promises";
import { ImageStoreService } from "../../gen/treadmill/image/v1/image_store_service_pb.js";
import { makeSigner, makeTempDir, manifestFor, randomBlob, startStore, type RunningStore, type Signer } from "../support/image-store.js";
import { bearer, collect, refusals, sameOnAllPaths, stream, threePaths, type Clients, type Paths } from "./paths.js";

describe("the image store's bulk RPCs on every path", () => {
  let dir: string;
  let signer: Signer;
  let store: RunningStore;
  let paths: Paths;
  let clients: Clients<typeof ImageStoreService>;
  let write: { headers: Record<string, string> };
  let logToken: string;

  beforeAll(async () => {
    dir = await makeTempDir();
    signer = await makeSigner(dir);
    store = await startStore(signer, { dir });
    paths = threePaths(store.url);
    clients = paths.clients(ImageStoreService);
    write = bearer(await signer.token({ scope: "image:write" }));
    logToken = await signer.token({ scope: "log:read", job: "j1" });
  });

  afterAll(async () => {
    paths?.close();
    await store?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  const put = (blob: { digest: string; size: number; data: Buffer }) => ({ digest: blob.digest, size: BigInt(blob.size), offset: 0n, data: blob.data });

  it("answers PutBlob and GetBlob alike, bytes and sizes included", async () => {
    // One blob per path for the first upload (each stores it anew), then
    // the same blob again (each finds it there).
    const blobs = { connect: randomBlob(70_000), "grpc-web": randomBlob(70_000), grpc: randomBlob(70_000) };
    const first = await sameOnAllPaths(async (path) => {
      const { digest, committedSize, complete, alreadyExisted } = await clients[path].putBlob(stream(put(blobs[path])), write);
      return { ownDigest: digest === blobs[path].digest, committedSize, complete, alreadyExisted };
    });
    expect(first).toEqual({ answer: { ownDigest: true, committedSize: 70_000n, complete: true, alreadyExisted: false } });
    const again = await sameOnAllPaths((path) => clients[path].putBlob(stream(put(blobs.grpc)), write));
    expect(again).toEqual({ answer: expect.objectContaining({ digest: blobs.grpc.digest, alreadyExisted: true }) });

    const m = manifestFor([{ digest: blobs.grpc.digest, size: blobs.grpc.size }]);
    await clients.grpc.putManifest({ digest: m.digest, manifestJson: m.json }, write);
    const read = bearer(await signer.token({ scope: "image:read", digest: m.digest, holder: "test" }));
    const chunks = await sameOnAllPaths(async (path) =>
      (await collect(clients[path].getBlob({ digest: blobs.grpc.digest, offset: 1000n }, read))).map((c) => ({
        offset: c.offset,
        size: c.size,
        data: Buffer.from(c.data).toString("hex"),
      })),
    );
    expect(chunks).toEqual({ answer: [{ offset: 1000n, size: 70_000n, data: blobs.grpc.data.subarray(1000).toString("hex") }] });
  });

  it("fails bad PutBlob and GetBlob requests with the same codes and messages", async () => {
    const blob = randomBlob(100);
    expect(await sameOnAllPaths((path) => clients[path].putBlob(stream(), write))).toEqual({
      code: "InvalidArgument",
      message: "put_blob stream has no message",
    });
    expect(await sameOnAllPaths((path) => clients[path].putBlob(stream({ ...put(blob), digest: "sha256:nope" }), write))).toMatchObject({
      code: "InvalidArgument",
    });
    expect(await sameOnAllPaths((path) => clients[path].putBlob(stream({ ...put(blob), offset: 101n }), write))).toMatchObject({
      code: "OutOfRange",
    });
    const m = manifestFor([{ digest: blob.digest, size: blob.size }]);
    const read = bearer(await signer.token({ scope: "image:read", digest: m.digest, holder: "test" }));
    expect(await sameOnAllPaths((path) => collect(clients[path].getBlob({ digest: "sha256:short", offset: 0n }, read)))).toMatchObject({
      code: "InvalidArgument",
    });
    expect(await sameOnAllPaths((path) => collect(clients[path].getBlob({ digest: blob.digest, offset: 0n }, read)))).toMatchObject({
      code: expect.stringMatching(/NotFound|PermissionDenied/),
    });
  });

  it("refuses callers without a token, with a malformed one, or with a token of another kind, alike", async () => {
    const blob = randomBlob(100);
    for (const { name, options } of refusals(logToken)) {
      const putOutcome = await sameOnAllPaths((path) => clients[path].putBlob(stream(put(blob)), options));
      const getOutcome = await sameOnAllPaths((path) => collect(clients[path].getBlob({ digest: blob.digest, offset: 0n }, options)));
      const expected = name === "wrong kind" ? "PermissionDenied" : "Unauthenticated";
      expect([name, putOutcome]).toEqual([name, expect.objectContaining({ code: expected })]);
      expect([name, getOutcome]).toEqual([name, expect.objectContaining({ code: expected })]);
    }
  });
});
