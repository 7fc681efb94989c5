/**
 * The handlers of the supervisor's messages that the stream does not own:
 * a part of the job system (snapshots, log status) registers the payload
 * cases it answers, job-system.ts wires the registry into the streams. So
 * the stream knows no part by name, and no part imports the stream to be
 * reached (the stream's own cases: hello, reports, acknowledgements,
 * heartbeats are session.ts's).
 */
import type { AttachRequest, AttachResponse } from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import type { HostCaller } from "../auth.js";

type Payload = AttachRequest["payload"];

/** The payload cases a part may register. */
export type HandledCase = Exclude<Payload["case"], undefined | "hello" | "jobStateReport" | "commandAck" | "heartbeat">;

/** The message of a payload case. */
export type PayloadOf<C extends HandledCase> = Extract<Payload, { case: C }>["value"];

export interface PayloadHandler<C extends HandledCase> {
  /**
   * Handled only once the stream's reports and acknowledgements before it
   * have committed (it reads what they wrote); else at its turn in the
   * stream's order, without waiting for their commit.
   */
  afterCommits: boolean;
  /**
   * Handles the message of `host`; the answer, if any, goes back on the
   * stream. A ConnectError ends the stream with its code (InvalidArgument
   * for a malformed message).
   */
  handle(host: HostCaller, value: PayloadOf<C>): Promise<AttachResponse | void>;
}

export class SupervisorHandlers {
  private readonly byCase = new Map<HandledCase, PayloadHandler<never>>();

  /** Registers the handler of `kind`; one per case. */
  on<C extends HandledCase>(kind: C, handler: PayloadHandler<C>): void {
    if (this.byCase.has(kind)) throw new Error(`a handler of ${kind} is registered already`);
    this.byCase.set(kind, handler as unknown as PayloadHandler<never>);
  }

  /** The handler of `kind`; undefined: the message is ignored. */
  get<C extends HandledCase>(kind: C): PayloadHandler<C> | undefined {
    return this.byCase.get(kind) as unknown as PayloadHandler<C> | undefined;
  }
}
