/**
 * Job files from the command line (docs/job-files.md): `tml job run -f
 * FILE` (one job, or one per combination of its matrix, followed together),
 * `tml job schema`, the file of a job (`tml job get -o yaml`) and `tml job
 * rerun`. The file's format is lib/job-file.ts's, shared with the console,
 * loaded when a command needs it: its YAML parser would slow every `tml`'s
 * start.
 */
import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { Writable } from "node:stream";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { type Job, JobSchema, JobState } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobService } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import type { FileJob } from "../../lib/job-file.js";
import { keyValues } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { jsonOf } from "../format.js";
import { DEFAULT_CHANNELS } from "../logs.js";
import { CiRun, signalExitCode } from "../ci.js";
import { followJob, jobExitCode, outcome, stateText, watchJob } from "./job.js";

type Jobs = Client<typeof JobService>;

const jobFiles = () => import("../../lib/job-file.js");

/** What `tml job run -f` reads of `tml job run`'s flags. */
export interface FileRunFlags {
  file: string;
  set: readonly string[];
  secret: readonly string[];
  "secret-file": readonly string[];
  label: readonly string[];
  "queue-anyway"?: boolean;
  detach?: boolean;
  quiet?: boolean;
}

/** The flags of `tml job run` that shape a spec: a job file says what they would. */
const SPEC_FLAGS = ["tag", "hosts", "site", "driver", "param", "expose", "description", "priority", "timeout", "hold-on-failure", "queue-timeout", "restarts", "lease"];

/** `tml job run`'s flags for a job file: UsageError for an IMAGE or a flag the file says instead. */
export function fileRunFlags(image: string | undefined, flags: FileRunFlags & Record<string, unknown>): FileRunFlags {
  if (image !== undefined) throw new UsageError("give IMAGE or --file, not both: the file names its image");
  for (const name of SPEC_FLAGS) {
    const v = flags[name];
    if (v !== undefined && !(Array.isArray(v) && v.length === 0)) throw new UsageError(`flag --${name} is not used with --file: say it in the file (docs/job-files.md)`);
  }
  return flags;
}

/** `--secret` and `--secret-file` values by name (the values of a file's `${secret:NAME}`). */
export async function secretValues(flags: Pick<FileRunFlags, "secret" | "secret-file">): Promise<Record<string, string>> {
  const values = keyValues("secret", flags.secret);
  for (const [name, path] of Object.entries(keyValues("secret-file", flags["secret-file"]))) {
    try {
      values[name] = await readFile(path, "utf8");
    } catch (err) {
      throw new UsageError(`flag --secret-file ${name}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? "error"})`);
    }
  }
  return values;
}

/** The jobs of a job file (`-` is standard input), a bad file a UsageError that says where. */
async function readJobs(ctx: CliContext, flags: FileRunFlags): Promise<FileJob[]> {
  let text: string;
  try {
    text = flags.file === "-" ? await readStdin(ctx) : await readFile(flags.file, "utf8");
  } catch (err) {
    throw new UsageError(`cannot read job file ${flags.file} (${(err as NodeJS.ErrnoException).code ?? "error"})`);
  }
  const { JobFileError, readJobFile } = await jobFiles();
  try {
    const found = readJobFile(text, { source: flags.file === "-" ? "stdin" : flags.file, set: keyValues("set", flags.set), secrets: await secretValues(flags) });
    const labels = keyValues("label", flags.label);
    for (const j of found) Object.assign(j.spec.tags, labels);
    return found;
  } catch (err) {
    // "In job.yaml:3: ...": the sentence tml prints starts with a capital, which a file's name must not get.
    if (err instanceof JobFileError) throw new UsageError(`in ${err.message}`);
    throw err;
  }
}

async function readStdin(ctx: CliContext): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of ctx.io.stdin) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks).toString("utf8");
}

/** "board=a suite=x": a matrix job's name on its lines. */
const matrixName = (j: FileJob) =>
  Object.entries(j.matrix)
    .map(([k, v]) => `${k}=${v}`)
    .join(" ");

/** A FAILED_PRECONDITION of SubmitJob or RerunJob (no host can run it now) as a CliError saying how to queue it anyway; `what` prefixes it. */
function queueAnyway(what: string) {
  return (err: unknown): never => {
    const e = ConnectError.from(err);
    if (e.code === Code.FailedPrecondition && e.rawMessage.includes("queue_anyway")) throw new CliError(`${what}${e.rawMessage.replace(/; submit with queue_anyway.*$/, "")}; run again with --queue-anyway to queue it`, ExitCode.CONFLICT);
    throw err;
  };
}

/** SubmitJob; `what` prefixes its errors (a matrix job's name). */
export async function submit(jobs: Jobs, request: Parameters<Jobs["submitJob"]>[0], what = ""): Promise<Job> {
  const { job } = await jobs.submitJob(request, { timeoutMs: 30_000 }).catch(queueAnyway(what));
  if (!job) throw new CliError("the server returned no job", ExitCode.ERROR);
  return job;
}

/**
 * `tml job run -f FILE`: submits the file's jobs; one is followed as `tml
 * job run` follows a job, several (a matrix) together, a line for each
 * change of each, then one line per job with its outcome. Exits 0 when
 * every job succeeded, 1 when any did not.
 */
export async function runJobFile(ctx: CliContext, flags: FileRunFlags, ci = new CiRun(ctx, {})): Promise<number> {
  const found = await readJobs(ctx, flags);
  const jobs = await ctx.client(JobService);
  const submitted: { name: string; job: Job }[] = [];
  for (const j of found) {
    const name = matrixName(j);
    const job = await submit(jobs, { spec: j.spec, requestId: randomUUID(), queueAnyway: flags["queue-anyway"] === true }, name === "" ? "" : `${name}: `);
    submitted.push({ name, job });
  }
  // Data: one job (no matrix) as `tml job run` prints it, a matrix's as a list.
  const single = Object.keys(found[0].matrix).length === 0;
  const data = (all: Job[]) => (single ? jsonOf(JobSchema, all[0]) : all.map((j) => jsonOf(JobSchema, j)));
  if (flags.detach === true) {
    ctx.out.data(data(submitted.map((s) => s.job)), () => submitted.forEach((s) => ctx.out.line(s.job.id)));
    return ExitCode.OK;
  }
  if (single && ctx.out.format === "table") {
    const { job } = submitted[0];
    if (flags.quiet !== true) ctx.out.note(ctx.out.errStyle(`--> job ${job.id} submitted (${job.spec?.image ?? ""})`, "cyan"));
    return followJob(ctx, jobs, job.id, { channels: ctx.verbose ? [...DEFAULT_CHANNELS, "supervisor"] : DEFAULT_CHANNELS, quiet: flags.quiet === true, logs: true, ci });
  }
  return followTogether(ctx, jobs, submitted, { quiet: flags.quiet === true, data, ci, matrices: found.map((j) => j.matrix) });
}

/**
 * The jobs of a matrix as they go, one line each: on a terminal a block of
 * lines redrawn in place (a job's line changes where it stands); elsewhere
 * (CI logs, pipes) a line printed per change, so logs stay readable.
 */
export class JobBoard {
  readonly #lines: string[];
  readonly #tty: boolean;
  #drawn = false;

  constructor(
    private readonly stream: Writable & { isTTY?: boolean },
    initial: string[],
    private readonly style: (text: string) => string = (t) => t,
  ) {
    this.#lines = [...initial];
    this.#tty = stream.isTTY === true;
    if (this.#tty) this.#draw();
    else for (const line of initial) this.stream.write(`${style(line)}\n`);
  }

  /** Job `i`'s line is now `text` (nothing when unchanged). */
  set(i: number, text: string): void {
    if (this.#lines[i] === text) return;
    this.#lines[i] = text;
    if (this.#tty) this.#draw();
    else this.stream.write(`${this.style(text)}\n`);
  }

  #draw(): void {
    // Up to the block's first line, then each line cleared and written again.
    const up = this.#drawn ? `\x1b[${this.#lines.length}A` : "";
    this.stream.write(up + this.#lines.map((l) => `\r\x1b[2K${this.style(l)}\n`).join(""));
    this.#drawn = true;
  }
}

/**
 * Follows several jobs to their end: their lines on stderr (JobBoard:
 * "--> board=a suite=x  ID  running"), then one line per job with its
 * outcome. A signal cancels them all and waits a bounded time (cli/ci.ts;
 * or detaches with --detach-on-signal); again: stops waiting. Returns 0 when
 * all succeeded, else 1 (130/143 after a signal).
 */
async function followTogether(
  ctx: CliContext,
  jobs: Jobs,
  submitted: { name: string; job: Job }[],
  { quiet, data, ci, matrices }: { quiet: boolean; data: (jobs: Job[]) => unknown; ci: CiRun; matrices: Record<string, string>[] },
): Promise<number> {
  const width = Math.max(...submitted.map((s) => s.name.length));
  const line = (name: string, job: Job, text: string) => `${name.padEnd(width)}  ${job.id}  ${text}`;
  const note = (text: string) => ctx.out.note(ctx.out.errStyle(`--> ${text}`, "cyan"));
  const endBoard = ci.section(`Treadmill: ${submitted.length} jobs`);
  const board = quiet
    ? undefined
    : new JobBoard(
        ctx.io.stderr,
        submitted.map(({ name, job }) => `--> ${line(name, job, "submitted")}`),
        (t) => ctx.out.errStyle(t, "cyan"),
      );
  const watching = new AbortController();
  let canceling = false;
  let signalCode: number | undefined;
  let cancelTimer: NodeJS.Timeout | undefined;
  const off = ctx.onInterrupt((signal = "SIGINT") => {
    if (canceling || signalCode !== undefined) return watching.abort();
    signalCode = signalExitCode(signal);
    if (ci.detachOnSignal) return watching.abort();
    canceling = true;
    note(`canceling ${submitted.length} jobs (${signal}); waiting up to ${ci.cancelWaitText} for them to end (${signal} again: stop waiting)`);
    cancelTimer = setTimeout(() => {
      ctx.out.note(`tml: the jobs did not all end within ${ci.cancelWaitText} of their cancel; they end on their own.`);
      watching.abort();
    }, ci.cancelWaitMs);
    for (const { job } of submitted) void jobs.cancelJob({ jobId: job.id, message: `canceled from tml (${signal})` }, { timeoutMs: 15_000 }).catch(() => undefined);
  });
  let finals: Job[];
  try {
    finals = await Promise.all(
      submitted.map(({ name, job }, i) =>
        watchJob(jobs, job.id, AbortSignal.any([ctx.abort.signal, watching.signal]), (j) => {
          const text = j.state === JobState.FINALIZED ? outcome(j) : `${stateText(j)}${j.attempt > 1 ? ` (attempt ${j.attempt})` : ""}`;
          board?.set(i, `--> ${line(name, j, text)}`);
        }),
      ),
    );
  } catch (err) {
    if (watching.signal.aborted) {
      endBoard();
      ctx.out.note(`Stopped waiting; the jobs go on: \`tml job list --label ...\` shows them.`);
      return signalCode ?? ExitCode.INTERRUPTED;
    }
    throw err;
  } finally {
    clearTimeout(cancelTimer);
    off();
  }
  endBoard();
  const failed = finals.filter((j) => jobExitCode(j) !== ExitCode.OK).length;
  ctx.out.data(data(finals), () => {
    finals.forEach((j, i) => ctx.out.line(line(submitted[i].name, j, outcome(j))));
    ctx.out.note(failed === 0 ? `All ${finals.length} jobs succeeded.` : `${failed} of ${finals.length} jobs did not succeed.`);
  });
  let written = true;
  for (const [i, j] of finals.entries()) written = (await ci.finished(jobs, j, outcome(j), matrices[i])) && written;
  if (signalCode !== undefined) return signalCode;
  return failed > 0 ? ExitCode.JOB_FAILED : written ? ExitCode.OK : ExitCode.ERROR;
}

/** `tml job get JOB -o yaml`: the job as a job file that `tml job run -f` submits again. */
export async function printJobFile(ctx: CliContext, job: Job): Promise<void> {
  if (!job.spec) throw new CliError("the server returned a job without its spec");
  const { fileOf } = await jobFiles();
  ctx.io.stdout.write(fileOf(job.spec, `job ${job.id}: submit it again with tml job run -f FILE`));
}

export const jobFileCommands: Command[] = [
  defineCommand({
    path: ["job", "schema"],
    summary: "Print the JSON Schema of job files (for editors)",
    examples: ["tml job schema > job.schema.json"],
    async run(ctx) {
      const { jobFileSchema } = await jobFiles();
      ctx.out.line(JSON.stringify(jobFileSchema(), null, 2));
      return ExitCode.OK;
    },
  }),
  defineCommand({
    path: ["job", "rerun"],
    summary: "Run a job again with the same spec (its secrets kept), parameters changed with --set",
    // Not job.ts's JOB_ARG: the two modules import each other, and only functions may cross.
    args: [{ name: "JOB", required: true, description: "the job's id" }],
    flags: {
      set: { type: "list", placeholder: "NAME=VALUE", description: "a parameter to set instead of the old job's" },
      secret: { type: "list", placeholder: "NAME=VALUE", description: "a secret parameter to set instead of the old job's" },
      follow: { type: "bool", short: "f", description: "follow the new job as `tml job run` does, exit with its status" },
      "queue-anyway": { type: "bool", description: "queue it even when every host that matches it is unavailable" },
    },
    examples: ["tml job rerun $JOB", "tml job rerun $JOB --set SUITE=full --follow"],
    async run(ctx, { args, flags }) {
      const parameters = [
        ...Object.entries(keyValues("set", flags.set)).map(([name, value]) => ({ name, value, secret: false })),
        ...Object.entries(keyValues("secret", flags.secret)).map(([name, value]) => ({ name, value, secret: true })),
      ];
      const jobs = await ctx.client(JobService);
      const { job } = await jobs
        .rerunJob({ jobId: args.JOB, requestId: randomUUID(), parameters, queueAnyway: flags["queue-anyway"] === true }, { timeoutMs: 30_000 })
        .catch(queueAnyway(""));
      if (!job) throw new CliError("the server returned no job");
      if (flags.follow !== true) {
        ctx.out.data(jsonOf(JobSchema, job), () => ctx.out.line(job.id));
        return ExitCode.OK;
      }
      ctx.out.note(ctx.out.errStyle(`--> job ${job.id} re-runs job ${args.JOB}`, "cyan"));
      if (ctx.out.format !== "table") {
        const final = await watchJob(jobs, job.id, ctx.abort.signal, () => undefined);
        ctx.out.data(jsonOf(JobSchema, final), () => undefined);
        return jobExitCode(final);
      }
      return followJob(ctx, jobs, job.id, { channels: DEFAULT_CHANNELS, quiet: false, logs: true });
    },
  }),
];
