/**
 * The supervisor's side of a rendezvous proxy (DESIGN.md §8, docs/proxy.md):
 * for one running job, holds `RendezvousService.Expose` to the proxy StartJob
 * named (with the job's `tunnel:expose` token), announces the job's
 * exposures and keeps them in step with the driver's, and for every
 * OpenTunnel dials the exposure's address and splices it to a `Tunnel`
 * stream on a connection of its own. The control stream reconnects with
 * backoff and announces everything again; stop() withdraws the exposures and
 * closes the tunnels.
 *
 * It dials only what the driver offers (drivers/driver.ts `Exposure`), after
 * the driver's check: a dial the driver does not allow is refused with
 * CLOSE_REASON_PERMISSION_DENIED, which the proxy turns into
 * PERMISSION_DENIED for the dialer. A job's declaration never names an
 * address here: the exposure is whatever the driver built for it.
 */
import { hostname } from "node:os";
import net from "node:net";
import { create } from "@bufbuild/protobuf";
import { ConnectError, createClient } from "@connectrpc/connect";
import {
  type ExposeRequest,
  ExposeRequestSchema,
  type OpenTunnel,
  RendezvousService,
} from "../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import { CloseReason, ExposureKind } from "../gen/treadmill/proxy/v1/tunnel_pb.js";
import type { Logger } from "../lib/logger.js";
import { keepStreaming, sleep, type StreamAttempt } from "../lib/retry.js";
import { Outbox } from "../lib/async/outbox.js";
import {
  openTunnelCall,
  tunnelDuplex,
  tunnelTransport,
  type TunnelDuplex,
} from "../lib/tunnel/client.js";
import type { ClientTls } from "../lib/grpc/trust.js";
import { TUNNEL_PATH, TUNNEL_REQUEST, TUNNEL_RESPONSE } from "../lib/tunnel/wire.js";
import { PROTOCOL_VERSION } from "../lib/protocol.js";
import { ExposureDenied, type Exposure } from "./drivers/driver.js";

export interface ExposerOptions {
  /** The proxy's URL, from StartJob. */
  proxyUrl: string;
  /** The job's current `tunnel:expose` token (read for every call, so a refreshed one is used). */
  token: () => string;
  jobId: string;
  /** This host's id as the coordinator knows it; default the machine's host name. */
  hostId?: string;
  /** The job attempt; default 1. */
  attempt?: number;
  /** What the job's driver offers now; polled, and read again on every OpenTunnel. */
  exposures: () => Exposure[];
  /**
   * Resizes a console's terminal, when the driver can (a pseudo-terminal);
   * without it consoles are announced as not resizable.
   */
  resize?: (exposure: string, size: { cols: number; rows: number }) => void;
  logger: Logger;
  /** Aborting it stops the exposer, as stop() does. */
  signal: AbortSignal;
  /** How often exposures() is compared with what was announced; default 1000. */
  pollMs?: number;
  /** How long the driver's check and dialing the address may take; default 5000. */
  connectTimeoutMs?: number;
  /** Reconnect backoff; default 250 ms doubling to 30 s, with jitter. */
  backoff?: { initialMs: number; maxMs: number };
  /** The CAs an https proxy is verified with (the supervisor's --ca-file); default Node's roots. */
  tls?: ClientTls;
}

export interface Exposer {
  /** Withdraws every exposure, closes the tunnels and the control stream. Idempotent. */
  stop(): Promise<void>;
  /** Announces changes of exposures() now rather than at the next poll. */
  refresh(): void;
  /** Whether the control stream is up (welcomed). */
  connected(): boolean;
  /** Tunnels open now. */
  tunnelCount(): number;
}

interface ActiveTunnel {
  exposure: string;
  /** Cuts the Tunnel call and the connection to the exposure. */
  abort(): void;
  /** Ends the tunnel with a reason the proxy hears. */
  close(reason: CloseReason, message: string): void;
}

export function startExposer(options: ExposerOptions): Exposer {
  const log = options.logger.child({ subsystem: "exposer", jobId: options.jobId });
  const hostId = options.hostId ?? hostname();
  const stopController = new AbortController();
  const stopSignal = stopController.signal;
  const tunnels = new Map<string, ActiveTunnel>();
  let control: { requests: Outbox<ExposeRequest>; sync(): void } | undefined;
  let isConnected = false;
  /** Set by stop(): the control stream ends without a reconnect. */
  let stopRequested = false;
  let stopping: Promise<void> | undefined;

  const onAbort = () => void exposer.stop();
  if (options.signal.aborted) queueMicrotask(onAbort);
  else options.signal.addEventListener("abort", onAbort, { once: true });

  const protoExposures = () =>
    options.exposures().map((e) => ({
      name: e.name,
      kind: e.kind === "console" ? ExposureKind.CONSOLE : ExposureKind.TCP,
      description: e.description ?? (e.kind === "console" ? "the job's console" : `port ${e.name}`),
      resizable: e.kind === "console" && options.resize !== undefined,
    }));

  /** Keeps the control stream open until stop(); a welcomed stream starts the backoff afresh. */
  async function runControl(): Promise<void> {
    await keepStreaming({
      open: exposeOnce,
      backoff: options.backoff ?? { initialMs: 250, maxMs: 30_000 },
      signal: stopSignal,
      onEnd() {
        if (stopRequested) return "stop";
        log.warn("proxy ended the expose stream");
      },
      onError(err) {
        if (stopRequested) return "stop";
        const error = ConnectError.from(err);
        log.warn({ code: error.code, reason: error.rawMessage }, "expose stream failed");
        return "retry";
      },
    }).catch(() => undefined); // a failure after stop(): the stream was cut on purpose
  }

  /** One control stream: hello, welcome, announcements, pings and tunnel requests, until it ends. */
  async function exposeOnce(streamAttempt: StreamAttempt): Promise<void> {
    if (stopRequested) return; // stop() came during the backoff: onEnd ends the loop
    const { transport, close } = tunnelTransport(options.proxyUrl, options.token, options.tls);
    const client = createClient(RendezvousService, transport);
    const requests = new Outbox<ExposeRequest>(1024 * 1024, () => 128);
    const attempt = new AbortController();
    const onStop = () => attempt.abort();
    stopSignal.addEventListener("abort", onStop, { once: true });
    const announced = new Map<string, string>();
    const sync = () => {
      if (!isConnected) return;
      const now = protoExposures();
      const changed = now.filter((e) => announced.get(e.name) !== JSON.stringify(e));
      const gone = [...announced.keys()].filter((name) => !now.some((e) => e.name === name));
      if (changed.length > 0) {
        void requests.push(create(ExposeRequestSchema, { payload: { case: "announce", value: { exposures: changed } } }));
        for (const e of changed) announced.set(e.name, JSON.stringify(e));
      }
      if (gone.length > 0) {
        void requests.push(create(ExposeRequestSchema, { payload: { case: "withdraw", value: { names: gone } } }));
        for (const name of gone) announced.delete(name);
      }
    };
    control = { requests, sync };
    let heardAt = Date.now();
    let pingMs = 15_000;
    const timer = setInterval(() => {
      if (Date.now() - heardAt > 3 * pingMs) attempt.abort(new Error("the proxy stopped pinging"));
      else sync();
    }, options.pollMs ?? 1000);
    void requests.push(
      create(ExposeRequestSchema, {
        payload: {
          case: "hello",
          value: { protocolVersion: PROTOCOL_VERSION, jobId: options.jobId, hostId, attempt: options.attempt ?? 1 },
        },
      }),
    );
    try {
      for await (const response of client.expose(requests.drain(), { signal: attempt.signal })) {
        heardAt = Date.now();
        const { payload } = response;
        if (payload.case === "welcome") {
          const d = payload.value.pingInterval;
          if (d) pingMs = Math.max(50, Number(d.seconds) * 1000 + Math.floor(d.nanos / 1e6));
          isConnected = true;
          streamAttempt.healthy();
          log.info({ proxyId: payload.value.proxyId }, "exposing through proxy");
          sync();
        } else if (payload.case === "ping") {
          void requests.push(create(ExposeRequestSchema, { payload: { case: "pong", value: { pingId: payload.value.pingId } } }));
        } else if (payload.case === "openTunnel") {
          openTunnel(payload.value, requests);
        }
      }
    } finally {
      isConnected = false;
      control = undefined;
      clearInterval(timer);
      stopSignal.removeEventListener("abort", onStop);
      requests.end();
      attempt.abort();
      close();
    }
  }

  /** Dials the port and opens the Tunnel; tells the proxy TunnelFailed when it cannot. Idempotent by connection id. */
  function openTunnel(open: OpenTunnel, control: Outbox<ExposeRequest>): void {
    const id = open.connectionId;
    if (tunnels.has(id)) return;
    const tlog = log.child({ connectionId: id, exposure: open.exposureName });
    let tunnel: TunnelDuplex | undefined;
    let socket: net.Socket | undefined;
    const active: ActiveTunnel = {
      exposure: open.exposureName,
      abort() {
        tunnel?.destroy();
        socket?.destroy();
      },
      close(reason, message) {
        tunnel?.sendControl({ case: "close", value: { reason, message } });
        socket?.destroy();
      },
    };
    tunnels.set(id, active);
    let failedOnce = false;
    const failed = (reason: CloseReason, message: string) => {
      if (failedOnce) return;
      failedOnce = true;
      tunnels.delete(id);
      void control.push(
        create(ExposeRequestSchema, { payload: { case: "tunnelFailed", value: { connectionId: id, reason, message } } }),
      );
    };
    const exposure = options.exposures().find((e) => e.name === open.exposureName);
    if (!exposure) {
      failed(CloseReason.EXPOSURE_WITHDRAWN, `the job does not expose ${open.exposureName}`);
      return;
    }
    if (open.windowSize && options.resize) options.resize(exposure.name, { cols: open.windowSize.cols, rows: open.windowSize.rows });

    const where = "path" in exposure ? exposure.name : `${exposure.host}:${exposure.port}`;
    const local = new net.Socket({ allowHalfOpen: true });
    local.setNoDelay(true);
    let connected = false;
    const connectTimer = setTimeout(() => local.destroy(new Error("connect timeout")), options.connectTimeoutMs ?? 5000);
    local.once("error", (err) => {
      clearTimeout(connectTimer);
      if (!connected) {
        tlog.debug({ err }, "exposure refused the connection");
        failed(CloseReason.CONNECT_FAILED, `cannot connect to ${where}`);
      }
    });
    (exposure.check?.() ?? Promise.resolve()).then(
      () => {
        if (local.destroyed) return;
        if ("path" in exposure) local.connect({ path: exposure.path });
        else local.connect({ host: exposure.host, port: exposure.port });
      },
      (err: unknown) => {
        clearTimeout(connectTimer);
        local.destroy();
        if (err instanceof ExposureDenied) {
          tlog.info({ reason: err.message }, "exposure dial refused by the driver");
          failed(CloseReason.PERMISSION_DENIED, err.message);
        } else {
          tlog.debug({ err }, "exposure not ready");
          failed(CloseReason.CONNECT_FAILED, `cannot connect to ${where}`);
        }
      },
    );
    local.once("connect", () => {
      connected = true;
      clearTimeout(connectTimer);
      if (stopRequested) {
        local.destroy();
        return;
      }
      socket = local;
      const { call, responses, close } = openTunnelCall(options.proxyUrl, TUNNEL_PATH, options.token(), TUNNEL_REQUEST, {
        case: "open",
        value: { protocolVersion: PROTOCOL_VERSION, connectionId: id, jobId: options.jobId },
      }, options.tls);
      tunnel = tunnelDuplex({
        call,
        responses,
        send: TUNNEL_REQUEST,
        receive: TUNNEL_RESPONSE,
        onControl: (payload) => {
          if (payload.case === "resize") {
            const size = payload.value as { cols: number; rows: number };
            options.resize?.(exposure.name, { cols: size.cols, rows: size.rows });
          }
        },
        onEnd: close,
      });
      void control.push(create(ExposeRequestSchema, { payload: { case: "tunnelReady", value: { connectionId: id } } }));
      void splice(local, tunnel, tlog).finally(() => tunnels.delete(id));
    });
  }

  /**
   * The exposure's connection <-> tunnel, with backpressure both ways (pipe): the
   * port's FIN becomes half_close and the proxy's half_close the port's FIN;
   * a failed local connection ends the tunnel with CLOSE_REASON_ERROR. The
   * port stays open after a normal close until its bytes are out, and is cut
   * for any other reason. Resolves when the tunnel has ended.
   */
  async function splice(socket: net.Socket, tunnel: TunnelDuplex, tlog: Logger): Promise<void> {
    socket.on("error", (err) => {
      tlog.debug({ err }, "exposure connection failed");
      tunnel.sendControl({ case: "close", value: { reason: CloseReason.ERROR, message: "the connection to the exposure failed" } });
    });
    tunnel.on("error", () => undefined);
    socket.pipe(tunnel);
    // A message arrives in pieces (HTTP/2 frames) that the tunnel emits in
    // one go: corked until the next tick, they leave in one writev.
    let corked = false;
    tunnel.on("data", () => {
      if (corked) return;
      corked = true;
      socket.cork();
      process.nextTick(() => {
        corked = false;
        socket.uncork();
      });
    });
    tunnel.pipe(socket);
    const { reason } = await tunnel.closeReason;
    // After a normal close pipe() ends the socket once it has every byte.
    if (reason !== CloseReason.NORMAL) socket.destroy();
  }

  const running = runControl();

  const exposer: Exposer = {
    stop() {
      stopping ??= (async () => {
        stopRequested = true;
        options.signal.removeEventListener("abort", onAbort);
        const c = control;
        if (c && isConnected) {
          const names = protoExposures().map((e) => e.name);
          if (names.length > 0) void c.requests.push(create(ExposeRequestSchema, { payload: { case: "withdraw", value: { names } } }));
          c.requests.end();
        }
        for (const t of tunnels.values()) t.close(CloseReason.EXPOSURE_WITHDRAWN, "the job's exposures ended");
        // Give the withdraw and the closes a moment to leave before the streams are cut.
        const grace = new AbortController();
        await Promise.race([running, sleep(1000, grace.signal).catch(() => undefined)]);
        grace.abort();
        stopController.abort();
        for (const t of tunnels.values()) t.abort();
        await running;
      })();
      return stopping;
    },
    refresh() {
      control?.sync();
    },
    connected: () => isConnected,
    tunnelCount: () => tunnels.size,
  };
  return exposer;
}
