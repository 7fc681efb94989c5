/**
 * The job logs this host still owes the log servers (DESIGN.md §7). Each job
 * attempt's LogShipper lives here from StartJob until its log is settled,
 * which may be long after the job ended and was finalized (a log server was
 * down), and across restarts of the supervisor: at start, the spills an
 * earlier process left are resumed. The job's end does not wait for its log
 * beyond a short flush wait.
 *
 * What the coordinator hears: a JobLogReport per attempt when the job ended
 * (after the flush wait), when the spill cap drops output, and when the log
 * is settled; each is retained (in memory and beside the spill, as
 * `report.json`) until acknowledged, re-sent after every attach, and carries a
 * revision that grows across restarts. A settled log's spill goes once its
 * last report is recorded, its directory once that report is acknowledged.
 *
 * Tokens: a StartJob's log:write token lasts until the job's deadline plus a
 * margin; a log shipped after that (a long outage, a restart) asks the
 * coordinator for a fresh one (LogTokenRequest), which it grants only for
 * attempts that ran on this host.
 *
 * Layout: `<spillDir>/<job>-<attempt>/` holds the shipper's spill
 * (supervisor/log-shipper.ts) and `report.json`.
 */
import { randomUUID } from "node:crypto";
import { mkdir, readdir, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { LogStatus } from "../gen/treadmill/coordinator/v1/job_pb.js";
import type { AttachRequestSchema, LogTokenGrant, StartJob } from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { LogShipper, SpillBudget, type LossEvent, type ShipperReport } from "./log-shipper.js";
import { writeAtomic } from "./log-shipper/spill.js";
import { formatBytes } from "../lib/bytes.js";
import type { Logger } from "../lib/logger.js";
import type { ClientTls } from "../lib/grpc/trust.js";

type Payload = MessageInitShape<typeof AttachRequestSchema>["payload"];

/** How long a job's end waits for its log servers before the terminal report goes. */
export const LOG_FLUSH_WAIT_MS = 2000;
/** A token with less time left than this is renewed. */
const TOKEN_MARGIN_MS = 5 * 60_000;
/** How often tokens are checked, and how long an unanswered token request waits before it is asked again. */
const TOKEN_CHECK_MS = 60_000;

const STATUSES = {
  shipping: LogStatus.SHIPPING,
  complete: LogStatus.COMPLETE,
  incomplete: LogStatus.INCOMPLETE,
} as const;

/** A log report as retained until acknowledged. */
interface PendingReport {
  reportId: string;
  status: ShipperReport["status"];
  bytesLost: number;
  message: string;
  revision: number;
  /** The log is settled: once acknowledged, nothing of the attempt is left here. */
  final: boolean;
}

/** `report.json`: the attempt, the latest revision, and the report awaiting acknowledgement. */
interface ReportFile {
  jobId: string;
  attempt: number;
  revision: number;
  pending: PendingReport | null;
}

interface Entry {
  jobId: string;
  attempt: number;
  dir: string;
  /** Undefined once the spill is gone (only the final report waits). */
  shipper: LogShipper | undefined;
  revision: number;
  pending: PendingReport | undefined;
  /** The content of the last report made, to skip repeating it. */
  last: string;
  /** An unanswered LogTokenRequest: its id and when it went. */
  tokenRequest: { id: string; at: number } | undefined;
  /** The coordinator will not grant a token (the attempt did not run here, or the job is gone). */
  tokenDenied: boolean;
  /** Serialises writes of report.json. */
  saving: Promise<void>;
}

export interface JobLogsDeps {
  /** Where the spills live: `<workDir>/spill`. */
  spillDir: string;
  /** The per-host cap of spilled bytes. */
  capBytes: number;
  logger: Logger;
  /** Sends a message to the coordinator when attached (lost otherwise: re-sent at the next attach). */
  send: (payload: Payload) => void;
  /** Something the supervisor may wait for changed (a report acknowledged). */
  changed: () => void;
  /** The CAs https log servers are verified with (--ca-file). */
  tls?: ClientTls;
}

/** The names a job runner writes under (DESIGN.md §7, multi-host jobs). */
export interface LogNames {
  writer: string;
  sharedAttempt: boolean;
  /** The host's `supervisor` channel: its lines pass the spill cap. */
  supervisorChannel: string;
}

export class JobLogs {
  private readonly entries = new Map<string, Entry>();
  private readonly budget: SpillBudget;
  private readonly log: Logger;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(private readonly deps: JobLogsDeps) {
    this.budget = new SpillBudget(deps.capBytes);
    this.log = deps.logger.child({ subsystem: "job-logs" });
  }

  /**
   * Resumes what an earlier process left: each spill ships on in the
   * background, each retained report waits for the next attach. Starts the
   * token checks.
   */
  async start(): Promise<void> {
    await mkdir(this.deps.spillDir, { recursive: true });
    for (const name of await readdir(this.deps.spillDir)) {
      const dir = join(this.deps.spillDir, name);
      try {
        await this.resumeDir(dir);
      } catch (err) {
        this.log.error({ err, dir }, "cannot resume a job log left in the spill; it stays there");
      }
    }
    this.timer = setInterval(() => this.checkTokens(), TOKEN_CHECK_MS);
    this.timer.unref?.();
  }

  private async resumeDir(dir: string): Promise<void> {
    const file = await readFile(join(dir, "report.json"), "utf8").then(
      (text) => JSON.parse(text) as ReportFile,
      (err: NodeJS.ErrnoException) => {
        if (err.code === "ENOENT" || err.code === "ENOTDIR") return undefined;
        throw err;
      },
    );
    const [metaPath] = await LogShipper.findSpills(dir).catch(() => [] as string[]);
    if (metaPath === undefined) {
      if (file?.pending) {
        const entry = this.add(file.jobId, file.attempt, dir, undefined);
        entry.revision = file.revision;
        entry.pending = file.pending;
        this.log.info({ jobId: file.jobId, attempt: file.attempt }, "a job log report waits for the coordinator");
      } else {
        await rm(dir, { recursive: true, force: true });
      }
      return;
    }
    const shipper = await LogShipper.resume(metaPath, this.shippingOptions(() => entry));
    const entry = this.add(shipper.jobId, shipper.attempt, dir, shipper);
    entry.revision = file?.revision ?? 0;
    entry.pending = file?.pending ?? undefined;
    void this.report(entry, shipper.report());
    void this.ship(entry);
  }

  private add(jobId: string, attempt: number, dir: string, shipper: LogShipper | undefined): Entry {
    const entry: Entry = {
      jobId,
      attempt,
      dir,
      shipper,
      revision: 0,
      pending: undefined,
      last: "",
      tokenRequest: undefined,
      tokenDenied: false,
      saving: Promise.resolve(),
    };
    this.entries.set(key(jobId, attempt), entry);
    return entry;
  }

  private shippingOptions(entry: () => Entry) {
    const fileBytes = Math.min(4 << 20, Math.max(16 << 10, Math.floor(this.deps.capBytes / 16)));
    return {
      logger: this.deps.logger,
      tls: this.deps.tls,
      budget: this.budget,
      spillFileBytes: fileBytes,
      onTokenRefused: () => this.askToken(entry()),
      onShipped: (report: ShipperReport) => this.report(entry(), report, true),
    };
  }

  /** This host holds (or still ships) the log of the attempt: it ran here already. */
  holds(jobId: string, attempt: number): boolean {
    return this.entries.has(key(jobId, attempt));
  }

  /** The shipper of a new job attempt on this host. */
  open(start: StartJob, names: LogNames): LogShipper {
    const k = key(start.jobId, start.attempt);
    if (this.entries.has(k)) throw new Error(`job ${start.jobId} attempt ${start.attempt} already has a log on this host`);
    const dir = join(this.deps.spillDir, k.replace("/", "-"));
    const token = start.logs?.writeToken;
    const shipper = new LogShipper({
      ...this.shippingOptions(() => entry),
      jobId: start.jobId,
      attempt: start.attempt,
      writer: names.writer,
      sharedAttempt: names.sharedAttempt,
      servers: (start.logs?.serverUrls ?? []).map((url) => ({ url })),
      token: token?.token ?? "",
      tokenExpireMs: token?.expireTime ? timestampMs(token.expireTime) : undefined,
      spillDir: dir,
      capExempt: (channel) => channel === names.supervisorChannel,
      onLoss: (event) => this.lost(entry, names.supervisorChannel, event),
    });
    const entry = this.add(start.jobId, start.attempt, dir, shipper);
    return shipper;
  }

  /** A repeated StartJob: its fresh token. */
  renew(start: StartJob): void {
    const entry = this.entries.get(key(start.jobId, start.attempt));
    const token = start.logs?.writeToken;
    if (entry?.shipper && token) entry.shipper.renewToken(token.token, token.expireTime ? timestampMs(token.expireTime) : undefined);
  }

  /**
   * The job ended: waits up to the flush wait for the log servers, reports
   * where the log stands, and ships the rest in the background. Resolves
   * with the report, for the runner's terminal report to follow it.
   */
  async ended(jobId: string, attempt: number): Promise<ShipperReport | undefined> {
    const entry = this.entries.get(key(jobId, attempt));
    if (!entry?.shipper) return undefined;
    const report = await entry.shipper.settle(LOG_FLUSH_WAIT_MS);
    if (report.settled) {
      // Its final report goes out before the terminal report.
      await this.ship(entry);
      return report;
    }
    await this.report(entry, report);
    void this.ship(entry);
    return report;
  }

  /** Ships until settled; the final report is made (onShipped) before the spill goes. */
  private ship(entry: Entry): Promise<void> {
    const shipper = entry.shipper!;
    return shipper.finish().then(
      (report) => {
        if (report.settled) entry.shipper = undefined; // else stopped: the next process resumes it
      },
      (err: unknown) => this.log.error({ err, jobId: entry.jobId, attempt: entry.attempt }, "job log shipping failed"),
    );
  }

  /** The spill cap dropped output of the job, or took it again: the job's timeline and record say so. */
  private lost(entry: Entry, supervisorChannel: string, event: LossEvent): void {
    const shipper = entry.shipper;
    if (!shipper) return;
    const cap = formatBytes(this.budget.capBytes);
    const text =
      event.kind === "dropping"
        ? `log output of ${event.channel} is being dropped: this host's spill cap (${cap}) is reached while the log servers are behind`
        : `${formatBytes(event.bytes)} of ${event.channel} output were dropped (spill cap ${cap}); the log goes on from here`;
    if (!shipper.ended) shipper.channel(supervisorChannel).write(`${text}\n`);
    void this.report(entry, shipper.report());
  }

  /** Makes a report of where the log stands (unless it says nothing new), retained until acknowledged. */
  private report(entry: Entry, report: ShipperReport, final = false): Promise<void> {
    // eslint-disable-next-line no-control-regex
    const message = (report.problem ?? "").replace(/[\u0000-\u001f\u007f]+/g, " ").slice(0, 1024);
    const content = `${report.status}/${report.bytesLost}/${message}/${final}`;
    if (content === entry.last) return entry.saving;
    entry.last = content;
    entry.revision++;
    entry.pending = { reportId: randomUUID(), status: report.status, bytesLost: report.bytesLost, message, revision: entry.revision, final };
    const pending = entry.pending;
    entry.saving = entry.saving
      .then(() => this.save(entry))
      .catch((err: unknown) => this.log.warn({ err, jobId: entry.jobId }, "cannot keep the job log report on disk"));
    // Sent once on disk: a report the coordinator saw is never forgotten here.
    void entry.saving.then(() => {
      if (entry.pending === pending) this.sendReport(entry, pending);
    });
    return entry.saving;
  }

  private async save(entry: Entry): Promise<void> {
    const file: ReportFile = { jobId: entry.jobId, attempt: entry.attempt, revision: entry.revision, pending: entry.pending ?? null };
    await mkdir(entry.dir, { recursive: true });
    await writeAtomic(join(entry.dir, "report.json"), JSON.stringify(file));
  }

  private sendReport(entry: Entry, r: PendingReport): void {
    this.deps.send({
      case: "jobLogReport",
      value: {
        reportId: r.reportId,
        jobId: entry.jobId,
        attempt: entry.attempt,
        status: STATUSES[r.status],
        bytesLost: BigInt(r.bytesLost),
        message: r.message,
        revision: BigInt(r.revision),
      },
    });
  }

  /** A new stream is attached: every retained report again, and the tokens that are due. */
  attached(): void {
    for (const entry of this.entries.values()) {
      if (entry.pending) this.sendReport(entry, entry.pending);
      entry.tokenRequest = undefined;
    }
    this.checkTokens();
  }

  /** An AckReport: a log report among them is recorded. */
  acknowledged(reportId: string): void {
    for (const entry of this.entries.values()) {
      if (entry.pending?.reportId !== reportId) continue;
      const final = entry.pending.final;
      entry.pending = undefined;
      if (final) {
        this.entries.delete(key(entry.jobId, entry.attempt));
        void entry.saving.then(() => rm(entry.dir, { recursive: true, force: true })).catch((err: unknown) => {
          this.log.warn({ err, dir: entry.dir }, "cannot remove a shipped job log's directory");
        });
      } else {
        entry.saving = entry.saving.then(() => this.save(entry)).catch(() => undefined);
      }
      this.deps.changed();
      return;
    }
  }

  /** Reports sent and not acknowledged yet. */
  unacknowledged(): number {
    return [...this.entries.values()].filter((e) => e.pending).length;
  }

  private checkTokens(): void {
    const now = Date.now();
    for (const entry of this.entries.values()) {
      const expires = entry.shipper?.tokenExpireMs;
      if (expires !== undefined && expires - now < TOKEN_MARGIN_MS) this.askToken(entry);
    }
  }

  /** Asks the coordinator for a fresh log:write token (once at a time). */
  private askToken(entry: Entry): void {
    if (this.stopped || !entry.shipper || entry.tokenDenied) return;
    const now = Date.now();
    if (entry.tokenRequest && now - entry.tokenRequest.at < TOKEN_CHECK_MS) return;
    entry.tokenRequest = { id: randomUUID(), at: now };
    this.log.info({ jobId: entry.jobId, attempt: entry.attempt }, "asking the coordinator for a fresh log token");
    this.deps.send({ case: "logTokenRequest", value: { requestId: entry.tokenRequest.id, jobId: entry.jobId, attempt: entry.attempt } });
  }

  /** A LogTokenGrant. */
  granted(grant: LogTokenGrant): void {
    const entry = this.entries.get(key(grant.jobId, grant.attempt));
    if (!entry || entry.tokenRequest?.id !== grant.requestId) return;
    entry.tokenRequest = undefined;
    if (!grant.ok) {
      entry.tokenDenied = grant.errorCode === Code.PermissionDenied || grant.errorCode === Code.NotFound;
      this.log.error(
        { jobId: grant.jobId, attempt: grant.attempt, code: Code[grant.errorCode], reason: grant.errorMessage },
        "the coordinator refused a log token; the log stays in the spill",
      );
      return;
    }
    const token = grant.writeToken;
    if (token) entry.shipper?.renewToken(token.token, token.expireTime ? timestampMs(token.expireTime) : undefined);
  }

  /** Stops shipping (idempotent); every unsettled log stays in its spill for the next start. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    await Promise.all([...this.entries.values()].map(async (e) => {
      await e.shipper?.close();
      await e.saving;
    }));
  }
}

function key(jobId: string, attempt: number): string {
  return `${jobId}/${attempt}`;
}
