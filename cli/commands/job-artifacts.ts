/**
 * `tml job artifacts` (docs/artifacts.md): lists an attempt's artifacts and
 * downloads one (`--get NAME`) or all (`--all --dir DIR`), each verified
 * against its digest (lib/image/client.ts downloadBlob) with a progress bar
 * for big files. The coordinator says where they are and hands out read
 * tokens (GetJobArtifactAccess); the bytes come from the image store.
 */
import { mkdir, rename } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import type { Client } from "@connectrpc/connect";
import { ArtifactSchema, type Artifact } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { downloadBlob, imageStoreClient, imageStoreTransport } from "../../lib/image/client.js";
import { parseIntFlag } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import { tlsOptions, type CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { ago, jsonOf } from "../format.js";
import { formatBytes, progressBar } from "../progress.js";

/** Files at least this big get a progress bar. */
const BAR_BYTES = 8 * 1024 * 1024;

export const jobArtifactCommands: Command[] = [
  defineCommand({
    path: ["job", "artifacts"],
    summary: "List a job's artifacts, or download them verified",
    description:
      "Lists the files the job wrote into $TREADMILL_ARTIFACTS_DIR (name, size, digest), of its newest\n" +
      "attempt that has some unless --attempt says which. --get NAME downloads one file, --all every file\n" +
      "(keeping their paths), into --dir DIR (default: the current directory); each is checked against its digest.",
    args: [{ name: "JOB", required: true, description: "the job's id" }],
    flags: {
      attempt: { type: "string", placeholder: "N", description: "the attempt (default: the newest with artifacts)" },
      get: { type: "string", placeholder: "NAME", description: "download this artifact" },
      all: { type: "bool", description: "download every artifact (with -o DIR)" },
      dir: { type: "string", placeholder: "DIR", description: "where to write downloads (default: the current directory)" },
    },
    examples: [
      "tml job artifacts 0190a5a0-...",
      "tml job artifacts 0190a5a0-... --get report.xml",
      "tml job artifacts 0190a5a0-... --all --dir results/",
    ],
    async run(ctx, { args, flags }) {
      if (flags.get !== undefined && flags.all === true) throw new UsageError("give --get NAME or --all, not both");
      const attempt = flags.attempt === undefined ? 0 : parseIntFlag("attempt", flags.attempt, 1, 1_000_000);
      const jobs = await ctx.client(JobService);
      const listed = await jobs.listJobArtifacts({ jobId: args.JOB, attempt }, { timeoutMs: 30_000 });
      if (flags.get === undefined && flags.all !== true) {
        ctx.out.data(
          { attempt: listed.attempt, artifacts: listed.artifacts.map((a) => jsonOf(ArtifactSchema, a)), totalBytes: String(listed.totalBytes) },
          () =>
            ctx.out.table(
              listed.artifacts,
              [
                { header: "NAME", value: (a) => a.name },
                { header: "SIZE", value: (a) => formatBytes(Number(a.sizeBytes)) },
                { header: "DIGEST", value: (a) => a.digest },
                { header: "CREATED", value: (a) => ago(a.createTime) },
              ],
              `Job ${args.JOB} attempt ${listed.attempt} has no artifacts.`,
            ),
        );
        return ExitCode.OK;
      }
      const wanted = flags.all === true ? listed.artifacts : listed.artifacts.filter((a) => a.name === flags.get);
      if (wanted.length === 0) {
        if (flags.all === true) throw new CliError(`job ${args.JOB} attempt ${listed.attempt} has no artifacts`, ExitCode.NOT_FOUND);
        throw new CliError(`job ${args.JOB} attempt ${listed.attempt} has no artifact named ${flags.get}`, ExitCode.NOT_FOUND);
      }
      const dir = resolve(flags.dir ?? ".");
      const written = await downloadArtifacts(ctx, jobs, args.JOB, listed.attempt, wanted, dir, flags.all === true);
      ctx.out.data({ attempt: listed.attempt, files: written }, () =>
        ctx.out.line(`Downloaded ${written.length} artifact${written.length === 1 ? "" : "s"} of job ${args.JOB} attempt ${listed.attempt}${written.length === 1 ? ` to ${written[0]}` : ` into ${dir}`}.`),
      );
      return ExitCode.OK;
    },
  }),
];

/**
 * Downloads `wanted` (artifacts of the job's `attempt`) into `dir`, each
 * verified against its digest, with their paths (`keepPaths`) or by their
 * last name; returns the files written. `tml job run --artifacts` (cli/ci.ts)
 * uses it too.
 */
export async function downloadArtifacts(
  ctx: CliContext,
  jobs: Client<typeof JobService>,
  jobId: string,
  attempt: number,
  wanted: readonly Artifact[],
  dir: string,
  keepPaths: boolean,
): Promise<string[]> {
  const { access } = await jobs.getJobArtifactAccess({ jobId, attempt }, { timeoutMs: 30_000 });
  const written: string[] = [];
  for (const artifact of wanted) {
    const names = artifact.name.split("/");
    const path = join(dir, ...(keepPaths ? names : names.slice(-1)));
    await download(artifact, path);
    written.push(path);
  }
  return written;

  async function download(artifact: Artifact, path: string): Promise<void> {
    const where = access.find((a) => a.manifestDigest === artifact.manifestDigest);
    if (!where) throw new CliError(`the server gave no access to artifact ${artifact.name}`);
    await mkdir(dirname(path), { recursive: true });
    const transport = imageStoreTransport(where.storeUrl, { token: where.readToken?.token ?? "", tls: tlsOptions(ctx.caFile) });
    ctx.errorContext.server = where.storeUrl;
    const size = Number(artifact.sizeBytes);
    const bar = size >= BAR_BYTES ? progressBar({ label: `Downloading ${artifact.name}`, total: size, stream: ctx.io.stderr }) : undefined;
    try {
      // Into a side file, renamed once verified: a failed download leaves no file that looks whole.
      await downloadBlob(imageStoreClient(transport), { digest: artifact.digest, size }, `${path}.download`, {
        onProgress: (p) => bar?.update(p.bytesDone),
        signal: ctx.abort.signal,
      });
      await rename(`${path}.download`, path);
      bar?.done();
    } catch (err) {
      bar?.stop();
      throw err;
    } finally {
      transport.close();
    }
  }
}
