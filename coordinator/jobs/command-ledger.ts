/**
 * The commands one Attach stream sent (StartJob, StopJob), by (kind, job,
 * attempt), and those still waiting for their CommandAck, by request id.
 * No I/O: the session sends what this hands out (session.ts).
 *
 * Commands are idempotent by (job, attempt), so within one stream each is
 * sent once; one whose acknowledgement has not come within the re-send
 * interval goes again under a new request id (the old id's late answer is
 * then unknown and ignored). A new stream starts with an empty ledger: the
 * hello says what the supervisor holds, and the database asks again for
 * what it still wants.
 */
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import type { FinalizeReason } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { type AttachResponse, AttachResponseSchema, type StartJob } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { uuidv7 } from "../shared/common.js";

export type CommandKind = "start" | "stop";

/** A command sent and not yet acknowledged. */
export interface Pending {
  key: string;
  kind: CommandKind;
  jobId: string;
  attempt: number;
  sentAt: number;
  message: AttachResponse;
}

const keyOf = (kind: CommandKind, jobId: string, attempt: number) => `${kind}/${jobId}/${attempt}`;

export class CommandLedger {
  private readonly pending = new Map<string, Pending>();
  private readonly sent = new Set<string>();

  /** `stopGraceMs`: the grace a StopJob gives the workload; `clock`: milliseconds now. */
  constructor(
    private readonly stopGraceMs: number,
    private readonly clock: () => number = Date.now,
  ) {}

  /** Whether this stream sent the command. */
  has(kind: CommandKind, jobId: string, attempt: number): boolean {
    return this.sent.has(keyOf(kind, jobId, attempt));
  }

  /** Forgets the commands of attempts other than `live` (the host no longer holds a slot for them). */
  keepOnly(live: readonly { jobId: string; attempt: number }[]): void {
    const keys = new Set(live.flatMap((r) => [keyOf("start", r.jobId, r.attempt), keyOf("stop", r.jobId, r.attempt)]));
    for (const key of this.sent) if (!keys.has(key)) this.sent.delete(key);
    for (const [id, p] of this.pending) if (!keys.has(p.key)) this.pending.delete(id);
  }

  /** StartJob messages of `starts` not sent yet, recorded as sent and pending. */
  starts(starts: readonly StartJob[]): AttachResponse[] {
    const messages: AttachResponse[] = [];
    for (const start of starts) {
      const key = keyOf("start", start.jobId, start.attempt);
      if (this.sent.has(key)) continue; // sent meanwhile (by the scheduler's hand-over or an earlier sync)
      const message = create(AttachResponseSchema, { payload: { case: "startJob", value: start } });
      this.sent.add(key);
      this.pending.set(start.requestId, { key, kind: "start", jobId: start.jobId, attempt: start.attempt, sentAt: this.clock(), message });
      messages.push(message);
    }
    return messages;
  }

  /** A StopJob message, recorded as sent and pending. */
  stop(jobId: string, attempt: number, reason: FinalizeReason, message: string): AttachResponse {
    const requestId = uuidv7();
    const key = keyOf("stop", jobId, attempt);
    const m = create(AttachResponseSchema, {
      payload: { case: "stopJob", value: { requestId, jobId, attempt, reason, message, gracePeriod: durationFromMs(this.stopGraceMs) } },
    });
    this.sent.add(key);
    this.pending.set(requestId, { key, kind: "stop", jobId, attempt, sentAt: this.clock(), message: m });
    return m;
  }

  /** The pending command `requestId` answers, no longer pending; undefined for an unknown or older id. */
  answer(requestId: string): Pending | undefined {
    const p = this.pending.get(requestId);
    if (p) this.pending.delete(requestId);
    return p;
  }

  /** The commands unanswered for `afterMs` or longer, again under new request ids, to send. */
  resend(now: number, afterMs: number): AttachResponse[] {
    const messages: AttachResponse[] = [];
    for (const [requestId, p] of this.pending) {
      if (now - p.sentAt < afterMs) continue;
      this.pending.delete(requestId);
      const newId = uuidv7();
      const value = { ...(p.message.payload.value as object), requestId: newId };
      const message = create(AttachResponseSchema, { payload: { case: p.message.payload.case, value } as never });
      this.pending.set(newId, { ...p, sentAt: now, message });
      messages.push(message);
    }
    return messages;
  }

  /** The StartJobs not answered yet. */
  unansweredStarts(): Pending[] {
    return [...this.pending.values()].filter((p) => p.kind === "start");
  }
}
