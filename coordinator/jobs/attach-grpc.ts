/**
 * SupervisorService.Attach for plain gRPC clients (every supervisor), on the
 * coordinator's port ahead of the Connect adapter (lib/grpc/server.ts);
 * Connect and gRPC-Web callers still reach the same stream through the
 * adapter. Why: a bidirectional stream served by connect-node keeps a chain
 * of async generators, promises and abort signals per call and allocates
 * through it for every message; with thousands of attached supervisors that
 * was most of the coordinator's memory per supervisor and a fifth of its CPU
 * under load. Same contract: the host credential as a bearer token, checked
 * by the server's authorization hook (auth.ts) before a message is read, the
 * same checks of every message's text (text.ts), the same codes.
 */
import { toBinary } from "@bufbuild/protobuf";
import {
  type AttachRequest,
  AttachRequestSchema,
  AttachResponseSchema,
  SupervisorService,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { type RawGrpcProcedure } from "../../lib/grpc/server.js";
import { decodeMessage, frame } from "../../lib/grpc/wire.js";
import { requireHost } from "../auth.js";
import { mapDatabaseError } from "../db/errors.js";
import { checkTextFields } from "../text.js";
import type { SupervisorStreams } from "./supervisor-stream.js";

export const ATTACH_PROCEDURE = `/${SupervisorService.typeName}/${SupervisorService.method.attach.name}`;

/** The plain-gRPC Attach procedure over `streams`. */
export function attachProcedure(streams: SupervisorStreams): RawGrpcProcedure {
  return async (call) => {
    // The server's authorization hook has checked the credential (and the
    // database gate) before this runs.
    const caller = requireHost(call);
    try {
      async function* requests(): AsyncGenerator<AttachRequest> {
        for await (const bytes of call.messages()) yield checkTextFields(AttachRequestSchema, decodeMessage(AttachRequestSchema, bytes));
      }
      for await (const message of streams.attachAs(requests(), () => caller, call.signal)) {
        await call.write(frame(toBinary(AttachResponseSchema, message)));
      }
    } catch (err) {
      throw mapDatabaseError(err);
    }
  };
}
