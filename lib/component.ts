import { readFileSync } from "node:fs";
import type { ConnectRouter } from "@connectrpc/connect";
import { coordinatorTransport, runRegistration, type RegistrationOptions } from "./coordinator-client.js";
import type { ClientTls } from "./grpc/trust.js";
import type { Logger } from "./logger.js";
import {
  DEFAULT_GRACE_MS,
  DEFAULT_IDLE_TIMEOUT_MS,
  DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
  DEFAULT_READ_MAX_BYTES,
  createServer,
  type Server,
  type ServerOptions,
} from "./server.js";

/**
 * Config fields every server component has, spread into each component's
 * schema. Keys become `TREADMILL_<COMPONENT>_<KEY>` and `--<key>` flags.
 */
export function serverConfigFields(defaultPort: number) {
  return {
    host: { type: "string", default: "127.0.0.1", description: "address to listen on" },
    port: { type: "int", default: defaultPort, description: "port to listen on (0 picks a free one)" },
    tlsCertFile: { type: "path", default: "", description: "PEM certificate; with tls-key-file, serve TLS with ALPN" },
    tlsKeyFile: { type: "path", default: "", description: "PEM private key of tls-cert-file" },
    corsOrigins: { type: "list", default: [], description: "browser origins allowed to call this server (comma-separated)" },
    readMaxBytes: { type: "int", default: DEFAULT_READ_MAX_BYTES, description: "largest request message accepted, in bytes" },
    graceMs: { type: "duration", default: DEFAULT_GRACE_MS, description: "how long a stop waits for open calls before closing them" },
    // Not `idleTimeoutMs`: the proxy's tunnels have their own idle timeout
    // under that name.
    connectionIdleTimeoutMs: {
      type: "duration",
      default: DEFAULT_IDLE_TIMEOUT_MS,
      min: 0,
      description: "close a connection with no open stream or request after this long (0: never); open streams are never cut",
    },
    maxConnectionsPerAddress: {
      type: "int",
      default: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
      min: 0,
      description: "connections one client address may hold at once, more are refused (0: no limit); raise it for many clients behind one NAT",
    },
    logLevel: logLevelField("info"),
  } as const;
}

/**
 * Config fields of every server that registers with the coordinator (image
 * stores and caches, log servers, proxies) and verifies its capability
 * tokens offline, with the coordinator's keys or a JWKS file.
 */
export function registrationConfigFields(defaultCoordinatorUrl: string) {
  return {
    coordinatorUrl: {
      type: "urls",
      default: defaultCoordinatorUrl === "" ? [] : [defaultCoordinatorUrl],
      description:
        "the coordinator, or its replicas comma-separated (one used at a time, the next when it is unreachable): its signing keys verify tokens, and it takes the registration (empty: stand-alone)",
    },
    signingKeysFile: {
      type: "path",
      default: "",
      description: "a JWKS file of token verification keys, used instead of the coordinator's (stand-alone use, tests)",
    },
    serviceCredential: {
      type: "string",
      default: "",
      secret: true,
      description: "service API token for registering with the coordinator; empty: do not register (prefer the env variable)",
    },
    publicUrl: {
      type: "url",
      default: "",
      description: "the URL clients and supervisors reach this server at, as registered (default: the listening address)",
    },
    site: { type: "string", default: "", description: "the site this server belongs to, as registered (empty: every site)" },
    caFile: caFileField,
  } as const;
}

/**
 * The `caFile` field of every component that dials out: the lab's CA
 * certificates, trusted besides the public roots for every TLS connection
 * it makes (lib/grpc/trust.ts, docs/tls.md).
 */
export const caFileField = {
  type: "path",
  default: "",
  description: "PEM file of CA certificates trusted, besides the public roots, to verify the https servers this one dials (the lab's CA)",
} as const;

/** The `logLevel` field of every component's schema. */
export function logLevelField<const D extends string>(defaultLevel: D) {
  return {
    type: "string",
    default: defaultLevel,
    choices: ["trace", "debug", "info", "warn", "error", "fatal", "silent"],
    description: "log level (logs are JSON lines on standard output)",
  } as const;
}

/** The values of `serverConfigFields`, as loaded. */
export interface ServerConfig {
  host: string;
  port: number;
  tlsCertFile: string;
  tlsKeyFile: string;
  corsOrigins: readonly string[];
  readMaxBytes: number;
  graceMs: number;
  connectionIdleTimeoutMs: number;
  maxConnectionsPerAddress: number;
  logLevel: string;
}

/** Builds `createServer` options from a component's loaded server config. */
export function serverOptions(
  name: string,
  config: ServerConfig,
  logger: Logger,
  routes: (router: ConnectRouter) => void,
): ServerOptions {
  if ((config.tlsCertFile === "") !== (config.tlsKeyFile === "")) {
    throw new Error("tls-cert-file and tls-key-file must be set together");
  }
  return {
    name,
    host: config.host,
    port: config.port,
    logger,
    routes,
    corsOrigins: [...config.corsOrigins],
    readMaxBytes: config.readMaxBytes,
    graceMs: config.graceMs,
    idleTimeoutMs: config.connectionIdleTimeoutMs,
    maxConnectionsPerAddress: config.maxConnectionsPerAddress,
    tls:
      config.tlsCertFile === ""
        ? undefined
        : { cert: readFileSync(config.tlsCertFile), key: readFileSync(config.tlsKeyFile) },
  };
}

/** What every component's `create*()` returns. */
export interface Component {
  /** Fails fast: database, migrations, bind. */
  start(): Promise<void>;
  /** Idempotent; drains for the grace period, then forces. */
  stop(): Promise<void>;
}

/** A component that serves RPCs on one port. */
export interface ServingComponent extends Component {
  /** Where it listens; valid after start(). */
  address(): { host: string; port: number; url: string };
}

/** The values of `registrationConfigFields`, as loaded. */
export interface RegistrationConfig {
  /** The coordinator's replicas; empty: stand-alone. */
  coordinatorUrl: readonly string[];
  serviceCredential: string;
  publicUrl: string;
  site: string;
}

/** What a server registers with the coordinator; the URL, site and credential come from its config. */
export interface ServerRegistration {
  kind: RegistrationOptions["kind"];
  version?: string;
  /** A proxy's public TCP entrance, if any. */
  tcpAddress?: string;
  /** Fresh figures for each heartbeat; `draining` is true once stop() began. */
  status: (draining: boolean) => ReturnType<RegistrationOptions["status"]>;
  /** Default: the component's logger. */
  logger?: Logger;
}

/** The options of `createServingComponent`. */
export interface ServingComponentOptions {
  name: string;
  config: ServerConfig;
  logger: Logger;
  /** The routes; or `server().routes`, when they need what `open` made. */
  routes?: (router: ConnectRouter) => void;
  /** Before the port is bound (database, data directory); undoes what it opened when it throws. */
  open?: () => Promise<void>;
  /** createServer options beyond the config's (hook, interceptors, raw handlers), read after `open`. */
  server?: () => Partial<ServerOptions>;
  /** Before the port is bound, with the server (metrics, health watchers). */
  prepare?: (server: Server) => void;
  /** Once the port is bound: work that must start or fail start() (the coordinator's loops); a throw stops the server and closes. */
  started?: () => Promise<void>;
  /** Background work started once the port is bound (retention, refreshes); `signal` aborts as stop() begins. */
  background?: (signal: AbortSignal) => Array<Promise<void> | undefined>;
  /**
   * Registration with the coordinator (DESIGN.md §2 RegistryService) when
   * the config names a coordinator and a service credential: heartbeats
   * while serving, deregistration as stop() begins, and the
   * `treadmill.registration` health service (`lib/coordinator-client.ts`).
   */
  registration?: { config: RegistrationConfig; tls?: ClientTls; describe: (server: Server) => ServerRegistration };
  /** As stop() begins, with the background signal aborted: refuse new work, end streams. */
  stopping?: () => void;
  /** Once the background work (and the deregistration) ended, before the server drains. */
  drain?: () => void;
  /** After the server drained; also when start() fails after `open`. */
  close?: () => Promise<void>;
}

/**
 * The life of every server component: `open` before the port is bound,
 * then the server (config, routes, hook), then its background work and its
 * registration with the coordinator. start() fails fast and undoes what it
 * opened. stop() is idempotent and every caller waits for the one stop in
 * progress: it aborts the background work and deregisters first (the
 * coordinator routes no one here while the server drains, and clients get
 * Unavailable at once rather than at the end of the grace period), then the
 * server drains, then `close`.
 */
export function createServingComponent(options: ServingComponentOptions): ServingComponent {
  const { name, config, logger } = options;
  const background = new AbortController();
  const tasks: Array<Promise<void> | undefined> = [];
  let server: Server | undefined;
  let stopping: Promise<void> | undefined;
  return {
    async start() {
      await options.open?.();
      try {
        server = createServer({ ...serverOptions(name, config, logger, options.routes ?? (() => undefined)), ...options.server?.() });
        options.prepare?.(server);
        await server.start();
        await options.started?.();
      } catch (err) {
        await server?.stop();
        await options.close?.();
        throw err;
      }
      tasks.push(...(options.background?.(background.signal) ?? []));
      const registration = options.registration;
      if (registration && registration.config.coordinatorUrl.length > 0 && registration.config.serviceCredential !== "") {
        const { kind, version, tcpAddress, status, logger: registrationLogger } = registration.describe(server);
        const log = (registrationLogger ?? logger).child({ subsystem: "registration" });
        tasks.push(
          runRegistration({
            transport: coordinatorTransport(registration.config.coordinatorUrl, registration.config.serviceCredential, registration.tls, {
              logger: log,
            }),
            kind,
            url: registration.config.publicUrl !== "" ? registration.config.publicUrl : server.address().url,
            site: registration.config.site,
            version,
            tcpAddress,
            status: () => status(background.signal.aborted),
            logger: log,
            signal: background.signal,
            health: server.health,
          }),
        );
      }
    },
    stop() {
      stopping ??= (async () => {
        background.abort();
        options.stopping?.();
        await Promise.all(tasks);
        options.drain?.();
        await server?.stop();
        await options.close?.();
      })();
      return stopping;
    },
    address() {
      if (!server) throw new Error(`${name} not started`);
      return server.address();
    },
  };
}
