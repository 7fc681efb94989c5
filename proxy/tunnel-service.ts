import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  type DialRequest,
  type DialResponse,
  DialResponseSchema,
  type OpenTcpEntranceRequest,
  type TunnelService,
} from "../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import type { Logger } from "../lib/logger.js";
import { bearerToken } from "../lib/tokens.js";
import { checkProtocol, type ProxyAuth } from "./auth.js";
import { EXPOSURE_NAME, type Hub } from "./hub.js";
import { STREAM_HEADER, rpcSide, type StreamTable } from "./rpc-side.js";
import { MAX_CHUNK } from "./splice.js";
import type { TcpEntrances } from "./tcp-entrance.js";

/** TunnelService: clients' Dial streams and TCP entrances. */
export class TunnelServiceImpl implements ServiceImpl<typeof TunnelService> {
  constructor(
    private readonly deps: { hub: Hub; auth: ProxyAuth; streams: StreamTable; tcp: TcpEntrances | undefined; logger: Logger },
  ) {}

  async *dial(requests: AsyncIterable<DialRequest>, ctx: HandlerContext): AsyncGenerator<DialResponse> {
    const it = requests[Symbol.asyncIterator]();
    const first = await it.next();
    if (first.done || first.value.payload.case !== "open") {
      throw new ConnectError("the first message must be open", Code.InvalidArgument);
    }
    const open = first.value.payload.value;
    checkProtocol(open.protocolVersion, "open.protocol_version");
    validateTarget(open.jobId, open.portName, open.hostId, "open.");
    const grant = await this.deps.auth.dial(bearerToken(ctx.requestHeader), open.jobId, open.portName, open.hostId);
    const dialed = await this.deps.hub.dial({
      jobId: open.jobId,
      hostId: grant.hostId,
      exposure: open.portName,
      windowSize: open.windowSize,
      expiresAtMs: grant.expiresAtMs,
      entrance: "grpc",
      signal: ctx.signal,
    });

    const streamId = ctx.requestHeader.get(STREAM_HEADER);
    const { side, outbox, finished } = rpcSide<DialRequest, DialResponse>({
      requests: it,
      toEvent: (request) => {
        const { payload } = request;
        switch (payload.case) {
          case "data":
            return payload.value.byteLength > MAX_CHUNK ? "data messages are at most 65536 bytes" : { kind: "data", bytes: payload.value };
          case "halfClose":
            return { kind: "half-close" };
          case "resize":
            return { kind: "resize", cols: payload.value.cols, rows: payload.value.rows };
          case "open":
            return "open may only be the first message";
          default:
            return "unknown message";
        }
      },
      fromEvent: (event) =>
        create(DialResponseSchema, {
          payload:
            event.kind === "data"
              ? { case: "data", value: event.bytes }
              : { case: "halfClose", value: {} },
        }),
      closeMessage: (reason, message) => create(DialResponseSchema, { payload: { case: "closed", value: { reason, message } } }),
      sizeOf: (r) => (r.payload.case === "data" ? r.payload.value.byteLength : 64),
      signal: ctx.signal,
      abort: () => this.deps.streams.reset(streamId),
    });
    void outbox.push(
      create(DialResponseSchema, {
        payload: { case: "opened", value: { connectionId: dialed.connection.id, exposure: dialed.exposure } },
      }),
    );
    dialed.connection.start(side, dialed.supervisor);
    try {
      yield* outbox.drain();
    } finally {
      finished();
    }
  }

  async openTcpEntrance(request: OpenTcpEntranceRequest, ctx: HandlerContext) {
    validateTarget(request.jobId, request.portName, request.hostId, "");
    if (request.clientAddress.length > 64) throw new ConnectError("client_address is not an ip address", Code.InvalidArgument);
    const token = bearerToken(ctx.requestHeader);
    const grant = await this.deps.auth.dial(token, request.jobId, request.portName, request.hostId);
    const tcp = this.deps.tcp;
    if (!tcp) throw new ConnectError("this proxy has no tcp entrance range", Code.FailedPrecondition);
    const opened = await tcp.open({
      tokenId: grant.token.id,
      jobId: request.jobId,
      hostId: grant.hostId,
      exposure: request.portName,
      expiresAtMs: grant.expiresAtMs,
      clientAddress: request.clientAddress,
    });
    return { address: opened.address, expiresAt: timestampFromMs(grant.expiresAtMs), hostId: opened.hostId };
  }
}

function validateTarget(jobId: string, portName: string, hostId: string, prefix: string): void {
  if (jobId === "" || jobId.length > 256) throw new ConnectError(`${prefix}job_id is required`, Code.InvalidArgument);
  if (!EXPOSURE_NAME.test(portName)) {
    throw new ConnectError(`${prefix}port_name must match [a-z][a-z0-9-]{0,31}`, Code.InvalidArgument);
  }
  if (hostId.length > 256) throw new ConnectError(`${prefix}host_id is too long`, Code.InvalidArgument);
}
