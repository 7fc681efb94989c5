/**
 * `tml job run` inside a CI pipeline (docs/ci.md): what it does on a
 * signal (cancel the job and wait a bounded time for its end, or detach),
 * the exit codes scripts test, and what it leaves for the CI system once a
 * job ended, failed and canceled ones too: its test results as JUnit XML
 * (`--junit`, cli/commands/job-results.ts's export), its artifacts
 * (`--artifacts`, cli/commands/job-artifacts.ts's download), a Markdown
 * summary appended to `$GITHUB_STEP_SUMMARY`, and GitLab's collapsible
 * sections around the log and the summary when `$GITLAB_CI` is set.
 */
import { appendFile, mkdir } from "node:fs/promises";
import { constants } from "node:os";
import { dirname, extname, join, resolve } from "node:path";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import { type Job, JobStateSchema, TestOutcome } from "../gen/treadmill/coordinator/v1/job_pb.js";
import type { JobService } from "../gen/treadmill/coordinator/v1/job_service_pb.js";
import { parseDuration, type FlagSchema } from "./args.js";
import type { CliContext, CliIo } from "./context.js";
import { word } from "./format.js";
import { formatBytes } from "./progress.js";
import { downloadArtifacts } from "./commands/job-artifacts.js";
import { countsText, exportJunit } from "./commands/job-results.js";

type Jobs = Client<typeof JobService>;

/** How long a job canceled by a signal gets to end before tml stops waiting (`--cancel-wait`). */
export const CANCEL_WAIT_MS = 30_000;
/** The failing cases a summary lists at most. */
export const SUMMARY_CASES = 20;

/** The flags of `tml job run` this module reads. */
export const ciFlags = {
  junit: {
    type: "string",
    placeholder: "FILE",
    description: "once the job ended (failed and canceled too), write its test results to FILE as JUnit XML (a matrix: one file per job, docs/ci.md)",
  },
  artifacts: {
    type: "string",
    placeholder: "DIR",
    description: "once the job ended (failed and canceled too), download its artifacts into DIR (a matrix: a directory per job, docs/ci.md)",
  },
  "detach-on-signal": {
    type: "bool",
    description: "on SIGTERM, or SIGINT without a terminal, leave the job running and exit (default: cancel it and wait for its end)",
  },
  "cancel-wait": {
    type: "string",
    placeholder: "DURATION",
    description: "after a signal canceled the job, how long to wait for its end before exiting (default 30s)",
  },
} as const satisfies FlagSchema;

/** The exit code of a run stopped by `signal`: 128 + its number (130 for SIGINT, 143 for SIGTERM). */
export function signalExitCode(signal: NodeJS.Signals): number {
  return 128 + (constants.signals[signal] ?? constants.signals.SIGINT);
}

/**
 * Whether tml may ask the user something: standard input and error are a
 * terminal and no CI system says it runs us (`CI` is set by GitHub Actions,
 * GitLab CI and most others, which may give a job a pseudo-terminal).
 */
export function interactive(io: CliIo): boolean {
  return io.stdin.isTTY === true && io.stdin.setRawMode !== undefined && io.stderr.isTTY === true && !io.env.CI;
}

/** "board=a,suite=x": a matrix job's name as a file name's part (only [A-Za-z0-9._=,-]). */
export function matrixFileName(matrix: Record<string, string>): string {
  return Object.entries(matrix)
    .map(([k, v]) => `${k}=${v}`)
    .join(",")
    .replace(/[^A-Za-z0-9._=,-]/g, "_");
}

/** `report.xml` for a matrix job named `board=a`: `report.board=a.xml`. */
export function matrixJunitPath(file: string, name: string): string {
  const ext = extname(file);
  return `${file.slice(0, file.length - ext.length)}.${name}${ext}`;
}

/** What one job run under CI leaves behind; `tml job run` makes one, with or without a CI system. */
export class CiRun {
  readonly junit: string | undefined;
  readonly artifacts: string | undefined;
  readonly detachOnSignal: boolean;
  readonly cancelWaitMs: number;
  readonly #summaryFile: string | undefined;
  readonly #gitlab: boolean;
  #sections = 0;

  constructor(
    private readonly ctx: CliContext,
    flags: { junit?: string; artifacts?: string; "detach-on-signal"?: boolean; "cancel-wait"?: string },
  ) {
    this.junit = flags.junit;
    this.artifacts = flags.artifacts;
    this.detachOnSignal = flags["detach-on-signal"] === true;
    this.cancelWaitMs = flags["cancel-wait"] === undefined ? CANCEL_WAIT_MS : parseDuration("cancel-wait", flags["cancel-wait"]);
    this.#summaryFile = ctx.io.env.GITHUB_STEP_SUMMARY || undefined;
    // Sections go to stdout, which holds the data with -o json|yaml: none then.
    this.#gitlab = ctx.io.env.GITLAB_CI === "true" && ctx.out.format === "table";
  }

  /** `--cancel-wait` as the user wrote it: "30s", "1500ms". */
  get cancelWaitText(): string {
    return this.cancelWaitMs % 1000 === 0 ? `${this.cancelWaitMs / 1000}s` : `${this.cancelWaitMs}ms`;
  }

  /**
   * Opens a GitLab collapsible section (nothing elsewhere); the returned
   * function closes it. On stdout, where the job's log goes.
   */
  section(title: string, collapsed = false): () => void {
    if (!this.#gitlab) return () => undefined;
    const name = `treadmill_${++this.#sections}`;
    const now = () => Math.floor(Date.now() / 1000);
    this.ctx.io.stdout.write(`\x1b[0Ksection_start:${now()}:${name}${collapsed ? "[collapsed=true]" : ""}\r\x1b[0K${title}\n`);
    return () => this.ctx.io.stdout.write(`\x1b[0Ksection_end:${now()}:${name}\r\x1b[0K\n`);
  }

  /**
   * What a job leaves once it ended: its JUnit file, its artifacts, the
   * summaries; `outcome` is how tml words its end (cli/commands/job.ts's,
   * passed in: that module imports this one). A matrix job's files are
   * named after its `matrix`. A step that fails says so and the rest still
   * runs; false then (the caller exits 3 unless the job failed).
   */
  async finished(jobs: Jobs, job: Job, outcome: string, matrix?: Record<string, string>): Promise<boolean> {
    const name = matrix === undefined ? undefined : matrixFileName(matrix);
    let ok = true;
    const attempt = async (what: string, step: () => Promise<void>) => {
      try {
        await step();
      } catch (err) {
        ok = false;
        this.ctx.out.note(`tml: could not ${what} of job ${job.id}: ${(err as Error).message}`);
      }
    };
    if (this.junit !== undefined) {
      const file = name === undefined ? this.junit : matrixJunitPath(this.junit, name);
      await attempt("write the test results", async () => {
        await mkdir(dirname(resolve(file)), { recursive: true });
        await exportJunit(this.ctx, jobs, { jobId: job.id, attempt: 0, outcomes: [], suite: "", nameContains: "" }, file);
      });
    }
    const summaries = this.#summaryFile !== undefined || this.#gitlab;
    let artifacts = { count: 0, bytes: 0n, dir: "" };
    if (this.artifacts !== undefined || summaries) await attempt("list the artifacts", async () => {
      const listed = await jobs.listJobArtifacts({ jobId: job.id }, { timeoutMs: 30_000 });
      artifacts = { count: listed.artifacts.length, bytes: listed.totalBytes, dir: "" };
      if (this.artifacts === undefined || listed.artifacts.length === 0) return;
      const dir = resolve(name === undefined ? this.artifacts : join(this.artifacts, name));
      await mkdir(dir, { recursive: true });
      await downloadArtifacts(this.ctx, jobs, job.id, listed.attempt, listed.artifacts, dir, true);
      artifacts.dir = this.artifacts === undefined ? "" : name === undefined ? this.artifacts : join(this.artifacts, name);
      this.ctx.out.note(`Downloaded ${listed.artifacts.length} artifact${listed.artifacts.length === 1 ? "" : "s"} of job ${job.id} into ${dir}.`);
    });
    if (!summaries) return ok;
    const facts = await this.#facts(jobs, job, outcome, matrix, artifacts);
    if (this.#summaryFile !== undefined) {
      const file = this.#summaryFile;
      await attempt("append the summary", () => appendFile(file, markdownSummary(facts)));
    }
    if (this.#gitlab) {
      const end = this.section(`Treadmill job ${job.id}: ${facts.outcome}`);
      this.ctx.io.stdout.write(textSummary(facts));
      end();
    }
    return ok;
  }

  async #facts(jobs: Jobs, job: Job, outcome: string, matrix: Record<string, string> | undefined, artifacts: SummaryFacts["artifacts"]): Promise<SummaryFacts> {
    let failing: SummaryFacts["failing"] = [];
    let failingTotal = 0;
    if ((job.results?.failed ?? 0n) + (job.results?.errored ?? 0n) > 0n) {
      const page = await jobs
        .listJobResults({ jobId: job.id, outcomes: [TestOutcome.FAIL, TestOutcome.ERROR], pageSize: SUMMARY_CASES }, { timeoutMs: 30_000 })
        .catch(() => undefined);
      failing = (page?.cases ?? []).map((c) => ({ suite: c.suite, name: c.name, message: c.message.split("\n").find((l) => l.trim() !== "") ?? "" }));
      failingTotal = Number(job.results!.failed + job.results!.errored);
    }
    const server = (await this.ctx.target().catch(() => undefined))?.servers[0];
    const start = job.startTime ?? job.createTime;
    return {
      jobId: job.id,
      link: server === undefined ? undefined : `${server.replace(/\/$/, "")}/jobs/${job.id}`,
      image: job.spec?.image ?? "",
      matrix: matrix === undefined ? "" : Object.entries(matrix).map(([k, v]) => `${k}=${v}`).join(" "),
      state: word(JobStateSchema, job.state),
      outcome,
      durationMs: start && job.finalizeTime ? timestampMs(job.finalizeTime) - timestampMs(start) : undefined,
      tests: countsText(job.results),
      failing,
      failingTotal,
      artifacts,
    };
  }
}

/** What a summary says of one job. */
export interface SummaryFacts {
  jobId: string;
  /** The job's page on the web console (the coordinator serves it). */
  link: string | undefined;
  image: string;
  matrix: string;
  state: string;
  outcome: string;
  durationMs: number | undefined;
  tests: string;
  failing: { suite: string; name: string; message: string }[];
  failingTotal: number;
  artifacts: { count: number; bytes: bigint; dir: string };
}

function seconds(ms: number | undefined): string {
  if (ms === undefined) return "-";
  return ms < 60_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
}

/** Markdown cells must not break the table. */
const cell = (text: string) => text.replace(/\|/g, "\\|").replace(/\n/g, " ");

function artifactsText(a: SummaryFacts["artifacts"]): string {
  if (a.count === 0) return "none";
  return `${a.count} file${a.count === 1 ? "" : "s"} (${formatBytes(Number(a.bytes))})${a.dir === "" ? "" : ` in ${a.dir}`}`;
}

/** The GitHub Actions job summary of one job (GitHub-flavoured Markdown). */
export function markdownSummary(f: SummaryFacts): string {
  const id = f.link === undefined ? `\`${f.jobId}\`` : `[\`${f.jobId}\`](${f.link})`;
  const rows = [
    ["Job", id],
    ...(f.matrix === "" ? [] : [["Matrix", cell(f.matrix)]]),
    ["Image", `\`${cell(f.image)}\``],
    ["State", f.state],
    ["Outcome", cell(f.outcome)],
    ["Duration", seconds(f.durationMs)],
    ["Tests", f.tests === "-" ? "none reported" : f.tests],
    ["Artifacts", cell(artifactsText(f.artifacts))],
  ];
  let text = `### Treadmill job ${f.matrix === "" ? "" : `${cell(f.matrix)}: `}${cell(f.outcome)}\n\n| | |\n|---|---|\n`;
  text += rows.map(([k, v]) => `| ${k} | ${v} |\n`).join("");
  if (f.failing.length > 0) {
    text += `\n**Failing cases**${f.failingTotal > f.failing.length ? ` (the first ${f.failing.length} of ${f.failingTotal})` : ""}:\n\n`;
    text += f.failing.map((c) => `- \`${c.suite === "" ? "" : `${c.suite} / `}${c.name}\`${c.message === "" ? "" : `: ${c.message.replace(/\n/g, " ")}`}\n`).join("");
  }
  return `${text}\n`;
}

/** The same as plain lines (GitLab's summary section). */
export function textSummary(f: SummaryFacts): string {
  const lines = [
    `Job:       ${f.jobId}${f.link === undefined ? "" : ` (${f.link})`}`,
    ...(f.matrix === "" ? [] : [`Matrix:    ${f.matrix}`]),
    `Image:     ${f.image}`,
    `State:     ${f.state}`,
    `Outcome:   ${f.outcome}`,
    `Duration:  ${seconds(f.durationMs)}`,
    `Tests:     ${f.tests === "-" ? "none reported" : f.tests}`,
    `Artifacts: ${artifactsText(f.artifacts)}`,
  ];
  if (f.failing.length > 0) {
    lines.push(`Failing cases${f.failingTotal > f.failing.length ? ` (the first ${f.failing.length} of ${f.failingTotal})` : ""}:`);
    for (const c of f.failing) lines.push(`  ${c.suite === "" ? "" : `${c.suite} / `}${c.name}${c.message === "" ? "" : `: ${c.message}`}`);
  }
  return lines.map((l) => `${l}\n`).join("");
}
