/**
 * The supervisor's side of JobService.ControlHost (issue #21): carries out a
 * ControlHostCommand on the job runner it names and answers with a
 * HostControlResult. Idempotent by control id: a control repeated (re-sent
 * by the coordinator on a new stream, or twice on one) is not done again but
 * answered again from what this process remembers, its outcome when done,
 * or once done when still under way.
 */

import { Code } from "@connectrpc/connect";
import { HostControlAction } from "../gen/treadmill/coordinator/v1/job_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { ControlHostCommand, HostControlResult, HostControlResultSchema } from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { Logger } from "../lib/logger.js";
import { ControlRefused, type HostAction } from "./drivers/driver.js";
import type { JobRunner } from "./job-runner.js";

type Result = MessageInitShape<typeof HostControlResultSchema>;
type Outcome = Pick<HostControlResult, "ok" | "message" | "errorCode" | "errorMessage">;

/** Controls remembered for answering repeats; older ones are forgotten (the coordinator ended them long ago). */
const REMEMBERED = 256;

const ACTIONS: Partial<Record<HostControlAction, HostAction>> = {
  [HostControlAction.POWER_OFF]: "power-off",
  [HostControlAction.POWER_ON]: "power-on",
  [HostControlAction.POWER_CYCLE]: "power-cycle",
  [HostControlAction.RESET]: "reset",
};

const CODES: Record<ControlRefused["why"], Code> = {
  unsupported: Code.FailedPrecondition,
  "not-running": Code.FailedPrecondition,
  unavailable: Code.Unavailable,
};

export class HostControls {
  private readonly outcomes = new Map<string, Promise<Outcome>>();

  constructor(
    private readonly deps: {
      logger: Logger;
      /** Sends a HostControlResult (queued across reconnects by the core). */
      send: (result: Result) => void;
    },
  ) {}

  /** Carries out `command` on `runner` (undefined: this host does not hold the attempt), once per control id; answers every time. */
  handle(command: ControlHostCommand, runner: JobRunner | undefined): void {
    let outcome = this.outcomes.get(command.controlId);
    if (outcome === undefined) {
      outcome = this.run(command, runner);
      this.outcomes.set(command.controlId, outcome);
      if (this.outcomes.size > REMEMBERED) this.outcomes.delete(this.outcomes.keys().next().value!);
    }
    void outcome.then((o) => this.deps.send({ requestId: command.requestId, controlId: command.controlId, ...o }));
  }

  private async run(command: ControlHostCommand, runner: JobRunner | undefined): Promise<Outcome> {
    const refuse = (errorCode: Code, errorMessage: string): Outcome => ({ ok: false, message: "", errorCode, errorMessage });
    const action = ACTIONS[command.action];
    if (action === undefined) return refuse(Code.InvalidArgument, "control_host.action is not a known action");
    if (runner === undefined) return refuse(Code.FailedPrecondition, `job ${command.jobId} attempt ${command.attempt} does not run on this host`);
    const log = this.deps.logger.child({ jobId: command.jobId, attempt: command.attempt, controlId: command.controlId, action });
    try {
      const message = await runner.control(action);
      log.info("host controlled");
      return { ok: true, message, errorCode: 0, errorMessage: "" };
    } catch (err) {
      if (err instanceof ControlRefused) {
        log.warn({ why: err.why, reason: err.message }, "host control refused");
        return refuse(CODES[err.why], err.message);
      }
      log.error({ err }, "host control failed");
      return refuse(Code.Internal, "the supervisor could not carry out the control");
    }
  }
}
