// `npm run bench -- artifacts`: a job's artifact upload as the supervisor
// does it when the job ends (supervisor/artifacts.ts uploadArtifacts: walk
// the directory, PutBlob with the digest at the end, hashed while sent, so
// the file is read once; PutManifest) against
// PutBlob of the same file straight to the same store with its digest known
// beforehand, the baseline, measured in the same run (and beside it
// sha256sum of the file, and the baseline plus a hash of the file, which is
// what any client that must learn the digest first can do at best). The
// store runs as a child process (bin/treadmill-image-store.js); rounds
// alternate which goes first, and the store is emptied between runs
// (DeleteManifest, CollectGarbage) so each upload writes the whole blob.
//
// Size: TREADMILL_BENCH_ARTIFACT_MIB (default 1024, a 1 GiB file of random bytes).
// Rounds: TREADMILL_BENCH_ARTIFACT_ROUNDS (default 2).
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { ArtifactTargetSchema } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { fileSource } from "../../lib/image/blob-io.js";
import { imageStoreClient, imageStoreTransport, uploadBlob } from "../../lib/image/client.js";
import { digestFile } from "../../lib/image/digest.js";
import { TokenSigner, generateSigningKey } from "../../lib/tokens.js";
import { uploadArtifacts } from "../../supervisor/artifacts.js";
import { startProcess } from "../support/process.js";
import { sha256sumMBps, writeRandomFile } from "./baselines.js";
import { report } from "./report.js";

const MIB = 1024 * 1024;

async function timed<T>(fn: () => Promise<T>): Promise<{ seconds: number; value: T }> {
  const started = performance.now();
  const value = await fn();
  return { seconds: (performance.now() - started) / 1000, value };
}

export async function run(): Promise<void> {
  const sizeMiB = Number(process.env.TREADMILL_BENCH_ARTIFACT_MIB ?? 1024);
  const rounds = Number(process.env.TREADMILL_BENCH_ARTIFACT_ROUNDS ?? 2);
  const bytes = sizeMiB * MIB;
  const dir = await mkdtemp(join(tmpdir(), "tml-bench-artifacts-"));
  const proc = { current: undefined as ReturnType<typeof startProcess> | undefined };
  try {
    const signer = await TokenSigner.create(await generateSigningKey(), { issuer: "bench" });
    const jwks = join(dir, "jwks.json");
    await writeFile(jwks, JSON.stringify(signer.publicJwks()));
    const artifacts = join(dir, "job", "artifacts");
    await mkdir(artifacts, { recursive: true });
    const file = join(artifacts, "image.bin");
    await writeRandomFile(file, bytes);
    const { digest, size } = await digestFile(file);
    process.stdout.write(`artifact: one file of ${sizeMiB} MiB, random bytes; ${rounds} rounds\n`);
    const sha = { name: "sha256sum", value: await sha256sumMBps(file) };
    report("sha256sum of the file", sha.value, "MB/s");

    proc.current = startProcess("bin/treadmill-image-store.js", ["--port", "0", "--log-level", "info", "--mode", "store", "--data-dir", join(dir, "store"), "--signing-keys-file", jwks]);
    const line = await proc.current.waitForLine(/image store ready/, 30_000);
    const url = (JSON.parse(line) as { url: string }).url;
    const writeToken = await signer.sign({ scope: "image:write" }, 3_600_000, { subject: "bench-user" });
    const adminToken = await signer.sign({ scope: "image:admin" }, 3_600_000, { subject: "bench-admin" });
    const admin = imageStoreTransport(url, { token: adminToken });
    const writer = imageStoreTransport(url, { token: writeToken });
    const target = create(ArtifactTargetSchema, {
      uploadUrl: url,
      writeToken: { token: writeToken },
      maxFileBytes: BigInt(bytes * 2),
      maxJobBytes: BigInt(bytes * 2),
      maxFiles: 128,
    });
    const empty = async (manifest?: string) => {
      if (manifest) await imageStoreClient(admin).deleteManifest({ digest: manifest });
      const gc = await imageStoreClient(admin).collectGarbage({ gracePeriod: {} });
      if (!gc.deletedDigests.includes(digest)) throw new Error("the store kept the blob: the next upload would not send it");
    };
    const putBlob = async () => {
      const t = await timed(() => uploadBlob(imageStoreClient(writer), { digest, size, source: fileSource(file) }));
      if (t.value.alreadyExisted) throw new Error("PutBlob found the blob there");
      await empty();
      return size / 1e6 / t.seconds;
    };
    const lines: string[] = [];
    const artifact = async (round: number) => {
      const t = await timed(() =>
        uploadArtifacts({
          root: join(dir, "job"),
          rel: "artifacts",
          target,
          jobId: "bench",
          attempt: round,
          hostIndex: 0,
          prefix: "",
          reportId: `bench-${round}`,
          say: (text) => lines.push(text),
          signal: AbortSignal.timeout(600_000),
        }),
      );
      const r = t.value;
      if (!r || r.error || r.files?.length !== 1 || r.files[0].digest !== digest) throw new Error(`upload failed: ${r?.error ?? "no report"}`);
      await empty(r.manifestDigest);
      return size / 1e6 / t.seconds;
    };

    const base: number[] = [];
    const ours: number[] = [];
    for (let round = 1; round <= rounds; round++) {
      if (round % 2 === 1) {
        base.push(await putBlob());
        ours.push(await artifact(round));
      } else {
        ours.push(await artifact(round));
        base.push(await putBlob());
      }
      report(`round ${round}: PutBlob, digest known (baseline)`, base.at(-1)!, "MB/s");
      report(`round ${round}: artifact upload`, ours.at(-1)!, "MB/s", { name: "PutBlob", value: base.at(-1)! });
    }
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    const putBlobMean = { name: "PutBlob", value: mean(base) };
    report("PutBlob straight to the store (mean)", putBlobMean.value, "MB/s");
    report("artifact upload (mean)", mean(ours), "MB/s", putBlobMean);
    // What a client that must hash the file first reaches at best: the two costs in a row.
    const hashThenPut = { name: "sha256 then PutBlob", value: 1 / (1 / sha.value + 1 / putBlobMean.value) };
    report("artifact upload against hash-then-PutBlob", mean(ours), "MB/s", hashThenPut);
    process.stdout.write(`supervisor log lines of the last upload: ${lines.filter((l) => l.includes("%")).length} progress lines\n`);
  } finally {
    proc.current?.child.kill("SIGTERM");
    await proc.current?.exited;
    await rm(dir, { recursive: true, force: true });
  }
}
