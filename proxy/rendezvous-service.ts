import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  type ExposeRequest,
  type ExposeResponse,
  ExposeResponseSchema,
  type RendezvousService,
  type TunnelOpen,
  type TunnelRequest,
  type TunnelResponse,
} from "../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import type { Logger } from "../lib/logger.js";
import { bearerToken } from "../lib/tokens.js";
import { checkProtocol, type ProxyAuth } from "./auth.js";
import type { Hub } from "./hub.js";
import { TUNNEL_REQUEST, TUNNEL_RESPONSE } from "../lib/tunnel/wire.js";
import { connectByteStream, readOpen, streamSide, type ByteStream, type StreamTable } from "./rpc-side.js";
import { Outbox } from "../lib/async/outbox.js";
import { PROTOCOL_VERSION } from "../lib/protocol.js";

/**
 * RendezvousService: supervisors' control streams (Expose) and their byte
 * streams (Tunnel), one per client connection.
 */
export class RendezvousServiceImpl implements ServiceImpl<typeof RendezvousService> {
  constructor(
    private readonly deps: { hub: Hub; auth: ProxyAuth; streams: StreamTable; pingIntervalMs: number; proxyId: string; logger: Logger },
  ) {}

  async *expose(requests: AsyncIterable<ExposeRequest>, ctx: HandlerContext): AsyncGenerator<ExposeResponse> {
    const { hub } = this.deps;
    const it = requests[Symbol.asyncIterator]();
    const first = await it.next();
    if (first.done || first.value.payload.case !== "hello") {
      throw new ConnectError("the first message must be hello", Code.InvalidArgument);
    }
    const hello = first.value.payload.value;
    checkProtocol(hello.protocolVersion, "hello.protocol_version");
    if (hello.jobId === "") throw new ConnectError("hello.job_id is required", Code.InvalidArgument);
    if (hello.hostId === "" || hello.hostId.length > 256) {
      throw new ConnectError("hello.host_id is required (at most 256 characters)", Code.InvalidArgument);
    }
    await this.deps.auth.expose(bearerToken(ctx.requestHeader), hello.jobId);

    const outbox = new Outbox<ExposeResponse>(1024 * 1024, () => 128);
    const session = hub.attach({ jobId: hello.jobId, hostId: hello.hostId, attempt: hello.attempt }, outbox);
    const ms = this.deps.pingIntervalMs;
    void outbox.push(
      create(ExposeResponseSchema, {
        payload: {
          case: "welcome",
          value: {
            protocolVersion: PROTOCOL_VERSION,
            proxyId: this.deps.proxyId,
            pingInterval: { seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 },
          },
        },
      }),
    );

    // Reads the supervisor's messages beside the writer below.
    void (async () => {
      for (;;) {
        const next = await it.next();
        if (next.done) return "stream ended";
        hub.heard(session);
        const { payload } = next.value;
        switch (payload.case) {
          case "announce":
            hub.announce(session, payload.value.exposures);
            break;
          case "withdraw":
            hub.withdraw(session, payload.value.names);
            break;
          case "tunnelReady":
            break;
          case "tunnelFailed":
            hub.tunnelFailed(session, payload.value.connectionId, payload.value.reason, payload.value.message);
            break;
          case "pong":
            break;
          case "hello":
            throw new ConnectError("hello may only be the first message", Code.InvalidArgument);
          default:
            break;
        }
      }
    })().then(
      (why) => {
        outbox.end();
        hub.detach(session, why);
      },
      (err: unknown) => {
        const error = ConnectError.from(err);
        // A bad message fails the stream with its code; a broken stream just ends.
        outbox.fail(error);
        hub.detach(session, error.rawMessage);
      },
    );
    ctx.signal.addEventListener("abort", () => hub.detach(session, "stream cancelled"), { once: true });
    try {
      yield* outbox.drain();
    } finally {
      hub.detach(session, "stream closed");
    }
  }

  async *tunnel(requests: AsyncIterable<TunnelRequest>, ctx: HandlerContext): AsyncGenerator<TunnelResponse> {
    const { stream, outbox, done } = connectByteStream<TunnelRequest, TunnelResponse>(requests, TUNNEL_RESPONSE, ctx, this.deps.streams);
    this.serveTunnel(stream, ctx).catch((err: unknown) => outbox.fail(err));
    try {
      yield* outbox.drain();
    } finally {
      done();
    }
  }

  /**
   * One Tunnel on either transport (rpc-side.ts): checks the open and the
   * token and hands the stream to the dial waiting for it. Resolves once the
   * call has said its last word. Both `tunnel` and the raw path
   * (proxy.ts) call it: the raw path writes data straight onto its HTTP/2
   * stream, a shape a Connect handler's response iterator cannot give fast.
   */
  async serveTunnel(stream: ByteStream, ctx: HandlerContext): Promise<void> {
    const open = await readOpen<TunnelOpen>(stream);
    checkProtocol(open.protocolVersion, "open.protocol_version");
    if (open.connectionId === "") throw new ConnectError("open.connection_id is required", Code.InvalidArgument);
    if (open.jobId === "") throw new ConnectError("open.job_id is required", Code.InvalidArgument);
    await this.deps.auth.expose(bearerToken(ctx.requestHeader), open.jobId);
    this.deps.hub.attachTunnel(open.connectionId, open.jobId, streamSide(stream, TUNNEL_REQUEST, TUNNEL_RESPONSE));
    await stream.finished;
  }
}
