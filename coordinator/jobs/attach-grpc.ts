/**
 * SupervisorService.Attach on the raw gRPC path (lib/grpc/server.ts), for
 * plain gRPC clients (every supervisor): the same `SupervisorStreams.attach`
 * the Connect adapter serves. Why a second transport: a bidirectional stream
 * served by connect-node keeps a chain of async generators, promises and
 * abort signals per call and allocates through it for every message; with
 * thousands of attached supervisors that was most of the coordinator's
 * memory per supervisor and a fifth of its CPU under load. It still pays
 * behind the route adapter (`npm run bench -- coordinator`, 1,000 idle
 * supervisors, two runs each, back to back on the shared 2-core machine,
 * 2026-12-07): 43.6 and 42.3 KiB of coordinator memory per supervisor with
 * this route, 90.5 and 136 KiB with Attach served by the Connect adapter
 * alone (RSS 209/203 against 250/266 MiB); idle CPU 2.1/2.8% against
 * 4.3/3.2% of a core, dispatch latency within noise. What
 * the coordinator's interceptors do on the Connect path is done here by
 * the same functions: the text check of every message (checkTextFields, in
 * the codec) and the database-outage mapping (mapDatabaseError,
 * coordinator.ts).
 */
import {
  AttachRequestSchema,
  AttachResponseSchema,
  SupervisorService,
} from "../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { protobufCodec } from "../../lib/grpc/codec.js";
import { biDiStreamingRoute, procedureOf, type RawRoute } from "../../lib/grpc/server.js";
import { checkTextFields } from "../text.js";
import type { SupervisorStreams } from "./supervisor-stream.js";

export const ATTACH_PROCEDURE = procedureOf(SupervisorService.method.attach);

const attachCodec = protobufCodec(AttachRequestSchema, AttachResponseSchema, (message) => checkTextFields(AttachRequestSchema, message));

/** The plain-gRPC Attach route over `streams`. */
export function attachRoute(streams: SupervisorStreams): RawRoute {
  return biDiStreamingRoute(SupervisorService.method.attach, attachCodec, (requests, context) => streams.attach(requests, context));
}
