import { execFileSync } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "@jest/globals";
import { create } from "@bufbuild/protobuf";
import { ArtifactTargetSchema } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { downloadBlob } from "../../lib/image/client.js";
import { collectArtifacts, uploadArtifacts } from "../../supervisor/artifacts.js";
import { makeSigner, randomBlob, startStore } from "../support/image-store.js";

const caps = { maxFileBytes: 1000n, maxJobBytes: 1500n, maxFiles: 3 };

/** A port nothing listens on (bound, then closed). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

describe("collecting a job's artifacts on the supervisor", () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "artifacts-"));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("takes regular files by name within the caps and skips links, special files and what is over a cap", async () => {
    const root = join(dir, "a");
    await mkdir(join(root, "sub", "deeper"), { recursive: true });
    await writeFile(join(root, "b.txt"), "b".repeat(600));
    await writeFile(join(root, "sub", "deeper", "a.log"), "a".repeat(500));
    await writeFile(join(root, "huge.bin"), "h".repeat(1001));
    await writeFile(join(root, "z.json"), "{}".repeat(300));
    await symlink("/etc/passwd", join(root, "passwd"));
    await symlink("/etc", join(root, "etc"));
    execFileSync("mkfifo", [join(root, "fifo")]);
    const { files, skipped } = await collectArtifacts(root, caps, "host-1/");
    expect(files.map((f) => [f.name, f.size, f.mediaType])).toEqual([
      ["host-1/b.txt", 600, "text/plain"],
      ["host-1/sub/deeper/a.log", 500, "text/plain"],
    ]);
    expect(files[0].path).toBe(join(root, "b.txt"));
    expect(skipped.map((s) => [s.name, s.reason]).sort()).toEqual([
      ["host-1/etc", "a symbolic link (not followed)"],
      ["host-1/fifo", "not a regular file"],
      ["host-1/huge.bin", "larger than the per-file cap of 1000 bytes"],
      ["host-1/passwd", "a symbolic link (not followed)"],
      ["host-1/z.json", "over the per-job cap of 1.5 KiB"],
    ]);
  });

  it("reads nothing through an artifacts directory whose path the job turned into a link", async () => {
    await mkdir(join(dir, "rootfs", "run"), { recursive: true });
    // The job made /run/treadmill point at the host's /etc.
    await symlink("/etc", join(dir, "rootfs", "run", "treadmill"));
    const lines: string[] = [];
    const report = await uploadArtifacts({
      root: join(dir, "rootfs"),
      rel: "run/treadmill/artifacts",
      target: create(ArtifactTargetSchema, { uploadUrl: "http://127.0.0.1:9", ...caps }),
      jobId: "j",
      attempt: 1,
      hostIndex: 0,
      prefix: "",
      reportId: "r",
      say: (t) => lines.push(t),
      signal: AbortSignal.timeout(10_000),
    });
    expect(report?.files ?? []).toEqual([]);
    expect(report?.error).toMatch(/^cannot read the artifacts directory: .*run\/treadmill is not a directory$/);
  });

  it("reports an upload that cannot finish within the collection deadline as failed, without throwing", async () => {
    const root = join(dir, "rootfs");
    await mkdir(join(root, "out"), { recursive: true });
    await writeFile(join(root, "out", "r.txt"), "result");
    const lines: string[] = [];
    const started = Date.now();
    const report = await uploadArtifacts({
      root,
      rel: "out",
      target: create(ArtifactTargetSchema, { uploadUrl: `http://127.0.0.1:${await closedPort()}`, writeToken: { token: "t" }, ...caps }),
      jobId: "j",
      attempt: 1,
      hostIndex: 0,
      prefix: "",
      reportId: "r",
      say: (t) => lines.push(t),
      signal: AbortSignal.timeout(300),
    });
    expect(Date.now() - started).toBeLessThan(5000);
    expect(report?.error).toBe("the upload did not finish within the collection deadline");
    expect(report?.files ?? []).toEqual([]);
    expect(lines).toContain("artifacts: upload failed: the upload did not finish within the collection deadline");
  });

  it("uploads each file in one read, hashed as it is sent: the manifest lists every file by its digest and each downloads byte-identical", async () => {
    const signer = await makeSigner(dir);
    const store = await startStore(signer, { dir: join(dir, "store") });
    try {
      const root = join(dir, "rootfs");
      await mkdir(join(root, "out", "sub"), { recursive: true });
      const big = randomBlob(9 * 1024 * 1024 + 17);
      const small = randomBlob(100);
      await writeFile(join(root, "out", "image.bin"), big.data);
      await writeFile(join(root, "out", "sub", "a.txt"), small.data);
      await writeFile(join(root, "out", "sub", "same.txt"), small.data);
      await writeFile(join(root, "out", "empty.log"), "");
      const lines: string[] = [];
      const report = await uploadArtifacts({
        root,
        rel: "out",
        target: create(ArtifactTargetSchema, {
          uploadUrl: store.url,
          writeToken: { token: await signer.signer.sign({ scope: "image:write" }, 600_000, { subject: "owner" }) },
          maxFileBytes: 64n * 1024n * 1024n,
          maxJobBytes: 64n * 1024n * 1024n,
          maxFiles: 10,
        }),
        jobId: "j",
        attempt: 1,
        hostIndex: 0,
        prefix: "",
        reportId: "r",
        say: (t) => lines.push(t),
        signal: AbortSignal.timeout(60_000),
      });
      expect(report?.error).toBeUndefined();
      const empty = randomBlob(0);
      expect((report?.files ?? []).map((f) => [f.name, f.digest, f.sizeBytes])).toEqual([
        ["empty.log", empty.digest, 0n],
        ["image.bin", big.digest, BigInt(big.size)],
        ["sub/a.txt", small.digest, 100n],
        ["sub/same.txt", small.digest, 100n],
      ]);
      expect(lines.at(-1)).toBe(`artifacts: uploaded 4 files, manifest ${report?.manifestDigest}`);
      const reader = store.client(await signer.signer.sign({ scope: "image:read", digest: report?.manifestDigest ?? "", holder: "owner" }, 600_000, { subject: "owner" }));
      for (const b of [big, small, empty]) {
        const out = join(dir, `down-${b.size}`);
        await downloadBlob(reader, { digest: b.digest, size: b.size }, out);
        expect((await readFile(out)).equals(b.data)).toBe(true);
      }
    } finally {
      await store.stop();
    }
  });
});
