/**
 * Capability tokens (DESIGN.md §3): short-lived JWTs signed by the coordinator
 * with Ed25519 (JWS alg "EdDSA"), each granting one action on one resource.
 * Stores, log servers and proxies verify them offline against the
 * coordinator's public keys (GetSigningKeys), refetched when a token names a
 * key id they do not know.
 *
 * Claims: iss, sub (who the token was minted for), aud (optional: the kind of
 * service meant to accept it), iat, exp, jti, scope, and the resource claims
 * `job`, `digest` and `port` as the scope requires. An `image:read` token
 * also names the `holder`: the user whose proven possession of the image at
 * a store backs the read (docs/images.md, "Possession"); a store serves the
 * image only when that user holds it there. A `tunnel:dial` token
 * names the exposure it grants in `exposure` (`console`, `ssh`: what
 * DialOpen.port_name and the proxy's entrances ask for) and may pin the job
 * host in `host`; `port` (a number) is then optional (docs/proxy.md).
 */
import { randomUUID } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  SignJWT,
  calculateJwkThumbprint,
  decodeProtectedHeader,
  errors,
  exportJWK,
  generateKeyPair,
  importJWK,
  jwtVerify,
  type CryptoKey,
  type JSONWebKeySet,
  type JWK,
  type JWTPayload,
} from "jose";
import type { Logger } from "./logger.js";

export type { JSONWebKeySet, JWK };

/** One action on one resource. */
export type Capability =
  | { scope: "log:write"; job: string }
  | { scope: "log:read"; job: string }
  | { scope: "image:read"; digest: string; holder: string }
  | { scope: "image:write" }
  | { scope: "tunnel:expose"; job: string }
  | { scope: "tunnel:dial"; job: string; port?: number; exposure?: string; host?: string }
  | { scope: "service:register" }
  // Administration of a store or log server (delete manifests, collect
  // garbage, delete job logs), minted for admins by CreateAdminCapability.
  | { scope: "image:admin" }
  | { scope: "log:admin" };

export type Scope = Capability["scope"];

/**
 * What a verifier checks a token against: a capability whose `holder` (for
 * `image:read`) may be left out, to be checked by the caller (a store looks
 * the holder up in its own records).
 */
export type Requirement = Exclude<Capability, { scope: "image:read" }> | { scope: "image:read"; digest: string; holder?: string };

export const SCOPES: readonly Scope[] = [
  "log:write",
  "log:read",
  "image:read",
  "image:write",
  "tunnel:expose",
  "tunnel:dial",
  "service:register",
  "image:admin",
  "log:admin",
];

/** What a verified token says. */
export interface VerifiedToken {
  capability: Capability;
  /** Who it was minted for (a user, a host, a service). */
  subject: string;
  /** The services meant to accept it; empty when any may. */
  audience: readonly string[];
  issuer: string;
  /** The token id, for logs and audit. */
  id: string;
  kid: string;
  issuedAtMs: number;
  expiresAtMs: number;
}

const ALG = "EdDSA";
const DIGEST = /^sha256:[0-9a-f]{64}$/;

/** A key pair as stored by the coordinator: the private JWK never leaves it. */
export interface SigningKeyPair {
  kid: string;
  privateJwk: JWK;
  publicJwk: JWK;
}

/**
 * Generates an Ed25519 key pair as JWKs. The kid defaults to the RFC 7638
 * thumbprint of the public key.
 */
export async function generateSigningKey(options: { kid?: string } = {}): Promise<SigningKeyPair> {
  const { privateKey } = await generateKeyPair(ALG, { crv: "Ed25519", extractable: true });
  const jwk = await exportJWK(privateKey);
  const kid = options.kid ?? (await calculateJwkThumbprint(publicJwk(jwk)));
  const privateJwk: JWK = { ...jwk, kid, alg: ALG, use: "sig" };
  return { kid, privateJwk, publicJwk: publicJwk(privateJwk) };
}

/** The public half of an OKP JWK (drops `d` and anything else private). */
export function publicJwk(jwk: JWK): JWK {
  const out: JWK = { kty: jwk.kty, crv: jwk.crv, x: jwk.x };
  if (jwk.kid !== undefined) out.kid = jwk.kid;
  if (jwk.kid !== undefined || jwk.alg !== undefined) out.alg = ALG;
  if (jwk.kid !== undefined || jwk.use !== undefined) out.use = "sig";
  return out;
}

export interface TokenSignerOptions {
  /** The `iss` claim, e.g. the coordinator's public URL. */
  issuer: string;
  /** Milliseconds since the epoch; default Date.now. */
  clock?: () => number;
}

/** Mints capability tokens with one private key. */
export class TokenSigner {
  readonly kid: string;
  private readonly key: CryptoKey;
  private readonly publicKey: JWK;
  private readonly issuer: string;
  private readonly clock: () => number;

  private constructor(kid: string, key: CryptoKey, publicKey: JWK, options: TokenSignerOptions) {
    this.kid = kid;
    this.key = key;
    this.publicKey = publicKey;
    this.issuer = options.issuer;
    this.clock = options.clock ?? Date.now;
  }

  /** Imports a stored private JWK (as made by generateSigningKey). */
  static async create(key: { kid: string; privateJwk: JWK }, options: TokenSignerOptions): Promise<TokenSigner> {
    if (key.privateJwk.kty !== "OKP" || key.privateJwk.crv !== "Ed25519" || typeof key.privateJwk.d !== "string") {
      throw new Error(`signing key ${key.kid} is not an ed25519 private jwk`);
    }
    const imported = await importJWK({ ...key.privateJwk, alg: ALG }, ALG);
    if (imported instanceof Uint8Array) throw new Error(`signing key ${key.kid} is not an asymmetric key`);
    return new TokenSigner(key.kid, imported, { ...publicJwk(key.privateJwk), kid: key.kid, alg: ALG, use: "sig" }, options);
  }

  /**
   * Signs a token granting `capability` to `subject` for `ttlMs` (at least one
   * second: JWT times are whole seconds).
   */
  async sign(capability: Capability, ttlMs: number, to: { subject: string; audience?: string | string[] }): Promise<string> {
    if (!Number.isFinite(ttlMs) || ttlMs < 1000) throw new RangeError("token ttl must be at least 1000 ms");
    if (to.subject === "") throw new Error("token subject must not be empty");
    const claims = capabilityClaims(capability);
    const now = this.clock();
    const jwt = new SignJWT(claims)
      .setProtectedHeader({ alg: ALG, kid: this.kid, typ: "JWT" })
      .setIssuer(this.issuer)
      .setSubject(to.subject)
      .setIssuedAt(Math.floor(now / 1000))
      .setExpirationTime(Math.floor((now + ttlMs) / 1000))
      .setJti(randomUUID());
    if (to.audience !== undefined) jwt.setAudience(to.audience);
    return jwt.sign(this.key);
  }

  /** This key's public half as a JWK set (the coordinator adds its other live keys). */
  publicJwks(): JSONWebKeySet {
    return { keys: [{ ...this.publicKey }] };
  }
}

function capabilityClaims(capability: Capability): JWTPayload {
  switch (capability.scope) {
    case "log:write":
    case "log:read":
    case "tunnel:expose":
      if (!validJob(capability.job)) throw new Error(`${capability.scope} needs a job`);
      return { scope: capability.scope, job: capability.job };
    case "tunnel:dial": {
      if (!validJob(capability.job)) throw new Error("tunnel:dial needs a job");
      const { port, exposure, host } = capability;
      if (port === undefined && exposure === undefined) throw new Error("tunnel:dial needs a port or an exposure");
      if (port !== undefined && !validPort(port)) throw new Error("tunnel:dial needs a port in 1..65535");
      if (exposure !== undefined && !validExposure(exposure)) throw new Error("tunnel:dial needs an exposure name");
      if (host !== undefined && !validJob(host)) throw new Error("tunnel:dial needs a host id");
      return {
        scope: capability.scope,
        job: capability.job,
        ...(port !== undefined && { port }),
        ...(exposure !== undefined && { exposure }),
        ...(host !== undefined && { host }),
      };
    }
    case "image:read":
      if (!DIGEST.test(capability.digest)) throw new Error("image:read needs a sha256:<hex> digest");
      if (!validJob(capability.holder)) throw new Error("image:read needs a holder");
      return { scope: capability.scope, digest: capability.digest, holder: capability.holder };
    case "image:write":
    case "service:register":
    case "image:admin":
    case "log:admin":
      return { scope: capability.scope };
    default:
      throw new Error(`unknown scope ${(capability as { scope: unknown }).scope}`);
  }
}

function validJob(job: unknown): job is string {
  return typeof job === "string" && job !== "" && job.length <= 256;
}

function validPort(port: unknown): port is number {
  return typeof port === "number" && Number.isInteger(port) && port >= 1 && port <= 65535;
}

function validExposure(name: unknown): name is string {
  return typeof name === "string" && /^[a-z][a-z0-9-]{0,31}$/.test(name);
}

/** The capability in verified claims, or undefined when they are malformed. */
function parseCapability(payload: JWTPayload): Capability | undefined {
  const { scope, job, digest, port, exposure, host, holder } = payload;
  switch (scope) {
    case "log:write":
    case "log:read":
    case "tunnel:expose":
      return validJob(job) ? { scope, job } : undefined;
    case "tunnel:dial": {
      if (!validJob(job) || (port === undefined && exposure === undefined)) return undefined;
      if (port !== undefined && !validPort(port)) return undefined;
      if (exposure !== undefined && !validExposure(exposure)) return undefined;
      if (host !== undefined && !validJob(host)) return undefined;
      return {
        scope,
        job,
        ...(port !== undefined && { port }),
        ...(exposure !== undefined && { exposure }),
        ...(host !== undefined && { host }),
      };
    }
    case "image:read":
      return typeof digest === "string" && DIGEST.test(digest) && validJob(holder) ? { scope, digest, holder } : undefined;
    case "image:write":
    case "service:register":
    case "image:admin":
    case "log:admin":
      return { scope };
    default:
      return undefined;
  }
}

/** Why a valid token does not grant `required`, or undefined when it does. */
function mismatch(have: Capability, required: Requirement): string | undefined {
  if (have.scope !== required.scope) return `token does not grant ${required.scope}`;
  if ("job" in required && (!("job" in have) || have.job !== required.job)) {
    return `token does not grant ${required.scope} on job ${required.job}`;
  }
  if ("digest" in required && (!("digest" in have) || have.digest !== required.digest)) {
    return `token does not grant ${required.scope} on ${required.digest}`;
  }
  if ("holder" in required && required.holder !== undefined && (!("holder" in have) || have.holder !== required.holder)) {
    return `token does not grant ${required.scope} backed by holder ${required.holder}`;
  }
  if ("port" in required && required.port !== undefined && (!("port" in have) || have.port !== required.port)) {
    return `token does not grant ${required.scope} on port ${required.port}`;
  }
  if ("exposure" in required && required.exposure !== undefined && (!("exposure" in have) || have.exposure !== required.exposure)) {
    return `token does not grant ${required.scope} on exposure ${required.exposure}`;
  }
  if ("host" in required && required.host !== undefined && (!("host" in have) || have.host !== required.host)) {
    return `token does not grant ${required.scope} on host ${required.host}`;
  }
  return undefined;
}

export interface TokenVerifierOptions {
  /** The coordinator's public keys (GetSigningKeys). */
  keys: () => Promise<JSONWebKeySet>;
  /** When set, the `iss` a token must carry. */
  issuer?: string;
  /**
   * This service's kind ("log", "image", "proxy", ...). A token that names
   * audiences must name this one; a token without `aud` is accepted.
   */
  audience?: string;
  /** Tolerated clock difference with the coordinator; default 30 s. */
  clockToleranceMs?: number;
  /** Milliseconds since the epoch; default Date.now. */
  clock?: () => number;
  /**
   * At most one fetch per this interval, however many unknown kids arrive, so a
   * flood of forged tokens cannot hammer the coordinator; default 5 s. The
   * coordinator should publish a new key this long before signing with it.
   */
  minRefetchIntervalMs?: number;
  /** Keys older than this are refetched before use, so retired keys drop out; default 10 min. */
  maxKeyAgeMs?: number;
  logger?: Logger;
}

/** Verifies capability tokens offline against cached coordinator keys. */
export class TokenVerifier {
  private readonly options: TokenVerifierOptions;
  private readonly clock: () => number;
  private readonly toleranceMs: number;
  private readonly minRefetchMs: number;
  private readonly maxKeyAgeMs: number;
  private keys = new Map<string, CryptoKey>();
  private fetchedAt = -Infinity;
  private attemptedAt = -Infinity;
  private lastFetchFailed = false;
  private inflight: Promise<void> | undefined;

  constructor(options: TokenVerifierOptions) {
    this.options = options;
    this.clock = options.clock ?? Date.now;
    this.toleranceMs = options.clockToleranceMs ?? 30_000;
    this.minRefetchMs = options.minRefetchIntervalMs ?? 5_000;
    this.maxKeyAgeMs = options.maxKeyAgeMs ?? 600_000;
  }

  /**
   * Verifies `token` and checks that it grants `required`. Throws ConnectError
   * Unauthenticated (missing, malformed, expired, bad signature, unknown key),
   * PermissionDenied (valid but for another scope, resource or audience) or
   * Unavailable (the key is unknown and the keys cannot be fetched).
   */
  async verify(token: string | undefined, required: Requirement): Promise<VerifiedToken> {
    if (token === undefined || token === "") throw unauthenticated("missing token");
    let kid: unknown;
    let alg: unknown;
    try {
      ({ kid, alg } = decodeProtectedHeader(token));
    } catch {
      throw unauthenticated("malformed token");
    }
    if ((alg !== ALG && alg !== "Ed25519") || typeof kid !== "string" || kid === "") {
      throw unauthenticated("malformed token");
    }
    const key = await this.keyFor(kid);
    const now = this.clock();
    let payload: JWTPayload;
    try {
      ({ payload } = await jwtVerify(token, key, {
        algorithms: [ALG, "Ed25519"],
        issuer: this.options.issuer,
        currentDate: new Date(now),
        clockTolerance: this.toleranceMs / 1000,
        requiredClaims: ["iss", "sub", "iat", "exp", "jti", "scope"],
      }));
    } catch (err) {
      throw unauthenticated(joseReason(err));
    }
    const { iss, sub, iat, exp, jti, aud } = payload;
    if (typeof iat === "number" && iat * 1000 > now + this.toleranceMs) throw unauthenticated("token not yet valid");
    const capability = parseCapability(payload);
    if (!capability || typeof sub !== "string" || typeof jti !== "string" || typeof iss !== "string") {
      throw unauthenticated("malformed token claims");
    }
    const audience = aud === undefined ? [] : Array.isArray(aud) ? aud : [aud];
    if (audience.length > 0 && (this.options.audience === undefined || !audience.includes(this.options.audience))) {
      throw new ConnectError("token is meant for another service", Code.PermissionDenied);
    }
    const why = mismatch(capability, required);
    if (why !== undefined) throw new ConnectError(why, Code.PermissionDenied);
    return {
      capability,
      subject: sub,
      audience,
      issuer: iss,
      id: jti,
      kid,
      issuedAtMs: (iat as number) * 1000,
      expiresAtMs: (exp as number) * 1000,
    };
  }

  /** The cached key for `kid`, fetching the set when it is stale or the kid unknown (rate-limited). */
  private async keyFor(kid: string): Promise<CryptoKey> {
    if (this.inflight) await this.inflight;
    const stale = this.clock() - this.fetchedAt > this.maxKeyAgeMs;
    if ((stale || !this.keys.has(kid)) && this.mayFetch()) await this.refresh();
    const key = this.keys.get(kid);
    if (key) return key;
    if (this.lastFetchFailed) throw new ConnectError("signing keys unavailable", Code.Unavailable);
    throw unauthenticated("unknown signing key");
  }

  private mayFetch(): boolean {
    return this.inflight !== undefined || this.clock() - this.attemptedAt >= this.minRefetchMs;
  }

  /** One fetch at a time; callers arriving meanwhile wait for it. Keeps the old keys on failure. */
  private refresh(): Promise<void> {
    this.inflight ??= (async () => {
      this.attemptedAt = this.clock();
      try {
        const set = await this.options.keys();
        const next = new Map<string, CryptoKey>();
        for (const jwk of set.keys ?? []) {
          if (typeof jwk.kid !== "string" || jwk.kty !== "OKP" || jwk.crv !== "Ed25519") continue;
          try {
            const key = await importJWK(publicJwk(jwk), ALG);
            if (!(key instanceof Uint8Array)) next.set(jwk.kid, key);
          } catch (err) {
            this.options.logger?.warn({ err, kid: jwk.kid }, "signing key ignored");
          }
        }
        this.keys = next;
        this.fetchedAt = this.clock();
        this.lastFetchFailed = false;
      } catch (err) {
        this.lastFetchFailed = true;
        this.options.logger?.warn({ err }, "signing keys fetch failed");
      } finally {
        this.inflight = undefined;
      }
    })();
    return this.inflight;
  }
}

function unauthenticated(message: string): ConnectError {
  return new ConnectError(message, Code.Unauthenticated);
}

function joseReason(err: unknown): string {
  if (err instanceof errors.JWTExpired) return "token expired";
  if (err instanceof errors.JWSSignatureVerificationFailed) return "invalid token signature";
  if (err instanceof errors.JWTClaimValidationFailed) {
    if (err.claim === "iss") return "token from another issuer";
    if (err.claim === "nbf") return "token not yet valid";
    return "malformed token claims";
  }
  return "malformed token";
}

/** The token of an `authorization: Bearer <token>` header, if any. */
export function bearerToken(headers: Headers): string | undefined {
  const value = headers.get("authorization");
  if (value === null) return undefined;
  const match = /^\s*bearer\s+(\S+)\s*$/i.exec(value);
  return match ? match[1] : undefined;
}
