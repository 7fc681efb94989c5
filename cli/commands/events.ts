/**
 * `tml events` (EventService; docs/events.md): prints the event feed, one
 * line per event with its cursor. Without --follow it pages through what
 * the feed holds after --after (from the oldest retained event without it).
 * With --follow it holds WatchEvents open, reopening it with backoff on the
 * next coordinator replica of the context when one is lost, each time after
 * the last cursor it printed, so that nothing is printed twice or missed; a
 * script that keeps the last cursor it printed resumes with --after.
 */
import { create, toJson } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { ConnectError } from "@connectrpc/connect";
import { type Event, EventFilterSchema, EventSchema, EventService } from "../../gen/treadmill/coordinator/v1/event_service_pb.js";
import { keepStreaming } from "../../lib/retry.js";
import { keyValues, parseIntFlag } from "../args.js";
import { defineCommand, type Command } from "../command.js";
import type { CliContext } from "../context.js";
import { ExitCode, UsageError } from "../errors.js";
import { toYaml } from "../output.js";

/** --after's cursor: a whole number. */
function cursorFlag(value: string | undefined): bigint | undefined {
  if (value === undefined) return undefined;
  if (!/^\d{1,19}$/.test(value)) throw new UsageError(`flag --after takes a cursor (the first column of an event's line), got "${value}"`);
  return BigInt(value);
}

const text = (v: unknown) => (typeof v === "string" || typeof v === "number" ? String(v) : "");

/** What changed, in a few words: "queued -> running", "quarantined: 3 failures". */
function summary(e: Event): string {
  const p = e.payload ?? {};
  const from = (key: string) => (text(p[key]) !== "" ? `${text(p[key])} -> ` : "");
  switch (e.kind) {
    case "job.state": {
      let s = `${from("previous_state")}${text(p.state)}`;
      if (text(p.reason) !== "") s += ` (${text(p.reason)}${text(p.exit_status) !== "" ? `, ${text(p.exit_status)}` : ""})`;
      return s;
    }
    case "job.stage":
      return `${text(p.state)}: ${text(p.stage) || "-"}`;
    case "host.health":
      return `${from("previous_health")}${text(p.health)}${text(p.reason) !== "" ? `: ${text(p.reason)}` : ""}`;
    case "lease.state":
      return `${from("previous_state")}${text(p.state)}${text(p.end_reason) !== "" ? ` (${text(p.end_reason)})` : ""}`;
    default:
      return "";
  }
}

/** What it is about: "job J", "host board-1", "lease L". */
function subject(e: Event): string {
  if (e.jobId) return `job ${e.jobId}`;
  if (e.hostId) return `host ${text(e.payload?.host_name) || e.hostId}`;
  if (e.leaseId) return `lease ${e.leaseId}`;
  return "-";
}

/** Prints one event: a line, a JSON object on one line (-o json), or a YAML document. */
function printEvent(ctx: CliContext, e: Event): void {
  if (ctx.out.format === "json") ctx.out.line(JSON.stringify(toJson(EventSchema, e, { alwaysEmitImplicit: true })));
  else if (ctx.out.format === "yaml") ctx.out.stdout.write(`---\n${toYaml(toJson(EventSchema, e, { alwaysEmitImplicit: true }))}`);
  else {
    const time = e.time ? timestampDate(e.time).toISOString() : "-";
    ctx.out.line([String(e.cursor), time, e.kind, subject(e), summary(e)].join("  ").trimEnd());
  }
}

export const eventsCommands: Command[] = [
  defineCommand({
    path: ["events"],
    summary: "Print the event feed (job, host health and lease changes), one line per event with its cursor",
    description:
      "Without --follow: the events after --after (from the oldest retained without it), at most --limit. With --follow: the events after --after (only new ones without it) and every new one as it happens, reconnecting to any coordinator of the context and resuming after the last cursor printed, until Ctrl-C.",
    flags: {
      follow: { type: "bool", short: "f", description: "keep printing new events as they happen" },
      after: { type: "string", placeholder: "CURSOR", description: "start after this cursor (the first column, or the cursor field of -o json)" },
      kind: { type: "list", placeholder: "KIND", description: "only this kind (job.state, job.stage, job.results, job.artifacts, host.health, lease.state)" },
      label: { type: "list", placeholder: "KEY=VALUE", description: "only events of jobs with this label" },
      job: { type: "list", placeholder: "JOB", description: "only events of this job" },
      limit: { type: "string", placeholder: "N", description: "without --follow: print at most N events (default 100)" },
    },
    examples: ["tml events", "tml events --follow --kind job.state --label team=red", "tml events --follow --after 20517 -o json"],
    async run(ctx, { flags }) {
      const events = await ctx.client(EventService);
      const filter = create(EventFilterSchema, { kinds: [...flags.kind], labels: keyValues("label", flags.label), jobIds: [...flags.job] });
      if (flags.follow !== true) {
        const limit = flags.limit === undefined ? 100 : parseIntFlag("limit", flags.limit, 1, 100_000);
        let after = cursorFlag(flags.after) ?? 0n;
        let printed = 0;
        for (;;) {
          const page = await events.listEvents({ filter, afterCursor: after, pageSize: Math.min(1000, limit - printed) }, { timeoutMs: 30_000 });
          for (const e of page.events) printEvent(ctx, e);
          printed += page.events.length;
          after = page.cursor;
          if (page.atEnd) return ExitCode.OK;
          if (printed >= limit) {
            ctx.out.note(`more events: tml events --after ${after}`);
            return ExitCode.OK;
          }
        }
      }
      const stop = new AbortController();
      ctx.onInterrupt(() => stop.abort());
      let after = cursorFlag(flags.after);
      await keepStreaming({
        open: (attempt) => events.watchEvents({ filter, afterCursor: after }, { signal: attempt.signal }),
        onMessage: (response, attempt) => {
          attempt.healthy();
          for (const e of response.events) printEvent(ctx, e);
          after = response.cursor;
        },
        onError: (err, { verdict, repeated }) => {
          if (verdict === "retryable" && !repeated) {
            const where = after === undefined ? "" : `; resuming after ${after}`;
            ctx.out.note(ctx.out.errStyle(`--> lost the coordinator (${ConnectError.from(err).rawMessage})${where}`, "yellow"));
          }
        },
        backoff: { initialMs: 250, maxMs: 5000 },
        signal: AbortSignal.any([stop.signal, ctx.abort.signal]),
      }).catch((err: unknown) => {
        throw ConnectError.from(err);
      });
      return ExitCode.INTERRUPTED;
    },
  }),
];
