/**
 * The state of jobs' logs (job.proto LogStatus, DESIGN.md §7), from the
 * supervisor stream (registered with the stream's handlers,
 * registerLogStatusHandlers):
 *
 * - JobLogReport: a host's part of an attempt's log is SHIPPING from its
 *   spill, COMPLETE on every log server, or INCOMPLETE (bytes lost). Parts
 *   are kept per (job, attempt, host) in job_log_parts (migration 0009), the
 *   newest revision winning, so a report repeated after a reconnect changes
 *   nothing; the job's row carries the summary over every part (INCOMPLETE
 *   if any lost bytes, else SHIPPING while any ships, else COMPLETE). A part
 *   that turns INCOMPLETE, or loses more, is a LOG_INCOMPLETE timeline event.
 *   The job's state is never touched: a FINALIZED job's log may settle later.
 * - LogTokenRequest: a fresh log:write token for a log still shipping after
 *   its StartJob's token expired, granted only for an attempt that ran on
 *   the requesting host.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import { LogStatus } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import {
  type AttachResponse,
  AttachResponseSchema,
  type JobLogReport,
  type LogTokenRequest,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { formatBytes } from "../../lib/bytes.js";
import { audit } from "../db/queries/audit.js";
import type { HostCaller } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import { checkId, checkText, invalid } from "../shared/common.js";
import { recordEvent } from "../db/queries/events.js";
import {
  type PartOf,
  type PartStatus,
  lockJobOfPart,
  logPart,
  logTokenCheck,
  notifyJobChanged,
  summarizeLogParts,
  writeLogPart,
} from "../db/queries/log-parts.js";
import type { SupervisorHandlers } from "./stream-handlers.js";

/**
 * Registers the stream's JobLogReport (after the stream's earlier reports
 * have committed: the job's end comes before its log's) and LogTokenRequest.
 */
export function registerLogStatusHandlers(ctx: CoordinatorContext, handlers: SupervisorHandlers): void {
  handlers.on("jobLogReport", { afterCommits: true, handle: (host, r) => onJobLogReport(ctx, host, r) });
  handlers.on("logTokenRequest", { afterCommits: false, handle: (host, r) => onLogTokenRequest(ctx, host, r) });
}

/** How long a token granted for a log still shipping lasts. */
export const LOG_TOKEN_TTL_MS = 60 * 60_000;

const STATUS_NAMES: Partial<Record<LogStatus, PartStatus>> = {
  [LogStatus.SHIPPING]: "shipping",
  [LogStatus.COMPLETE]: "complete",
  [LogStatus.INCOMPLETE]: "incomplete",
};

function checkAttempt(field: string, r: { jobId: string; attempt: number }): void {
  checkId(`${field}.job_id`, r.jobId);
  if (r.attempt < 1) throw invalid(`${field}.attempt must be at least 1`);
}

/**
 * Records a host's JobLogReport and answers the AckReport to send. Malformed:
 * InvalidArgument (it ends the stream, as any malformed message does). A
 * report of an attempt that never ran on this host is acknowledged and
 * changes nothing.
 */
export async function onJobLogReport(ctx: CoordinatorContext, host: HostCaller, r: JobLogReport): Promise<AttachResponse> {
  checkAttempt("job_log_report", r);
  checkText("job_log_report.report_id", r.reportId, 64);
  const status = STATUS_NAMES[r.status];
  if (status === undefined) throw invalid("job_log_report.status must be SHIPPING, COMPLETE or INCOMPLETE");
  if (r.bytesLost < 0n) throw invalid("job_log_report.bytes_lost must not be negative");
  if (r.revision < 1n) throw invalid("job_log_report.revision must be at least 1");
  // Free text from a server's error: made printable and clipped rather than refused, so
  // that no error text of a log server can end the stream over and over.
  // eslint-disable-next-line no-control-regex
  const why = r.message.replace(/[\u0000-\u001f\u007f]+/g, " ").trim().slice(0, 1024);
  const message = why === "" ? "" : `${why} on host ${host.hostName}`;
  const actor = `host:${host.hostName}`;

  await ctx.sql.begin(async (tx) => {
    const part: PartOf = { jobId: r.jobId, attempt: r.attempt, hostId: host.hostId };
    const job = await lockJobOfPart(tx, part);
    if (!job) return;
    const before = await logPart(tx, part);
    if (before && BigInt(before.revision) >= r.revision) return;
    await writeLogPart(tx, part, { status, bytesLost: r.bytesLost, message, revision: r.revision });
    const summary = await summarizeLogParts(tx, r.jobId);
    const lostMore = status === "incomplete" && (before?.status !== "incomplete" || BigInt(before.bytes_lost) < r.bytesLost);
    if (lostMore) {
      await recordEvent(tx, {
        jobId: r.jobId,
        kind: "log_incomplete",
        state: job.state,
        attempt: r.attempt,
        hostId: host.hostId,
        actor,
        ownerId: job.owner_id,
        message: `log incomplete: ${formatBytes(r.bytesLost)} lost${message === "" ? "" : `: ${message}`}`,
      });
    } else {
      // Watchers see the new status (recordEvent notifies on its own).
      await notifyJobChanged(tx, r.jobId);
    }
    ctx.logger.info(
      { jobId: r.jobId, attempt: r.attempt, hostId: host.hostId, status, bytesLost: Number(r.bytesLost), summary: summary?.log_status },
      "job log status reported",
    );
  });
  return create(AttachResponseSchema, {
    payload: { case: "ackReport", value: { reportId: r.reportId, jobId: r.jobId, attempt: r.attempt, terminal: false } },
  });
}

/**
 * Answers a LogTokenRequest with a LogTokenGrant: a log:write token when the
 * attempt ran on this host, else a refusal (PermissionDenied, or NotFound
 * for a job that does not exist). Malformed: InvalidArgument.
 */
export async function onLogTokenRequest(ctx: CoordinatorContext, host: HostCaller, r: LogTokenRequest): Promise<AttachResponse> {
  checkAttempt("log_token_request", r);
  checkText("log_token_request.request_id", r.requestId, 64);
  const answer = (value: Record<string, unknown>) =>
    create(AttachResponseSchema, {
      payload: { case: "logTokenGrant", value: { requestId: r.requestId, jobId: r.jobId, attempt: r.attempt, ...value } },
    });
  const job = await logTokenCheck(ctx.sql, { jobId: r.jobId, attempt: r.attempt, hostId: host.hostId });
  const refuse = async (code: Code, message: string) => {
    await audit(ctx.sql, {
      kind: "job.log_token_refused",
      actor: `host:${host.hostName}`,
      hostId: host.hostId,
      ...(job ? { jobId: r.jobId } : {}),
      message,
      details: { attempt: r.attempt },
    });
    return answer({ ok: false, errorCode: code, errorMessage: message });
  };
  if (!job) return refuse(Code.NotFound, `job ${r.jobId} not found`);
  if (!job.ran) return refuse(Code.PermissionDenied, `job ${r.jobId} attempt ${r.attempt} did not run on this host`);
  const now = ctx.clock();
  const token = await ctx.keys.sign({ scope: "log:write", job: r.jobId }, LOG_TOKEN_TTL_MS, { subject: host.hostId });
  await audit(ctx.sql, {
    kind: "job.log_token_granted",
    actor: `host:${host.hostName}`,
    jobId: r.jobId,
    hostId: host.hostId,
    message: `log:write token for attempt ${r.attempt}`,
    details: { attempt: r.attempt },
  });
  return answer({
    ok: true,
    writeToken: { token, scope: CapabilityScope.LOG_WRITE, expireTime: timestampFromMs(now + LOG_TOKEN_TTL_MS) },
    serverUrls: job.log_server_urls,
  });
}
