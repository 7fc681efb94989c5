/**
 * SupervisorService.Attach for plain gRPC clients (every supervisor), on the
 * coordinator's port ahead of the Connect adapter (lib/server/raw-grpc.ts);
 * Connect and gRPC-Web callers still reach the same stream through the
 * adapter. Why: a bidirectional stream served by connect-node keeps a chain
 * of async generators, promises and abort signals per call and allocates
 * through it for every message; with thousands of attached supervisors that
 * was most of the coordinator's memory per supervisor and a fifth of its CPU
 * under load. Same contract: the host credential as a bearer token, the same
 * codes.
 */
import { toBinary } from "@bufbuild/protobuf";
import type { Sql } from "postgres";
import {
  type AttachRequest,
  AttachRequestSchema,
  AttachResponseSchema,
  SupervisorService,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { decodeMessage, frame, type RawGrpcProcedure } from "../../lib/server/raw-grpc.js";
import { callerOf, hostCaller } from "../auth.js";
import { databaseUnavailable, mapDatabaseError } from "../db/errors.js";
import type { Notifications } from "../db/notifications.js";
import type { SupervisorStreams } from "./supervisor-stream.js";

export const ATTACH_PROCEDURE = `/${SupervisorService.typeName}/${SupervisorService.method.attach.name}`;

/** The plain-gRPC Attach procedure over `streams`. */
export function attachProcedure(
  streams: SupervisorStreams,
  deps: { sql: Sql; clock?: () => number; notifications: Notifications },
): RawGrpcProcedure {
  return async (call) => {
    // As the coordinator's database interceptor does for Connect calls.
    if (!deps.notifications.connected) throw databaseUnavailable();
    try {
      const caller = hostCaller(await callerOf(deps, call.headers));
      async function* requests(): AsyncGenerator<AttachRequest> {
        for await (const bytes of call.messages()) yield decodeMessage(AttachRequestSchema, bytes);
      }
      for await (const message of streams.attachAs(requests(), () => caller, call.signal)) {
        await call.write(frame(toBinary(AttachResponseSchema, message)));
      }
    } catch (err) {
      throw mapDatabaseError(err);
    }
  };
}
