import { readFile } from "node:fs/promises";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { AuthService } from "../gen/treadmill/coordinator/v1/auth_service_pb.js";
import {
  RegistryService,
  type ServiceKind,
  ServiceStatusSchema,
} from "../gen/treadmill/coordinator/v1/registry_service_pb.js";
import type { Logger } from "./logger.js";
import { type HealthStatus, ServingStatus } from "./server/health.js";
import { clientTransport } from "./grpc/transport.js";
import { REPLICA_PING, ReplicaSet, replicaTransport } from "./replicas.js";
import type { ClientTls } from "./grpc/trust.js";
import { classify, keepStreaming, sleep } from "./retry.js";
import type { JSONWebKeySet, JWK } from "./tokens.js";

/**
 * A gRPC (HTTP/2) transport to the coordinator, optionally authenticated,
 * verifying https with `tls`. Given several URLs (its replicas), calls go to
 * one replica at a time and move to the next when it cannot be reached
 * (lib/replicas.ts); `logger` gets the replica in use and each move.
 */
export function coordinatorTransport(
  urls: string | readonly string[],
  credential = "",
  tls?: ClientTls,
  options: { logger?: Logger; ping?: { intervalMs: number; timeoutMs: number } } = {},
): Transport {
  const list = typeof urls === "string" ? [urls] : urls;
  const ping = options.ping ?? REPLICA_PING;
  const transportFor = (url: string) =>
    clientTransport({ baseUrl: url, token: () => credential, tls, pingIntervalMs: ping.intervalMs, pingTimeoutMs: ping.timeoutMs });
  if (list.length === 1) return transportFor(list[0]);
  return replicaTransport(new ReplicaSet({ urls: list, logger: options.logger }), transportFor);
}

/**
 * The key source of a TokenVerifier in a store, log server or proxy: the
 * coordinator's public signing keys (`AuthService.GetSigningKeys`, which needs
 * no credential). The verifier caches them and refetches on an unknown kid.
 */
export function coordinatorKeySource(transport: Transport): () => Promise<JSONWebKeySet> {
  const client = createClient(AuthService, transport);
  return async () => {
    const response = await client.getSigningKeys({}, { timeoutMs: 10000 });
    return {
      keys: response.keys.map((k): JWK => ({ kid: k.kid, kty: k.kty, crv: k.crv, x: k.x, alg: k.alg, use: k.use })),
    };
  };
}

/** The JWKS in `path`, read at every (rate-limited) refetch so that a rotated file is picked up. */
export function fileKeySource(path: string): () => Promise<JSONWebKeySet> {
  return async () => {
    const parsed = JSON.parse(await readFile(path, "utf8")) as JSONWebKeySet;
    if (!Array.isArray(parsed?.keys)) throw new Error(`${path} is not a jwks (no keys array)`);
    return parsed;
  };
}

/**
 * Where a store, log server or proxy gets the keys that verify capability
 * tokens: a JWKS file when one is configured (stand-alone use), else the
 * coordinator's GetSigningKeys; with neither, no key (every token refused).
 */
export function verifierKeySource(
  config: { signingKeysFile: string; coordinatorUrl: readonly string[] },
  tls?: ClientTls,
  logger?: Logger,
): () => Promise<JSONWebKeySet> {
  if (config.signingKeysFile !== "") return fileKeySource(config.signingKeysFile);
  if (config.coordinatorUrl.length > 0) return coordinatorKeySource(coordinatorTransport(config.coordinatorUrl, "", tls, { logger }));
  return async () => ({ keys: [] });
}

export interface RegistrationOptions {
  transport: Transport;
  kind: ServiceKind;
  /** The URL clients and supervisors use to reach this server. */
  url: string;
  site?: string;
  version?: string;
  /** A proxy's public TCP entrance, if any. */
  tcpAddress?: string;
  /** Fresh figures for every heartbeat (free space, streams). */
  status: () => Promise<MessageInitShape<typeof ServiceStatusSchema>> | MessageInitShape<typeof ServiceStatusSchema>;
  logger: Logger;
  signal: AbortSignal;
  /**
   * The server's health: `treadmill.registration` is SERVING while the
   * registration is live, NOT_SERVING while it is not; a registration the
   * coordinator refuses (a wrong flag or credential: it will not change by
   * waiting) makes the whole server NOT_SERVING, as nothing will be routed
   * to it.
   */
  health?: HealthStatus;
}

/** The health service name of a server's registration with the coordinator. */
export const REGISTRATION_HEALTH = "treadmill.registration";

/** Codes of a registration the coordinator refuses for good (until an operator fixes the flags). */
const REFUSED = new Set([Code.InvalidArgument, Code.FailedPrecondition, Code.Unauthenticated, Code.PermissionDenied]);

/**
 * Registers a server with the coordinator's RegistryService and heartbeats at
 * the interval the coordinator asks for, until `signal` aborts (then it
 * deregisters). Survives coordinator outages: retries with backoff and jitter,
 * and registers again when the coordinator forgot it (NotFound). Stops for
 * good, with a clear log line, when the coordinator refuses the credential.
 * Resolves when it has stopped.
 */
export async function runRegistration(options: RegistrationOptions): Promise<void> {
  const { logger, signal } = options;
  const client = createClient(RegistryService, options.transport);
  let serviceId: string | undefined;
  let intervalMs = 10000;
  const status = async () => create(ServiceStatusSchema, await options.status());
  const health = options.health;
  health?.setStatus(REGISTRATION_HEALTH, ServingStatus.NOT_SERVING);

  await keepStreaming({
    // Registers (again) when not registered, then heartbeats; ends only by a failure or the signal.
    open: async (attempt) => {
      while (!signal.aborted) {
        if (serviceId === undefined) {
          const registered = await client.register(
            {
              kind: options.kind,
              url: options.url,
              site: options.site ?? "",
              version: options.version ?? "",
              tcpAddress: options.tcpAddress ?? "",
              status: await status(),
            },
            { signal, timeoutMs: 10000 },
          );
          serviceId = registered.serviceId;
          intervalMs = durationMs(registered.heartbeatInterval) ?? intervalMs;
          logger.info({ serviceId, url: options.url }, "registered with coordinator");
          health?.setStatus(REGISTRATION_HEALTH, ServingStatus.SERVING);
          health?.setStatus("", ServingStatus.SERVING);
        } else {
          const beat = await client.heartbeat({ serviceId, status: await status() }, { signal, timeoutMs: 10000 });
          intervalMs = durationMs(beat.heartbeatInterval) ?? intervalMs;
          // Live again after failed heartbeats (the coordinator or its database was away).
          health?.setStatus(REGISTRATION_HEALTH, ServingStatus.SERVING);
        }
        attempt.healthy();
        await sleep(intervalMs, signal).catch(() => undefined);
      }
    },
    backoff: { initialMs: 250, maxMs: 30000 },
    signal,
    onError(err, { repeated }) {
      const error = ConnectError.from(err);
      health?.setStatus(REGISTRATION_HEALTH, ServingStatus.NOT_SERVING);
      if (error.code === Code.NotFound) {
        // The coordinator dropped our registration (expired): register anew.
        serviceId = undefined;
        return { retryInMs: 0 };
      }
      if (REFUSED.has(error.code)) {
        health?.setStatus("", ServingStatus.NOT_SERVING);
        logger.error(
          { code: Code[error.code], reason: error.rawMessage, url: options.url, site: options.site ?? "" },
          "coordinator refused this server's registration; NOT_SERVING until it is fixed (check --service-credential, --public-url, --site and the other flags)",
        );
        if (error.code === Code.Unauthenticated || error.code === Code.PermissionDenied) {
          serviceId = undefined; // nothing to deregister with a credential the coordinator refuses
          return "stop";
        }
        return { retryInMs: 30_000 };
      }
      // The same failure again (the coordinator is still down) at debug: the first line and the change matter.
      const level = repeated ? "debug" : classify(err) === "retryable" ? "warn" : "error";
      logger[level]({ code: Code[error.code], reason: error.rawMessage }, "cannot reach coordinator registry; retrying");
      return "retry";
    },
  }).catch(() => undefined); // refused for good: logged, and the server is NOT_SERVING
  if (serviceId !== undefined) {
    await client.deregister({ serviceId }, { timeoutMs: 2000 }).catch(() => undefined);
  }
}

function durationMs(d: { seconds: bigint; nanos: number } | undefined): number | undefined {
  if (d === undefined) return undefined;
  const ms = Number(d.seconds) * 1000 + Math.floor(d.nanos / 1e6);
  return ms > 0 ? ms : undefined;
}
