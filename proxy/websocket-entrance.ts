/**
 * The browser entrance (docs/proxy.md): `GET /ws/<job>/<exposure>` upgraded to
 * a WebSocket. The dial token comes in the `Sec-WebSocket-Protocol` header as
 * the subprotocol `bearer.<token>` beside `treadmill.tunnel.v1` (which the
 * proxy selects), or in the `token` query parameter. Query: `host` (job host),
 * `cols` and `rows` (initial window size).
 *
 * Messages: binary both ways are the exposure's bytes. Text messages are
 * JSON control: from the client `{"type":"resize","cols":C,"rows":R}` and
 * `{"type":"half-close"}`; from the proxy first `{"type":"opened",...}`, and
 * `{"type":"half-close"}`. The proxy ends with a close frame: 1000 for a
 * normal end, 4000 + CloseReason otherwise (4006 idle timeout, 4008 token
 * expired...), or 4100 + the Connect code when the tunnel could not be
 * opened (4105 not found, 4114 unavailable...); the reason text says why.
 */
import type { IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import { Code, ConnectError } from "@connectrpc/connect";
import { CloseReason, ExposureKind } from "../gen/treadmill/proxy/v1/tunnel_pb.js";
import type { Logger } from "../lib/logger.js";
import type { ProxyAuth } from "./auth.js";
import { EXPOSURE_NAME, type Hub } from "./hub.js";
import { deferred } from "../lib/async/deferred.js";
import { MAX_CHUNK, type Side, type TunnelEvent } from "./splice.js";
import { WebSocket, WebSocketProtocolError, handshakeProblem, offeredProtocols, refuseUpgrade } from "./websocket.js";

export const WS_PROTOCOL = "treadmill.tunnel.v1";
const BEARER_PREFIX = "bearer.";

const HTTP_STATUS: Partial<Record<Code, [number, string]>> = {
  [Code.InvalidArgument]: [400, "Bad Request"],
  [Code.Unauthenticated]: [401, "Unauthorized"],
  [Code.PermissionDenied]: [403, "Forbidden"],
  [Code.NotFound]: [404, "Not Found"],
  [Code.Unavailable]: [503, "Service Unavailable"],
};

export class WebSocketEntrance {
  readonly #open = new Set<WebSocket>();
  #stopped = false;

  constructor(private readonly deps: { hub: Hub; auth: ProxyAuth; logger: Logger }) {}

  /** Handles an HTTP/1.1 upgrade request on the proxy's port. */
  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    socket.on("error", () => socket.destroy());
    this.#upgrade(req, socket, head).catch((err: unknown) => {
      this.deps.logger.debug({ err }, "websocket upgrade failed");
      socket.destroy();
    });
  }

  async #upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    const url = new URL(req.url ?? "/", "http://proxy");
    const match = /^\/ws\/([^/]+)\/([^/]+)$/.exec(url.pathname);
    if (!match) return refuseUpgrade(socket, 404, "Not Found", "no such websocket endpoint (use /ws/<job>/<exposure>)");
    const problem = handshakeProblem(req);
    if (problem !== undefined) return refuseUpgrade(socket, 400, "Bad Request", problem);
    if (this.#stopped) return refuseUpgrade(socket, 503, "Service Unavailable", "proxy is shutting down");
    const jobId = decodeURIComponent(match[1]);
    const exposure = decodeURIComponent(match[2]);
    const hostId = url.searchParams.get("host") ?? "";
    if (!EXPOSURE_NAME.test(exposure)) return refuseUpgrade(socket, 400, "Bad Request", "exposure must match [a-z][a-z0-9-]{0,31}");
    const protocols = offeredProtocols(req);
    const fromProtocol = protocols.find((p) => p.startsWith(BEARER_PREFIX))?.slice(BEARER_PREFIX.length);
    const token = fromProtocol ?? url.searchParams.get("token") ?? undefined;
    const cols = Number(url.searchParams.get("cols") ?? 0);
    const rows = Number(url.searchParams.get("rows") ?? 0);
    const windowSize = validSize(cols) && validSize(rows) ? { cols, rows } : undefined;

    let grant;
    try {
      grant = await this.deps.auth.dial(token, jobId, exposure, hostId);
    } catch (err) {
      const error = ConnectError.from(err);
      const [status, reason] = HTTP_STATUS[error.code] ?? [500, "Internal Server Error"];
      return refuseUpgrade(socket, status, reason, error.rawMessage);
    }
    // Accepted before the tunnel is up, so that a browser can read why it
    // failed from the close frame (a refused handshake shows it nothing).
    const ws = await WebSocket.accept(req, socket, head, { protocol: protocols.includes(WS_PROTOCOL) ? WS_PROTOCOL : undefined });
    if (ws === undefined) return;
    this.#open.add(ws);
    socket.once("close", () => this.#open.delete(ws));
    const controller = new AbortController();
    socket.once("close", () => controller.abort());
    let dialed;
    try {
      dialed = await this.deps.hub.dial({
        jobId,
        hostId: grant.hostId,
        exposure,
        windowSize,
        expiresAtMs: grant.expiresAtMs,
        entrance: "websocket",
        signal: controller.signal,
      });
    } catch (err) {
      const error = ConnectError.from(err);
      ws.close(4100 + error.code, error.rawMessage);
      return;
    }
    const { exposure: e, connection } = dialed;
    void ws.sendText(
      JSON.stringify({
        type: "opened",
        connectionId: connection.id,
        exposure: { name: e.name, kind: e.kind === ExposureKind.CONSOLE ? "console" : "tcp", resizable: e.resizable, description: e.description },
      }),
    );
    connection.start(webSocketSide(ws), dialed.supervisor);
  }

  /** Refuses new upgrades; open WebSockets end through their connections (the hub closes them). */
  stop(): void {
    this.#stopped = true;
    for (const ws of this.#open) ws.close(4000 + CloseReason.SHUTDOWN, "the proxy is shutting down");
  }
}

function validSize(n: number): boolean {
  return Number.isInteger(n) && n >= 1 && n <= 65535;
}

function webSocketSide(ws: WebSocket): Side {
  const gone = deferred();
  const finished = deferred();
  ws.socket.once("close", () => {
    gone.resolve();
    finished.resolve();
  });
  ws.socket.once("finish", () => finished.resolve());

  async function* events(): AsyncGenerator<TunnelEvent> {
    try {
      for await (const message of ws.messages()) {
        if (message.type === "binary") {
          for (let at = 0; at < message.data.length; at += MAX_CHUNK) {
            yield { kind: "data", chunks: [message.data.subarray(at, at + MAX_CHUNK)] };
          }
          continue;
        }
        let control: { type?: unknown; cols?: unknown; rows?: unknown };
        try {
          control = JSON.parse(message.text) as typeof control;
        } catch {
          yield { kind: "close", reason: CloseReason.ERROR, message: "text messages must be json control messages" };
          return;
        }
        if (control.type === "half-close") {
          yield { kind: "half-close" };
        } else if (control.type === "resize" && validSize(control.cols as number) && validSize(control.rows as number)) {
          yield { kind: "resize", cols: control.cols as number, rows: control.rows as number };
        } else {
          yield { kind: "close", reason: CloseReason.ERROR, message: "unknown control message" };
          return;
        }
      }
    } catch (err) {
      if (err instanceof WebSocketProtocolError) {
        yield { kind: "close", reason: CloseReason.ERROR, message: err.message };
        return;
      }
      throw err;
    }
    // The client closed the WebSocket (or its TCP connection): it is gone.
    yield { kind: "close", reason: CloseReason.CLIENT_GONE, message: "the client closed the websocket" };
  }

  return {
    events: events(),
    send(event) {
      if (event.kind === "data") return ws.sendBinary(event.chunks.length === 1 ? event.chunks[0] : Buffer.concat(event.chunks));
      if (event.kind === "half-close") return ws.sendText('{"type":"half-close"}');
      return Promise.resolve(true);
    },
    close(reason, message) {
      ws.close(reason === CloseReason.NORMAL ? 1000 : 4000 + reason, message);
    },
    abort() {
      ws.destroy();
    },
    gone: gone.promise,
    finished: finished.promise,
  };
}
