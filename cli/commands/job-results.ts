/**
 * `tml job results JOB`: a job's test cases (ListJobResults) as a table
 * with a counts line, exported as JUnit XML (`--junit FILE`), or compared
 * with the previous job of its series (`--compare`, CompareJobResults).
 * docs/results.md shows it from a user's side.
 */
import { createWriteStream } from "node:fs";
import { once } from "node:events";
import { durationMs } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import {
  type CaseChange,
  CompareJobResultsResponseSchema,
  JobService,
  type ListJobResultsResponse,
  ListJobResultsResponseSchema,
} from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { type Job, type ResultCounts, type TestCase, TestOutcomeSchema } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { toJunitXml } from "../../lib/results/junit.js";
import { parsedCase } from "../../lib/results/wire.js";
import { parseIntFlag } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError, ExitCode, UsageError } from "../errors.js";
import { enumValue, enumWords, jsonOf, tagsText, word } from "../format.js";

type Jobs = Client<typeof JobService>;

/** "12 cases: 10 passed, 1 failed, 1 skipped" (outcomes with none left out); "-" for no results. */
export function countsText(counts: ResultCounts | undefined): string {
  if (!counts || counts.total === 0n) return "-";
  const parts = (
    [
      [counts.passed, "passed"],
      [counts.failed, "failed"],
      [counts.skipped, "skipped"],
      [counts.errored, "errored"],
    ] as const
  )
    .filter(([n]) => n > 0n)
    .map(([n, what]) => `${n} ${what}`);
  return `${counts.total} case${counts.total === 1n ? "" : "s"}: ${parts.join(", ")}`;
}

/** A job's results for a list column: "10/12 passed", with "(flaky)" when a retry passed. */
export function resultsColumn(job: Job): string {
  const c = job.results;
  if (!c || c.total === 0n) return job.flaky ? "(flaky)" : "-";
  return `${c.passed}/${c.total} passed${job.flaky ? " (flaky)" : ""}`;
}

function durationText(c: TestCase): string {
  if (!c.duration) return "-";
  const ms = durationMs(c.duration);
  return ms < 1000 ? `${Math.round(ms)}ms` : `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)}s`;
}

function firstLine(text: string): string {
  const line = text.split("\n").find((l) => l.trim() !== "") ?? "";
  return line.length > 100 ? `${line.slice(0, 99)}…` : line || "-";
}

const caseColumns = [
  { header: "SUITE", value: (c: TestCase) => c.suite || "-" },
  { header: "NAME", value: (c: TestCase) => c.name + (c.flaky ? " (flaky)" : "") },
  { header: "OUTCOME", value: (c: TestCase) => word(TestOutcomeSchema, c.outcome) },
  { header: "TIME", value: durationText },
  { header: "MESSAGE", value: (c: TestCase) => firstLine(c.message) },
];

/** Every page of the job's cases matching the filters, up to `limit` (0: all). */
async function* allCases(jobs: Jobs, request: Parameters<Jobs["listJobResults"]>[0], limit: number): AsyncGenerator<ListJobResultsResponse> {
  let pageToken = "";
  let seen = 0;
  do {
    const pageSize = limit === 0 ? 1000 : Math.min(1000, limit - seen);
    const page = await jobs.listJobResults({ ...request, pageSize, pageToken }, { timeoutMs: 30_000 });
    seen += page.cases.length;
    yield page;
    pageToken = page.nextPageToken;
  } while (pageToken !== "" && (limit === 0 || seen < limit));
}

export const resultsCommands: Command[] = [
  defineCommand({
    path: ["job", "results"],
    summary: "Show a job's test results; export them as JUnit XML; compare them with the previous job of its series",
    args: [{ name: "JOB", required: true, description: "the job's id" }],
    flags: {
      attempt: { type: "string", placeholder: "N", description: "an earlier attempt of a restarted job (default: the latest with results)" },
      outcome: { type: "list", placeholder: "OUTCOME", description: `only cases with these outcomes (${enumWords(TestOutcomeSchema).join(", ")}), comma-separated` },
      suite: { type: "string", placeholder: "SUITE", description: "only cases of this suite" },
      name: { type: "string", placeholder: "TEXT", description: "only cases whose name contains this (any case)" },
      limit: { type: "string", placeholder: "N", description: "list at most N cases (default 1000; 0: all)" },
      junit: { type: "string", placeholder: "FILE", description: "write the cases as JUnit XML to FILE (- for stdout) instead of a table" },
      compare: { type: "bool", description: "compare with the last finished job of the same labels (commit-like labels aside)" },
    },
    examples: [
      "tml job results $JOB",
      "tml job results $JOB --outcome fail,error",
      "tml job results $JOB --junit results.xml",
      "tml job results $JOB --compare",
    ],
    async run(ctx, { args, flags }) {
      const jobs = await ctx.client(JobService);
      if (flags.compare === true) return compare(ctx, jobs, args.JOB, flags.limit === undefined ? 100 : parseIntFlag("limit", flags.limit, 1, 1000));
      const outcomes = flags.outcome.flatMap((o) => o.split(",")).filter((o) => o !== "").map((o) => {
        const v = enumValue(TestOutcomeSchema, o);
        if (v === undefined) throw new UsageError(`flag --outcome must be one of ${enumWords(TestOutcomeSchema).join(", ")}, got "${o}"`);
        return v;
      });
      const request = {
        jobId: args.JOB,
        attempt: flags.attempt === undefined ? 0 : parseIntFlag("attempt", flags.attempt, 1, 1000),
        outcomes,
        suite: flags.suite ?? "",
        nameContains: flags.name ?? "",
      };
      if (flags.junit !== undefined) return exportJunit(ctx, jobs, request, flags.junit);
      const limit = flags.limit === undefined ? 1000 : parseIntFlag("limit", flags.limit, 0, 1_000_000_000);
      const cases: TestCase[] = [];
      let last: ListJobResultsResponse | undefined;
      for await (const page of allCases(jobs, request, limit)) {
        cases.push(...page.cases);
        last = page;
      }
      const answer = last!;
      ctx.out.data(jsonOf(ListJobResultsResponseSchema, { ...answer, cases, nextPageToken: "" }), () => {
        if (answer.attempt === 0) {
          ctx.out.note(`Job ${args.JOB} has no test results (yet).`);
          return;
        }
        ctx.out.table(cases, caseColumns, "No cases match.");
        const shown = cases.length < Number(answer.counts?.total ?? 0n) ? ` (${cases.length} shown)` : "";
        ctx.out.line(`Attempt ${answer.attempt}: ${countsText(answer.counts)}${answer.counts?.complete ? "" : " so far"}${shown}.`);
      });
      return ExitCode.OK;
    },
  }),
];

/**
 * Writes the cases as JUnit XML. toJunitXml groups cases by suite, so they
 * are read whole first (100,000 cases are a few tens of MB), then streamed
 * out with backpressure. `tml job run --junit` (cli/ci.ts) uses it too.
 */
export async function exportJunit(ctx: CliContext, jobs: Jobs, request: Parameters<Jobs["listJobResults"]>[0], file: string): Promise<number> {
  const cases = [];
  for await (const page of allCases(jobs, request, 0)) cases.push(...page.cases.map(parsedCase));
  const out = file === "-" ? ctx.io.stdout : createWriteStream(file);
  const failed = new Promise<never>((_, reject) =>
    out.once("error", (err: Error) => reject(new CliError(`cannot write ${file}: ${err.message}`))),
  );
  for (const text of toJunitXml(cases, `job ${request.jobId}`)) {
    if (!out.write(text)) await Promise.race([once(out, "drain"), failed]);
  }
  if (file !== "-") {
    out.end();
    await Promise.race([once(out, "finish"), failed]);
    ctx.out.note(`Wrote ${cases.length} case${cases.length === 1 ? "" : "s"} of job ${request.jobId} to ${file}.`);
  }
  return ExitCode.OK;
}

async function compare(ctx: CliContext, jobs: Jobs, jobId: string, limit: number): Promise<number> {
  const answer = await jobs.compareJobResults({ jobId, limit }, { timeoutMs: 30_000 });
  ctx.out.data(jsonOf(CompareJobResultsResponseSchema, answer), () => {
    const series = tagsText(answer.seriesLabels);
    if (!answer.baseJob) {
      ctx.out.line(
        Object.keys(answer.seriesLabels).length === 0
          ? `Job ${jobId} has no labels besides commit-like ones: it belongs to no series to compare with.`
          : `No earlier finished job of the series ${series} has results to compare with.`,
      );
      return;
    }
    ctx.out.line(`Compared with job ${answer.baseJob.id} (attempt ${answer.baseAttempt}), the previous of the series ${series}:`);
    const section = (title: string, list: CaseChange[], count: bigint) => {
      ctx.out.line("");
      ctx.out.line(ctx.out.style(`${title}: ${count}`, "bold"));
      for (const ch of list) {
        const c = ch.case!;
        const before = word(TestOutcomeSchema, ch.baseOutcome);
        ctx.out.line(`  ${c.suite ? `${c.suite} / ` : ""}${c.name}  (${before === "-" ? "new" : before} -> ${word(TestOutcomeSchema, c.outcome)})${c.message ? `: ${firstLine(c.message)}` : ""}`);
      }
      if (BigInt(list.length) < count) ctx.out.line(`  ... and ${count - BigInt(list.length)} more`);
    };
    section("Newly failing", answer.newlyFailing, answer.newlyFailingCount);
    section("Newly passing", answer.newlyPassing, answer.newlyPassingCount);
    section("Still failing", answer.stillFailing, answer.stillFailingCount);
  });
  return ExitCode.OK;
}
