/**
 * Plain TCP entrances (docs/proxy.md): a port from the configured range bound
 * per session by OpenTcpEntrance, for clients that speak neither gRPC nor
 * WebSocket (ssh, nc). Every connection to it is a new connection to the
 * exposure; the port closes at the dial token's expiry. No preamble: the
 * bytes are the exposure's own from the first one, so `ssh -p PORT` works.
 */
import net from "node:net";
import { Code, ConnectError } from "@connectrpc/connect";
import { CloseReason } from "../gen/treadmill/proxy/v1/tunnel_pb.js";
import type { Logger } from "../lib/logger.js";
import type { Hub } from "./hub.js";
import { deferred } from "../lib/async/deferred.js";
import { MAX_CHUNK, type Side, type TunnelEvent } from "./splice.js";

export interface TcpEntrancesOptions {
  hub: Hub;
  /** Address the entrance ports bind to. */
  bindHost: string;
  /** Host name or address clients are told. */
  publicHost: string;
  /** Inclusive port range. */
  range: { low: number; high: number };
  logger: Logger;
}

interface Entrance {
  server: net.Server;
  port: number;
  hostId: string;
  sockets: Set<net.Socket>;
  timer: NodeJS.Timeout;
}

export class TcpEntrances {
  readonly #entrances = new Map<string, Entrance>();
  readonly #opening = new Map<string, Promise<Entrance>>();
  #stopped = false;

  constructor(private readonly options: TcpEntrancesOptions) {}

  /** Ports bound now. */
  get count(): number {
    return this.#entrances.size;
  }

  /** Binds (or finds, for the same token and target) an entrance; returns `host:port`. */
  async open(request: {
    tokenId: string;
    jobId: string;
    hostId: string;
    exposure: string;
    expiresAtMs: number;
    clientAddress: string;
  }): Promise<{ address: string; hostId: string }> {
    if (this.#stopped) throw new ConnectError("proxy is shutting down", Code.Unavailable);
    if (request.clientAddress !== "" && net.isIP(request.clientAddress) === 0) {
      throw new ConnectError("client_address is not an ip address", Code.InvalidArgument);
    }
    const hostId = this.options.hub.locate(request);
    const key = [request.tokenId, request.jobId, hostId, request.exposure, request.clientAddress].join("\u0000");
    let opening = this.#opening.get(key);
    if (!opening) {
      opening = this.#bind(key, { ...request, hostId });
      this.#opening.set(key, opening);
      opening.catch(() => this.#opening.delete(key));
    }
    const entrance = await opening;
    const host = this.options.publicHost.includes(":") ? `[${this.options.publicHost}]` : this.options.publicHost;
    return { address: `${host}:${entrance.port}`, hostId: entrance.hostId };
  }

  async #bind(
    key: string,
    request: { jobId: string; hostId: string; exposure: string; expiresAtMs: number; clientAddress: string },
  ): Promise<Entrance> {
    const { low, high } = this.options.range;
    const size = high - low + 1;
    const start = Math.floor(Math.random() * size);
    const log = this.options.logger.child({ jobId: request.jobId, hostId: request.hostId, exposure: request.exposure });
    for (let i = 0; i < size; i++) {
      const port = low + ((start + i) % size);
      if ([...this.#entrances.values()].some((e) => e.port === port)) continue;
      const sockets = new Set<net.Socket>();
      const server = net.createServer({ allowHalfOpen: true }, (socket) => {
        if (request.clientAddress !== "" && normalise(socket.remoteAddress) !== normalise(request.clientAddress)) {
          socket.destroy();
          return;
        }
        sockets.add(socket);
        socket.once("close", () => sockets.delete(socket));
        this.#serve(socket, request, log);
      });
      const bound = await new Promise<boolean>((resolve) => {
        server.once("error", () => resolve(false));
        server.listen({ host: this.options.bindHost, port }, () => resolve(true));
      });
      if (!bound) continue;
      server.on("error", (err) => log.warn({ err }, "tcp entrance failed"));
      const untilExpiry = Math.max(0, Math.min(request.expiresAtMs - Date.now(), 2 ** 31 - 1));
      const entrance: Entrance = {
        server,
        port,
        hostId: request.hostId,
        sockets,
        timer: setTimeout(() => this.#close(key), untilExpiry),
      };
      this.#entrances.set(key, entrance);
      log.info({ port }, "tcp entrance opened");
      if (this.#stopped) this.#close(key);
      return entrance;
    }
    throw new ConnectError("no free port in the tcp entrance range", Code.ResourceExhausted);
  }

  #serve(socket: net.Socket, request: { jobId: string; hostId: string; exposure: string; expiresAtMs: number }, log: Logger): void {
    socket.setNoDelay(true);
    socket.on("error", (err) => log.debug({ err }, "tcp entrance client failed"));
    const controller = new AbortController();
    socket.once("close", () => controller.abort());
    this.options.hub
      .dial({ ...request, entrance: "tcp", signal: controller.signal })
      .then((dialed) => dialed.connection.start(socketSide(socket), dialed.supervisor))
      .catch((err: unknown) => {
        log.debug({ err }, "tcp entrance dial failed");
        socket.destroy();
      });
  }

  #close(key: string): void {
    const entrance = this.#entrances.get(key);
    if (!entrance) return;
    this.#entrances.delete(key);
    this.#opening.delete(key);
    clearTimeout(entrance.timer);
    entrance.server.close();
    // Open connections end by their own token expiry timer (the same expiry).
    this.options.logger.info({ port: entrance.port }, "tcp entrance closed");
  }

  /** Unbinds every entrance and cuts its connections. */
  stop(): void {
    this.#stopped = true;
    for (const [key, entrance] of [...this.#entrances]) {
      this.#close(key);
      for (const socket of entrance.sockets) socket.destroy();
    }
  }
}

function normalise(address: string | undefined): string {
  return (address ?? "").replace(/^::ffff:/, "");
}

/** A Side over a TCP socket: reads are pulled (TCP backpressure), writes wait for drain. */
export function socketSide(socket: net.Socket): Side {
  const gone = deferred();
  const finished = deferred();
  socket.once("close", () => {
    gone.resolve();
    finished.resolve();
  });
  socket.once("finish", () => finished.resolve());

  async function* events(): AsyncGenerator<TunnelEvent> {
    for await (const chunk of socket.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>) {
      for (let at = 0; at < chunk.byteLength; at += MAX_CHUNK) {
        yield { kind: "data", chunks: [chunk.subarray(at, at + MAX_CHUNK)] };
      }
    }
  }

  return {
    events: events(),
    async send(event) {
      if (socket.destroyed || socket.writableEnded) return false;
      if (event.kind === "half-close") {
        socket.end();
        return true;
      }
      if (event.kind !== "data") return true;
      socket.cork();
      let flushed = true;
      for (const chunk of event.chunks) flushed = socket.write(chunk);
      socket.uncork();
      if (flushed) return true;
      return new Promise<boolean>((resolve) => {
        const done = (ok: boolean) => {
          socket.off("drain", onDrain);
          socket.off("close", onClose);
          resolve(ok);
        };
        const onDrain = () => done(true);
        const onClose = () => done(false);
        socket.on("drain", onDrain);
        socket.on("close", onClose);
      });
    },
    close(reason: CloseReason) {
      if (reason === CloseReason.NORMAL) socket.end();
      else socket.end(() => socket.destroy());
    },
    abort() {
      socket.destroy();
    },
    gone: gone.promise,
    finished: finished.promise,
  };
}
