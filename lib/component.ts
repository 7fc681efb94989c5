import { readFileSync } from "node:fs";
import type { ConnectRouter, Interceptor } from "@connectrpc/connect";
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
export function registrationConfigFields<const D extends string>(defaultCoordinatorUrl: D) {
  return {
    coordinatorUrl: {
      type: "url",
      default: defaultCoordinatorUrl,
      description: "the coordinator: its signing keys verify tokens, and it takes the registration (empty: stand-alone)",
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
  } as const;
}

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

/**
 * The life of a component that is one server plus some state of its own:
 * `open` runs before the port is bound (database, data directory), `close`
 * after the server has drained. start() fails fast and undoes what it opened;
 * stop() is idempotent and every caller waits for the one stop in progress.
 */
export function createServingComponent(options: {
  name: string;
  config: ServerConfig;
  logger: Logger;
  routes: (router: ConnectRouter) => void;
  open?: () => Promise<void>;
  close?: () => Promise<void>;
  bulkProcedures?: string[];
  interceptors?: Interceptor[];
}): ServingComponent {
  let server: Server | undefined;
  let stopping: Promise<void> | undefined;
  return {
    async start() {
      await options.open?.();
      try {
        server = createServer({
          ...serverOptions(options.name, options.config, options.logger, options.routes),
          bulkProcedures: options.bulkProcedures,
          interceptors: options.interceptors,
        });
        await server.start();
      } catch (err) {
        await options.close?.();
        throw err;
      }
    },
    stop() {
      stopping ??= (async () => {
        await server?.stop();
        await options.close?.();
      })();
      return stopping;
    },
    address() {
      if (!server) throw new Error(`${options.name} not started`);
      return server.address();
    },
  };
}
