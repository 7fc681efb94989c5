/**
 * A job's files on the supervisor (docs/artifacts.md): its inputs, fetched
 * before the workload starts, and its artifacts, collected and uploaded
 * when it ends (also when it failed or was canceled).
 *
 * Artifacts: every regular file under the driver's artifacts directory
 * (symbolic links and other special files are skipped, never followed), by
 * name, within StartJob's caps (per file, per attempt, file count); a file
 * over a cap is skipped and reported, never an error. Each file is read
 * once: uploaded with PutBlob's digest at the end (lib/image/client.ts
 * uploadBlobHashing: hashed while sent, the store commits it only if the
 * digest matches; a failed upload is sent again whole), to StartJob's store
 * with its write token (minted for the job's owner, who holds them). The
 * files are then listed as the layers of one store manifest (each layer's
 * title annotation is the file's name; the manifest names the job, attempt
 * and host, so each attempt's manifest is its own), stored with PutManifest.
 * The manifest keeps the blobs from the store's garbage collection until the
 * coordinator's retention deletes it.
 *
 * The directory is read only after every process of the job is gone (the
 * driver's `exited`), so nothing of the job can swap a path while it is
 * read; each component of the directory's own path is checked not to be a
 * symbolic link (a job could otherwise point it at the host's files).
 */
import { createReadStream } from "node:fs";
import { chmod, lstat, mkdir, open, readdir } from "node:fs/promises";
import { join, relative, sep } from "node:path";
import { constants } from "node:fs";
import { Code, ConnectError } from "@connectrpc/connect";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type {
  ArtifactTarget,
  JobArtifactsReportSchema,
  JobInputSource,
} from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { JobInput } from "../gen/treadmill/coordinator/v1/job_pb.js";
import { formatBytes } from "../lib/bytes.js";
import { downloadBlob, imageStoreClient, imageStoreTransport, uploadBlobHashing, type ImageStoreClient } from "../lib/image/client.js";
import { BLOB_CHUNK_BYTES } from "../lib/image/blob-io.js";
import { buildManifest } from "../lib/image/manifest.js";
import type { ClientTls } from "../lib/grpc/trust.js";
import { ImageError, ImageUnavailableError } from "./images.js";

export type ArtifactsReport = MessageInitShape<typeof JobArtifactsReportSchema>;

/** The manifest layer annotation holding an artifact's name (OCI's title). */
export const TITLE_ANNOTATION = "org.opencontainers.image.title";

/** Media types guessed from a name's extension; others are application/octet-stream. */
const MEDIA_TYPES: Record<string, string> = {
  txt: "text/plain",
  log: "text/plain",
  json: "application/json",
  xml: "application/xml",
  html: "text/html",
  csv: "text/csv",
  tar: "application/x-tar",
  gz: "application/gzip",
  tgz: "application/gzip",
  zip: "application/zip",
  png: "image/png",
  svg: "image/svg+xml",
};

export function mediaTypeOf(name: string): string {
  const ext = /\.([A-Za-z0-9]+)$/.exec(name)?.[1]?.toLowerCase() ?? "";
  return MEDIA_TYPES[ext] ?? "application/octet-stream";
}

interface Collected {
  files: { name: string; path: string; size: number; mediaType: string }[];
  skipped: { name: string; sizeBytes: bigint; reason: string }[];
}

/** Throws unless every component of `rel` under `root` is a real directory (no symbolic link). */
async function checkRealDir(root: string, rel: string): Promise<string> {
  let path = root;
  for (const part of ["", ...rel.split("/").filter((p) => p !== "")]) {
    path = part === "" ? path : join(path, part);
    const st = await lstat(path);
    if (!st.isDirectory() || st.isSymbolicLink()) throw new Error(`${path} is not a directory`);
  }
  return path;
}

/**
 * Uploads one file, reading it once (hashed while sent); resolves with its
 * digest and size. A file that cannot be opened as a regular file (a link:
 * O_NOFOLLOW, never followed) rejects with a plain Error; the store's
 * refusals with a ConnectError.
 */
async function uploadFile(
  store: ImageStoreClient,
  path: string,
  options: { signal: AbortSignal; onProgress: (bytesDone: number) => void },
): Promise<{ digest: string; size: number }> {
  const handle = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    const st = await handle.stat();
    if (!st.isFile()) throw new Error("not a regular file");
    const source = (offset: number) =>
      createReadStream("", { fd: handle.fd, autoClose: false, start: offset, highWaterMark: BLOB_CHUNK_BYTES }) as AsyncIterable<Buffer>;
    const { digest } = await uploadBlobHashing(store, { size: st.size, source }, { signal: options.signal, onProgress: (p) => options.onProgress(p.bytesDone) });
    return { digest, size: st.size };
  } finally {
    await handle.close();
  }
}

/**
 * The files under `dir` to upload, within `target`'s caps, names prefixed
 * with `prefix`; what is left out, with why.
 */
export async function collectArtifacts(dir: string, target: Pick<ArtifactTarget, "maxFileBytes" | "maxJobBytes" | "maxFiles">, prefix = ""): Promise<Collected> {
  const found: { name: string; path: string; size: number }[] = [];
  const skipped: Collected["skipped"] = [];
  const walk = async (at: string): Promise<void> => {
    const entries = await readdir(at, { withFileTypes: true });
    for (const e of entries) {
      const path = join(at, e.name);
      const name = prefix + relative(dir, path).split(sep).join("/");
      if (e.isDirectory()) await walk(path);
      else if (e.isFile()) found.push({ name, path, size: (await lstat(path)).size });
      else skipped.push({ name, sizeBytes: 0n, reason: e.isSymbolicLink() ? "a symbolic link (not followed)" : "not a regular file" });
    }
  };
  await walk(dir);
  found.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const maxFile = Number(target.maxFileBytes);
  const maxJob = Number(target.maxJobBytes);
  const files: Collected["files"] = [];
  let total = 0;
  for (const f of found) {
    if (f.name.length > 1024) skipped.push({ name: f.name.slice(0, 256), sizeBytes: BigInt(f.size), reason: "name longer than 1024 characters" });
    else if (f.size > maxFile) skipped.push({ name: f.name, sizeBytes: BigInt(f.size), reason: `larger than the per-file cap of ${formatBytes(maxFile)}` });
    else if (total + f.size > maxJob) skipped.push({ name: f.name, sizeBytes: BigInt(f.size), reason: `over the per-job cap of ${formatBytes(maxJob)}` });
    else if (files.length >= target.maxFiles) skipped.push({ name: f.name, sizeBytes: BigInt(f.size), reason: `over the cap of ${target.maxFiles} files` });
    else {
      files.push({ name: f.name, path: f.path, size: f.size, mediaType: mediaTypeOf(f.name) });
      total += f.size;
    }
  }
  return { files, skipped };
}

export interface UploadArtifactsOptions {
  /** Host-side path of the job's artifacts directory and where it is below it (checked for links). */
  root: string;
  rel: string;
  target: ArtifactTarget;
  /** Names a report, a manifest. */
  jobId: string;
  attempt: number;
  hostIndex: number;
  /** Names of host N >= 1 of a multi-host job start with `host-N/`. */
  prefix: string;
  reportId: string;
  /** Files already left out (console artifacts over a cap or garbled). */
  skipped?: ArtifactsReport["skipped"];
  /** A line on the job's `supervisor` channel. */
  say: (text: string) => void;
  signal: AbortSignal;
  tls?: ClientTls;
}

/**
 * Collects and uploads the artifacts; resolves with the report to send
 * (undefined when there was nothing at all). Never throws: a failure is in
 * the report's `error`.
 */
export async function uploadArtifacts(o: UploadArtifactsOptions): Promise<ArtifactsReport | undefined> {
  const base = { reportId: o.reportId, jobId: o.jobId, attempt: o.attempt, uploadUrl: o.target.uploadUrl };
  let collected: Collected;
  const earlier = (o.skipped ?? []).map((s) => ({ name: s.name ?? "", sizeBytes: s.sizeBytes ?? 0n, reason: s.reason ?? "" }));
  try {
    const dir = await checkRealDir(o.root, o.rel);
    collected = await collectArtifacts(dir, o.target, o.prefix);
    collected.skipped.unshift(...earlier);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") collected = { files: [], skipped: earlier };
    else {
      const error = `cannot read the artifacts directory: ${err instanceof Error ? err.message : String(err)}`;
      o.say(`artifacts: ${error}`);
      return { ...base, skipped: earlier, error };
    }
  }
  const { files, skipped } = collected;
  for (const s of skipped) o.say(`artifacts: skipped ${s.name}: ${s.reason}`);
  if (files.length === 0) return skipped.length === 0 ? undefined : { ...base, skipped };
  const total = files.reduce((sum, f) => sum + f.size, 0);
  o.say(`artifacts: uploading ${files.length} file${files.length === 1 ? "" : "s"} (${formatBytes(total)}) to ${o.target.uploadUrl}`);
  const uploaded: (Collected["files"][number] & { digest: string })[] = [];
  let lastPercent = -1;
  let before = 0;
  const transport = imageStoreTransport(o.target.uploadUrl, { token: o.target.writeToken?.token ?? "", tls: o.tls });
  let manifestDigest: string;
  try {
    const store = imageStoreClient(transport);
    for (const f of files) {
      const onProgress = (bytesDone: number) => {
        // Progress of big uploads: a line every 10%.
        if (total < 64 * 1024 * 1024) return;
        const percent = Math.floor(((before + bytesDone) / total) * 10) * 10;
        if (percent !== lastPercent) {
          lastPercent = percent;
          o.say(`artifacts: uploading ${percent}%`);
        }
      };
      try {
        const { digest, size } = await uploadFile(store, f.path, { signal: o.signal, onProgress });
        uploaded.push({ ...f, size, digest });
      } catch (err) {
        if (err instanceof ConnectError || o.signal.aborted) throw err;
        const reason = `unreadable: ${err instanceof Error ? err.message : String(err)}`;
        skipped.push({ name: f.name, sizeBytes: BigInt(f.size), reason });
        o.say(`artifacts: skipped ${f.name}: ${reason}`);
      }
      before += f.size;
    }
    if (uploaded.length === 0) return { ...base, skipped };
    const manifest = buildManifest(
      uploaded.map((f) => ({ mediaType: f.mediaType, digest: f.digest, size: f.size, annotations: { [TITLE_ANNOTATION]: f.name } })),
      { "treadmill.artifacts.job": o.jobId, "treadmill.artifacts.attempt": String(o.attempt), "treadmill.artifacts.host": String(o.hostIndex) },
    );
    manifestDigest = manifest.manifestDigest;
    await store.putManifest({ digest: manifestDigest, manifestJson: manifest.manifestJson, mountTokens: [] }, { signal: o.signal });
  } catch (err) {
    const error = o.signal.aborted ? "the upload did not finish within the collection deadline" : ConnectError.from(err).rawMessage;
    o.say(`artifacts: upload failed: ${error}`);
    return { ...base, skipped, error };
  } finally {
    transport.close();
  }
  const listed = uploaded.map((f) => ({ name: f.name, sizeBytes: BigInt(f.size), digest: f.digest, mediaType: f.mediaType }));
  o.say(`artifacts: uploaded ${uploaded.length} file${uploaded.length === 1 ? "" : "s"}, manifest ${manifestDigest}`);
  return { ...base, manifestDigest, files: listed, skipped };
}

/**
 * Places every input of `inputs` (the spec's) in `dir` (a fresh directory
 * the driver made), from StartJob's `sources`, verified against its digest.
 * An input without a source (its artifact was removed) or refused by its
 * store is the job's fault (ImageError); a store that cannot be reached is
 * the infrastructure's (ImageUnavailableError).
 */
export async function fetchInputs(
  inputs: readonly JobInput[],
  sources: readonly JobInputSource[],
  dir: string,
  o: { say: (text: string) => void; signal: AbortSignal; tls?: ClientTls },
): Promise<void> {
  if (inputs.length === 0) return;
  await mkdir(dir, { recursive: true, mode: 0o755 });
  for (const input of inputs) {
    const source = sources.find((s) => s.name === input.name && s.digest === input.digest);
    if (!source) throw new ImageError(`input ${input.name}: ${input.source} is no longer available (its artifacts were removed)`);
    o.say(`input ${input.name}: fetching ${input.source} (${formatBytes(source.sizeBytes)})`);
    const transport = imageStoreTransport(source.storeUrl, { token: source.readToken?.token ?? "", tls: o.tls });
    const path = join(dir, input.name);
    try {
      await downloadBlob(imageStoreClient(transport), { digest: source.digest, size: Number(source.sizeBytes) }, path, { signal: o.signal });
      await chmod(path, 0o644);
    } catch (err) {
      if (o.signal.aborted) throw err;
      const error = ConnectError.from(err);
      const text = `input ${input.name}: ${input.source} could not be fetched: ${error.rawMessage}`;
      if ([Code.NotFound, Code.PermissionDenied, Code.InvalidArgument, Code.DataLoss].includes(error.code)) throw new ImageError(text);
      throw new ImageUnavailableError(text);
    } finally {
      transport.close();
    }
  }
}
