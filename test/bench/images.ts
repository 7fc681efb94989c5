// `npm run bench -- images`: blob throughput of the image store and cache over
// loopback, each figure beside raw loopback TCP and `sha256sum` measured in the
// same run. The store and the cache run as child processes (bin/
// treadmill-image-store.js), the clients (lib/image/client.ts: its thin gRPC
// client for PutBlob and GetBlob) in this process; every receiver verifies
// the digest.
//
// Size: TREADMILL_BENCH_IMAGE_MIB (default 1024, a 1 GiB blob).
// Supervisors: TREADMILL_BENCH_IMAGE_SUPERVISORS (default 8).
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { ImageCacheService } from "../../gen/treadmill/image/v1/image_cache_service_pb.js";
import { fileSource } from "../../lib/image/blob-io.js";
import {
  imageStoreClient,
  imageStoreTransport,
  readBlobPieces,
  uploadBlob,
  type ImageTransport,
} from "../../lib/image/client.js";
import { digestFile } from "../../lib/image/digest.js";
import { TokenSigner, generateSigningKey } from "../../lib/tokens.js";
import { startProcess, type RunningProcess } from "../support/process.js";
import { fileAppendMBps, rawTcpMBps, sha256sumMBps, writeRandomFile } from "./baselines.js";
import { report } from "./report.js";

const MIB = 1024 * 1024;

async function startServer(args: string[]): Promise<{ proc: RunningProcess; url: string }> {
  const proc = startProcess("bin/treadmill-image-store.js", ["--port", "0", "--log-level", "info", ...args]);
  const line = await proc.waitForLine(/image store ready/, 30_000);
  const url = (JSON.parse(line) as { url: string }).url;
  return { proc, url };
}

/** Peak resident memory (VmHWM) of a process, in MiB. */
async function peakRssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const kb = Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? NaN);
  return kb / 1024;
}

/** Resets VmHWM to the current RSS (Linux: write 5 to clear_refs). */
async function resetPeak(pid: number): Promise<void> {
  await writeFile(`/proc/${pid}/clear_refs`, "5").catch(() => undefined);
}

async function timed<T>(fn: () => Promise<T>): Promise<{ seconds: number; value: T }> {
  const started = performance.now();
  const value = await fn();
  return { seconds: (performance.now() - started) / 1000, value };
}

/** Downloads a whole blob, hashing it, discarding the bytes; returns the digest. */
async function hashDownload(url: string, token: string, digest: string): Promise<string> {
  const transport = imageStoreTransport(url, { token });
  try {
    const hash = createHash("sha256");
    for await (const pieces of readBlobPieces(imageStoreClient(transport), { digest })) {
      for (const piece of pieces) hash.update(piece);
    }
    return `sha256:${hash.digest("hex")}`;
  } finally {
    transport.close();
  }
}

export async function run(): Promise<void> {
  const sizeMiB = Number(process.env.TREADMILL_BENCH_IMAGE_MIB ?? 1024);
  const supervisors = Number(process.env.TREADMILL_BENCH_IMAGE_SUPERVISORS ?? 8);
  const bytes = sizeMiB * MIB;
  const dir = await mkdtemp(join(tmpdir(), "tml-bench-images-"));
  const procs: RunningProcess[] = [];
  const transports: ImageTransport[] = [];
  try {
    const key = await generateSigningKey();
    const signer = await TokenSigner.create(key, { issuer: "bench" });
    const jwks = join(dir, "jwks.json");
    await writeFile(jwks, JSON.stringify(signer.publicJwks()));
    const file = join(dir, "blob.bin");
    await writeRandomFile(file, bytes);
    const { digest, size } = await digestFile(file);
    process.stdout.write(`blob: ${sizeMiB} MiB, random bytes; ${supervisors} supervisors\n`);

    const tcp = { name: "raw TCP", value: await rawTcpMBps(bytes) };
    const sha = { value: await sha256sumMBps(file) };
    // What verifying at the receiver allows at best (FACTS.md: about 65%).
    const tcpHashed = { name: "TCP+sha256", value: await rawTcpMBps(bytes, MIB, true) };
    report("raw loopback TCP", tcp.value, "MB/s");
    report("sha256sum of the file", sha.value, "MB/s");
    report("raw loopback TCP, receiver hashes (sha256)", tcpHashed.value, "MB/s", tcp);
    // What a store's disk allows: PutBlob writes and fsyncs every byte.
    const disk = { name: "append+fsync", value: await fileAppendMBps(join(dir, "append.bin"), bytes, MIB, 0) };
    report("plain file append, fsync at the end", disk.value, "MB/s");

    const store = await startServer(["--mode", "store", "--data-dir", join(dir, "store"), "--signing-keys-file", jwks]);
    procs.push(store.proc);
    const writeToken = await signer.sign({ scope: "image:write" }, 3_600_000, { subject: "bench" });
    const writer = imageStoreTransport(store.url, { token: writeToken });
    transports.push(writer);
    const put = await timed(() => uploadBlob(imageStoreClient(writer), { digest, size, source: fileSource(file) }));
    report("PutBlob (store hashes, writes, fsyncs)", size / 1e6 / put.seconds, "MB/s", tcp);
    report("PutBlob against hashed TCP", size / 1e6 / put.seconds, "MB/s", tcpHashed);
    report("PutBlob against the disk", size / 1e6 / put.seconds, "MB/s", disk);

    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        layers: [{ mediaType: "application/vnd.treadmill.disk.raw", digest, size }],
      }),
    );
    const manifestDigest = `sha256:${createHash("sha256").update(manifest).digest("hex")}`;
    await imageStoreClient(writer).putManifest({ digest: manifestDigest, manifestJson: manifest });
    const readToken = await signer.sign({ scope: "image:read", digest: manifestDigest, holder: "bench" }, 3_600_000, { subject: "bench" });

    const get = await timed(() => hashDownload(store.url, readToken, digest));
    if (get.value !== digest) throw new Error("GetBlob digest mismatch");
    report("GetBlob (client hashes)", size / 1e6 / get.seconds, "MB/s", tcp);
    report("GetBlob against hashed TCP", size / 1e6 / get.seconds, "MB/s", tcpHashed);

    const cache = await startServer(["--mode", "cache", "--data-dir", join(dir, "cache"), "--signing-keys-file", jwks, "--upstream-urls", store.url]);
    procs.push(cache.proc);
    const cacheClient = imageStoreTransport(cache.url, { token: readToken });
    transports.push(cacheClient);
    const fetchOnce = async () => {
      for await (const m of createClient(ImageCacheService, cacheClient).fetch({ manifestDigest, locations: [store.url] })) {
        if (m.payload.case === "done") return m.payload.value;
      }
      throw new Error("fetch ended without done");
    };
    const fetch = await timed(fetchOnce);
    report("cache Fetch from the store (cache hashes, writes)", size / 1e6 / fetch.seconds, "MB/s", tcp);

    // 8 supervisors at once: the cache is emptied first so their fetches
    // share one transfer, then each reads the blob through the cache.
    await cache.proc.child.kill("SIGTERM");
    await cache.proc.exited;
    const cache2 = await startServer(["--mode", "cache", "--data-dir", join(dir, "cache2"), "--signing-keys-file", jwks, "--upstream-urls", store.url]);
    procs.push(cache2.proc);
    const viaCache2 = imageStoreTransport(cache2.url, { token: readToken });
    transports.push(viaCache2);
    const shared = await timed(() =>
      Promise.all(
        Array.from({ length: supervisors }, async () => {
          for await (const m of createClient(ImageCacheService, viaCache2).fetch({ manifestDigest, locations: [store.url] })) {
            if (m.payload.case === "done") return m.payload.value.hit;
          }
          throw new Error("fetch ended without done");
        }),
      ),
    );
    report(`${supervisors} concurrent Fetch of one image (shared)`, size / 1e6 / shared.seconds, "MB/s", tcp);
    await resetPeak(cache2.proc.child.pid!);
    const reads = await timed(() => Promise.all(Array.from({ length: supervisors }, () => hashDownload(cache2.url, readToken, digest))));
    if (reads.value.some((d) => d !== digest)) throw new Error("GetBlob through the cache: digest mismatch");
    report(`${supervisors} concurrent GetBlob from the cache (total)`, (supervisors * size) / 1e6 / reads.seconds, "MB/s", tcp);
    report(`cache peak RSS during ${supervisors} concurrent downloads`, await peakRssMiB(cache2.proc.child.pid!), "MiB", {
      name: "goal",
      value: 256,
    });
  } finally {
    for (const t of transports) t.close();
    for (const p of procs) {
      p.child.kill("SIGTERM");
      await p.exited;
    }
    await rm(dir, { recursive: true, force: true });
  }
}
