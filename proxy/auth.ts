/**
 * Capability checks of the proxy (docs/proxy.md): supervisors present a
 * `tunnel:expose` token for the job, clients a `tunnel:dial` token for the job
 * and the exposure (its `exposure` claim), optionally pinned to a host.
 *
 * Two steps: the server's hook (proxyAuthorizer, the table below) lets a call
 * through only with an authentic token of a scope its procedure takes,
 * before any handler reads the request (the hand-framed Dial and Tunnel
 * included); the handlers then check the job, exposure and host (ProxyAuth).
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { RendezvousService } from "../gen/treadmill/proxy/v1/rendezvous_service_pb.js";
import { TunnelService } from "../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { capabilityAuthorizer, scopeEntries } from "../lib/server/authorize.js";
import type { Authorize } from "../lib/server.js";
import type { TokenVerifier, VerifiedToken } from "../lib/tokens.js";
import { PROTOCOL_VERSION } from "../lib/protocol.js";

/** The proxy's hook: the scopes each procedure takes. */
export function proxyAuthorizer(verifier: TokenVerifier): Authorize {
  return capabilityAuthorizer(verifier, [
    ...scopeEntries(RendezvousService, { expose: ["tunnel:expose"], tunnel: ["tunnel:expose"] }),
    ...scopeEntries(TunnelService, { dial: ["tunnel:dial"], openTcpEntrance: ["tunnel:dial"] }),
  ]);
}

export interface DialGrant {
  token: VerifiedToken;
  /** The host asked for, or the token's `host` claim, or "" (any host of the job). */
  hostId: string;
  expiresAtMs: number;
}

export class ProxyAuth {
  constructor(private readonly verifier: TokenVerifier) {}

  /** Throws Unauthenticated / PermissionDenied / Unavailable. */
  expose(token: string | undefined, jobId: string): Promise<VerifiedToken> {
    return this.verifier.verify(token, { scope: "tunnel:expose", job: jobId });
  }

  /** Checks a dial token for `jobId`, `exposure` and (when asked) `hostId`. */
  async dial(token: string | undefined, jobId: string, exposure: string, hostId: string): Promise<DialGrant> {
    const verified = await this.verifier.verify(token, { scope: "tunnel:dial", job: jobId, exposure });
    const capability = verified.capability;
    const pinned = capability.scope === "tunnel:dial" ? capability.host : undefined;
    if (pinned !== undefined && hostId !== "" && hostId !== pinned) {
      throw new ConnectError(`token does not grant tunnel:dial on host ${hostId}`, Code.PermissionDenied);
    }
    return { token: verified, hostId: hostId !== "" ? hostId : (pinned ?? ""), expiresAtMs: verified.expiresAtMs };
  }
}

/** Throws FailedPrecondition for an unsupported major (a missing version counts as 1.0). */
export function checkProtocol(version: { major: number } | undefined, field: string): void {
  const major = version?.major ?? PROTOCOL_VERSION.major;
  if (major !== PROTOCOL_VERSION.major && major !== 0) {
    throw new ConnectError(`${field}.major ${major} is not supported (this proxy speaks ${PROTOCOL_VERSION.major})`, Code.FailedPrecondition);
  }
}
