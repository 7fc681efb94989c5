/**
 * JobService.ControlHost (issue #21): the job's owner or an admin powers
 * off, powers on, power-cycles or resets one host of a running job.
 *
 * The operation lives in the table `host_controls` (migration 0014), as a
 * snapshot does in `snapshots`: ControlHost validates, checks that the host
 * is online, and inserts the control PENDING with a HOST_CONTROL timeline
 * event (and its audit twin `job.host_control`), notifying
 * 'treadmill_controls' with the host id. The replica holding the host's
 * stream sends ControlHostCommand (host-delivery.ts, audited as
 * `command.control_host`); the supervisor's HostControlResult, on whichever
 * replica holds the stream, ends it DONE or FAILED with a second timeline
 * event, which wakes the caller waiting on any replica ('treadmill_jobs').
 * A control that cannot be answered any more ends FAILED when its caller
 * looks: UNAVAILABLE when its host went offline, FAILED_PRECONDITION when
 * its attempt ended (a control is delivered only while its attempt runs). Idempotent by (caller, request_id): the same request answers
 * the same, acting once.
 */
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext } from "@connectrpc/connect";
import { HostControlAction } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { type ControlHostRequest, type ControlHostResponse, ControlHostResponseSchema } from "../../gen/treadmill/coordinator/v1/job_service_pb.js";
import { AttachResponseSchema, type HostControlResult } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { actorOf } from "../audit.js";
import type { HostCaller, UserCaller } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import { audit } from "../db/queries/audit.js";
import { type EventInput, recordEvent } from "../db/queries/events.js";
import {
  type ControlRow,
  type ControlView,
  type HostActionName,
  control,
  controlOfRequest,
  endControl,
  hostOnline,
  insertControl,
  jobHostAt,
  notifyControls,
  pendingControlsOfHost,
} from "../db/queries/host-controls.js";
import { type Db, loadJob } from "../db/queries/jobs.js";
import { checkId, checkText, clipText, denied, invalid, isUniqueViolation, notFound, precondition, uuidv7 } from "../shared/common.js";
import type { JobConfig } from "./config.js";
import { HostDelivery } from "./host-delivery.js";
import { waitOperation } from "./operation-wait.js";
import type { HostSession } from "./session.js";
import type { SupervisorHandlers } from "./stream-handlers.js";
import type { SupervisorStreams } from "./supervisor-stream.js";
import type { JobWatchers } from "./watchers.js";

const ACTIONS: Partial<Record<HostControlAction, HostActionName>> = {
  [HostControlAction.POWER_OFF]: "power-off",
  [HostControlAction.POWER_ON]: "power-on",
  [HostControlAction.POWER_CYCLE]: "power-cycle",
  [HostControlAction.RESET]: "reset",
};
const ACTION_OF: Record<HostActionName, HostControlAction> = {
  "power-off": HostControlAction.POWER_OFF,
  "power-on": HostControlAction.POWER_ON,
  "power-cycle": HostControlAction.POWER_CYCLE,
  reset: HostControlAction.RESET,
};

/** The job's state for a timeline event of a control (job_events.state). */
async function controlEvent(tx: Db, row: ControlView, message: string, actor: string): Promise<void> {
  const job = await loadJob(tx, row.job_id);
  await recordEvent(tx, {
    jobId: row.job_id,
    // job_events.kind is free text; the timeline maps it to JOB_EVENT_KIND_HOST_CONTROL.
    kind: "host_control" as EventInput["kind"],
    state: job?.state ?? "finalized",
    attempt: row.attempt,
    hostId: row.host_id,
    actor,
    ownerId: row.owner_id,
    message,
  });
}

/** Ends a pending control (in `tx`, its row locked) with its second timeline event. */
async function endPending(tx: Db, row: ControlView, end: { ok: boolean; errorCode: number; message: string }, actor: string): Promise<void> {
  const message = clipText(end.message, 1024);
  await endControl(tx, row.id, { ...end, message });
  const said = end.ok
    ? `host ${row.host_name}: ${message}`
    : `${row.action} of host ${row.host_name} failed: ${message} (${Code[end.errorCode] ?? "Unknown"})`;
  await controlEvent(tx, row, said, actor);
}

export class HostControls {
  private readonly delivery: HostDelivery<ControlRow>;

  constructor(
    private readonly ctx: CoordinatorContext,
    private readonly config: JobConfig,
    streams: SupervisorStreams,
    private readonly watchers: JobWatchers,
  ) {
    this.delivery = new HostDelivery(ctx, config, streams, {
      channel: "treadmill_controls",
      what: "host-controls",
      pending: (hostId) => pendingControlsOfHost(ctx.sql, hostId),
      send: (session, hostId, row) => this.send(session, hostId, row),
    });
  }

  /** The stream's HostControlResult. */
  registerHandlers(handlers: SupervisorHandlers): void {
    handlers.on("hostControlResult", { afterCommits: false, handle: (host, result) => this.onResult(host, result) });
  }

  start(): Promise<void> {
    return this.delivery.start();
  }

  stop(): void {
    this.delivery.stop();
  }

  private async send(session: HostSession, hostId: string, row: ControlRow): Promise<void> {
    const requestId = uuidv7(this.ctx.clock());
    session.outbox.push(
      create(AttachResponseSchema, {
        payload: {
          case: "controlHost",
          value: { requestId, controlId: row.id, jobId: row.job_id, attempt: row.attempt, action: ACTION_OF[row.action] },
        },
      }),
    );
    await audit(this.ctx.sql, {
      kind: "command.control_host",
      actor: "system",
      jobId: row.job_id,
      hostId,
      message: `${row.action} sent to host ${hostId}`,
      details: { requestId, controlId: row.id, attempt: row.attempt, action: row.action, replica: this.ctx.replicaId },
    });
  }

  /**
   * The supervisor's HostControlResult: ends the control. Idempotent: a
   * result for a control already ended, or of another host, changes
   * nothing. A malformed one is InvalidArgument (it ends the stream).
   */
  private async onResult(host: HostCaller, result: HostControlResult): Promise<void> {
    checkId("host_control_result.control_id", result.controlId);
    const code = result.ok ? 0 : result.errorCode > 0 && result.errorCode <= 16 ? result.errorCode : Code.Internal;
    const message = result.ok ? result.message : result.errorMessage || "the supervisor gave no reason";
    await this.ctx.sql.begin(async (tx) => {
      const row = await control(tx, result.controlId, { lock: true });
      if (!row || row.host_id !== host.hostId || row.state !== "pending") return;
      await endPending(tx, row, { ok: result.ok, errorCode: code, message }, `host:${host.hostName}`);
    });
  }

  /** JobService.ControlHost. */
  async controlHost(caller: UserCaller, req: ControlHostRequest, hctx: HandlerContext): Promise<ControlHostResponse> {
    checkId("job_id", req.jobId);
    const action = ACTIONS[req.action];
    if (action === undefined) throw invalid("action must be one of POWER_OFF, POWER_ON, POWER_CYCLE, RESET");
    if (req.hostIndex < 0 || req.hostIndex > 63) throw invalid("host_index must be between 0 and 63");
    checkText("request_id", req.requestId, 64);
    const requestId = req.requestId === "" ? null : req.requestId;
    const same = (existing: ControlRow) => {
      if (existing.job_id !== req.jobId || existing.action !== action || existing.host_index !== req.hostIndex) {
        throw invalid("request_id was already used for another control");
      }
      return existing.id;
    };
    const id = await this.ctx.sql
      .begin(async (tx) => {
        if (requestId !== null) {
          const existing = await controlOfRequest(tx, caller.userId, requestId);
          if (existing) return same(existing);
        }
        return this.create(tx, caller, req.jobId, req.hostIndex, action, requestId);
      })
      .catch(async (err: unknown) => {
        // Two calls with one request_id at once: the second finds the first's.
        if (requestId === null || !isUniqueViolation(err, "host_controls_request_id_idx")) throw err;
        return same((await controlOfRequest(this.ctx.sql, caller.userId, requestId))!);
      });
    const row = await this.waitDone(id, hctx);
    if (row.state === "failed") throw new ConnectError(row.message, row.error_code as Code);
    return create(ControlHostResponseSchema, {
      jobId: row.job_id,
      hostId: row.host_id,
      hostName: row.host_name,
      action: ACTION_OF[row.action],
      message: row.message,
    });
  }

  private async create(tx: Db, caller: UserCaller, jobId: string, hostIndex: number, action: HostActionName, requestId: string | null): Promise<string> {
    const job = await loadJob(tx, jobId, { lock: true });
    if (!job) throw notFound(`job ${jobId} not found`);
    if (caller.role !== "admin" && job.owner_id !== caller.userId) throw denied(`job ${jobId} belongs to another user`);
    if (job.state !== "running") throw precondition(`job ${jobId} is ${job.state}, not running`);
    if (job.stop_reason !== null) throw precondition(`job ${jobId} is being stopped (${job.stop_reason})`);
    const host = await jobHostAt(tx, jobId, job.attempt, hostIndex);
    if (!host) throw invalid(`host_index ${hostIndex} is not a host of job ${jobId} (it has ${job.host_ids.length})`);
    if (!host.online) throw new ConnectError(`host ${host.name} is offline`, Code.Unavailable);
    const id = uuidv7(this.ctx.clock());
    await insertControl(tx, { id, jobId, attempt: job.attempt, hostId: host.id, hostIndex, action, requestedBy: caller.userId, requestId });
    const row = { id, job_id: jobId, attempt: job.attempt, host_id: host.id, host_name: host.name, owner_id: job.owner_id } as ControlView;
    await controlEvent(tx, row, `${action} of host ${host.name} requested by ${caller.name}`, actorOf(caller));
    await notifyControls(tx, host.id);
    return id;
  }

  /**
   * The control now; a pending one ends first when it cannot be answered any
   * more: FAILED_PRECONDITION when its attempt ended, UNAVAILABLE when its
   * host went offline.
   */
  private async current(id: string): Promise<ControlView> {
    return this.ctx.sql.begin(async (tx) => {
      const row = (await control(tx, id, { lock: true }))!;
      if (row.state !== "pending") return row;
      if (!row.attempt_running) {
        await endPending(tx, row, { ok: false, errorCode: Code.FailedPrecondition, message: `job ${row.job_id} ended before host ${row.host_name} answered` }, "system");
      } else if (!(await hostOnline(tx, row.host_id))) {
        await endPending(tx, row, { ok: false, errorCode: Code.Unavailable, message: `host ${row.host_name} went offline before it answered` }, "system");
      } else {
        return row;
      }
      return (await control(tx, id))!;
    });
  }

  /** Waits until the control ends, bounded by the call's deadline (operation-wait.ts). */
  private waitDone(id: string, hctx: HandlerContext): Promise<ControlView> {
    return waitOperation({
      watchers: this.watchers,
      current: () => this.current(id),
      ended: (row) => row.state !== "pending",
      heartbeatMs: this.config.supervisorHeartbeatMs,
      hctx,
      stillPending: `control ${id} is still pending at the call's deadline; call again with the same request_id to wait for it`,
    });
  }
}
