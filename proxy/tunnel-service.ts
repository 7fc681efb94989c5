import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import type { DialOpen, DialRequest, DialResponse, OpenTcpEntranceRequest, TunnelService } from "../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import type { Logger } from "../lib/logger.js";
import { bearerToken } from "../lib/tokens.js";
import { checkProtocol, type ProxyAuth } from "./auth.js";
import { EXPOSURE_NAME, type Hub } from "./hub.js";
import { DIAL_REQUEST, DIAL_RESPONSE } from "../lib/tunnel/wire.js";
import { connectByteStream, readOpen, streamSide, type ByteStream, type StreamTable } from "./rpc-side.js";
import type { TcpEntrances } from "./tcp-entrance.js";

/** TunnelService: clients' Dial streams and TCP entrances. */
export class TunnelServiceImpl implements ServiceImpl<typeof TunnelService> {
  constructor(
    private readonly deps: { hub: Hub; auth: ProxyAuth; streams: StreamTable; tcp: TcpEntrances | undefined; logger: Logger },
  ) {}

  async *dial(requests: AsyncIterable<DialRequest>, ctx: HandlerContext): AsyncGenerator<DialResponse> {
    const { stream, outbox, done } = connectByteStream<DialRequest, DialResponse>(requests, DIAL_RESPONSE, ctx, this.deps.streams);
    this.serveDial(stream, ctx).catch((err: unknown) => outbox.fail(err));
    try {
      yield* outbox.drain();
    } finally {
      done();
    }
  }

  /**
   * One Dial on either transport (rpc-side.ts): checks the open and the
   * token, asks the hub for the tunnel, answers `opened` and splices.
   * Resolves once the call has said its last word. Both `dial` and the raw
   * path (proxy.ts) call it: the raw path writes data straight onto its
   * HTTP/2 stream, a shape a Connect handler's response iterator cannot
   * give fast.
   */
  async serveDial(stream: ByteStream, ctx: HandlerContext): Promise<void> {
    const open = await readOpen<DialOpen>(stream);
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
    void stream.write({ case: "opened", value: { connectionId: dialed.connection.id, exposure: dialed.exposure } });
    dialed.connection.start(streamSide(stream, DIAL_REQUEST, DIAL_RESPONSE), dialed.supervisor);
    await stream.finished;
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
