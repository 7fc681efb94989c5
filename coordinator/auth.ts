import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { Code, ConnectError, createContextKey, type HandlerContext } from "@connectrpc/connect";
import type { Sql } from "postgres";
import { AuthService } from "../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { EventService } from "../gen/treadmill/coordinator/v1/event_service_pb.js";
import { HealthService } from "../gen/treadmill/coordinator/v1/health_service_pb.js";
import { HostService } from "../gen/treadmill/coordinator/v1/host_service_pb.js";
import { ImageService } from "../gen/treadmill/coordinator/v1/image_service_pb.js";
import { JobService } from "../gen/treadmill/coordinator/v1/job_service_pb.js";
import { LeaseService } from "../gen/treadmill/coordinator/v1/lease_service_pb.js";
import { RegistryService } from "../gen/treadmill/coordinator/v1/registry_service_pb.js";
import { SubscriptionService } from "../gen/treadmill/coordinator/v1/subscription_service_pb.js";
import { SupervisorService } from "../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { UserService } from "../gen/treadmill/coordinator/v1/user_service_pb.js";
import { procedureEntries, serviceEntries } from "../lib/server/authorize.js";
import type { Authorize } from "../lib/server.js";
import { bearerToken } from "../lib/tokens.js";

/**
 * Who is calling, as established by the auth interceptor from the bearer
 * token. Every handler starts with one of the `require*` functions below.
 */
export type Caller = UserCaller | HostCaller | ServiceCaller;

/** A person (or a script acting for one) with an API token. */
export interface UserCaller {
  kind: "user";
  userId: string;
  name: string;
  role: "admin" | "user";
  tokenId: string;
}

/** A supervisor, with the credential CreateHost issued for its host. */
export interface HostCaller {
  kind: "host";
  hostId: string;
  hostName: string;
}

/**
 * A store, cache, log server or proxy, with a service credential (an API
 * token of scope `service`, owned by the admin who created it).
 */
export interface ServiceCaller {
  kind: "service";
  userId: string;
  tokenId: string;
}

/** The caller of the current RPC; undefined when it sent no token. */
export const callerKey = createContextKey<Caller | undefined>(undefined, { description: "treadmill caller" });

/**
 * Secrets carry a prefix that says what they are, so a credential is looked
 * up in the one table it can be in, and a leaked one is recognisable.
 */
export const SECRET_PREFIX = { user: "tmu_", service: "tms_", host: "tmh_" } as const;

/** A new random secret: the prefix and 32 random bytes, base64url. */
export function newSecret(kind: keyof typeof SECRET_PREFIX): string {
  return SECRET_PREFIX[kind] + randomBytes(32).toString("base64url");
}

/** What is stored of a secret: its sha256 (the secret itself is never stored). */
export function hashSecret(secret: string): Buffer {
  return createHash("sha256").update(secret, "utf8").digest();
}

/** Constant-time comparison of two secret hashes. */
export function sameHash(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

const unauthenticated = () => new ConnectError("invalid, expired or revoked credential", Code.Unauthenticated);

/** How often `last_used_at` of a token is written, at most. */
const LAST_USED_RESOLUTION_MS = 60_000;

/** The kinds of caller a procedure lets through; "anyone" needs no credential. */
type Callers = readonly Caller["kind"][] | "anyone";

const USERS: Callers = ["user"];

/**
 * Who may call each procedure, in one place. The handlers still take their
 * caller with the require* functions below, which also check admin rights
 * and what the caller may see.
 */
const CALLERS = new Map<string, Callers>([
  ...procedureEntries<typeof AuthService, Callers>(AuthService, {
    login: "anyone",
    getSigningKeys: "anyone",
    whoAmI: ["user", "host", "service"],
    createToken: USERS,
    listTokens: USERS,
    revokeToken: USERS,
    createAdminCapability: USERS,
  }),
  ...serviceEntries(UserService, USERS),
  ...serviceEntries(HostService, USERS),
  ...serviceEntries(ImageService, USERS),
  ...serviceEntries(JobService, USERS),
  ...serviceEntries(HealthService, USERS),
  ...serviceEntries(LeaseService, USERS),
  ...serviceEntries(EventService, USERS),
  ...serviceEntries(SubscriptionService, USERS),
  ...serviceEntries<Callers>(SupervisorService, ["host"]),
  ...procedureEntries<typeof RegistryService, Callers>(RegistryService, {
    register: ["service"],
    heartbeat: ["service"],
    deregister: ["service"],
    // Admins (the handler checks the role) and caches finding their upstreams.
    listServices: ["user", "service"],
  }),
]);

/**
 * The coordinator's authorization hook (ServerOptions.authorize), run before
 * any handler on every protocol, the hand-framed Attach included: resolves
 * the bearer token to a Caller (a token that is present but unknown,
 * expired, revoked or of a disabled user is Unauthenticated), checks that the
 * procedure takes that kind of caller (CALLERS), and puts it in the call's
 * context for the handler.
 */
export function authorizeCaller(deps: { sql: Sql; clock?: () => number }): Authorize {
  return async (procedure, headers, values) => {
    const caller = await callerOf(deps, headers);
    const callers = CALLERS.get(procedure) ?? [];
    if (callers !== "anyone") checkKind(caller, callers);
    if (caller !== undefined) values.set(callerKey, caller);
  };
}

/** The caller of a request with these headers, or undefined without a token. */
export async function callerOf(deps: { sql: Sql; clock?: () => number }, headers: Headers): Promise<Caller | undefined> {
  const token = bearerToken(headers);
  return token === undefined ? undefined : resolveCaller(deps.sql, token, (deps.clock ?? Date.now)());
}

async function resolveCaller(sql: Sql, token: string, nowMs: number): Promise<Caller> {
  const hash = hashSecret(token);
  if (token.startsWith(SECRET_PREFIX.host)) {
    const [host] = await sql<{ id: string; name: string }[]>`
      select id, name from hosts where credential_hash = ${hash}`;
    if (!host) throw unauthenticated();
    return { kind: "host", hostId: host.id, hostName: host.name };
  }
  if (!token.startsWith(SECRET_PREFIX.user) && !token.startsWith(SECRET_PREFIX.service)) throw unauthenticated();
  const now = new Date(nowMs);
  const [row] = await sql<
    { token_id: string; user_id: string; name: string; role: "admin" | "user"; scope: string; last_used_at: Date | null }[]
  >`
    select t.id as token_id, u.id as user_id, u.name, u.role, t.scope, t.last_used_at
    from api_tokens t join users u on u.id = t.user_id
    where t.hash = ${hash}
      and t.revoked_at is null
      and (t.expires_at is null or t.expires_at > ${now})
      and not u.disabled`;
  if (!row) throw unauthenticated();
  if (!row.last_used_at || nowMs - row.last_used_at.getTime() > LAST_USED_RESOLUTION_MS) {
    await sql`update api_tokens set last_used_at = ${now} where id = ${row.token_id}`;
  }
  if (row.scope === "service") return { kind: "service", userId: row.user_id, tokenId: row.token_id };
  return { kind: "user", userId: row.user_id, name: row.name, role: row.role, tokenId: row.token_id };
}

/** What a procedure taking only `kind` says to a caller without a credential, and to one of another kind. */
const REFUSALS: Record<Caller["kind"], { missing: string; other: string }> = {
  user: { missing: "this call needs an api token", other: "this call is for users only" },
  host: { missing: "this call needs a host credential", other: "this call is for supervisors only" },
  service: { missing: "this call needs a service credential", other: "this call is for services only" },
};

/** `caller` if it is of one of `kinds`; Unauthenticated without one, PermissionDenied for another kind. */
function checkKind<K extends Caller["kind"]>(caller: Caller | undefined, kinds: readonly K[]): Extract<Caller, { kind: K }> {
  const only = kinds.length === 1 ? REFUSALS[kinds[0]] : undefined;
  if (caller === undefined) throw new ConnectError(only?.missing ?? "this call needs a credential", Code.Unauthenticated);
  if (!(kinds as readonly Caller["kind"][]).includes(caller.kind)) {
    throw new ConnectError(only?.other ?? "this call does not take this kind of credential", Code.PermissionDenied);
  }
  return caller as Extract<Caller, { kind: K }>;
}

/** The calling user; Unauthenticated without a token, PermissionDenied for a host or service. */
export function requireUser(ctx: HandlerContext): UserCaller {
  return checkKind(ctx.values.get(callerKey), ["user"]);
}

/** The calling admin; PermissionDenied for anyone else. */
export function requireAdmin(ctx: HandlerContext): UserCaller {
  const caller = requireUser(ctx);
  if (caller.role !== "admin") throw new ConnectError("this call is for admins only", Code.PermissionDenied);
  return caller;
}

/** The calling supervisor's host. */
export function requireHost(ctx: Pick<HandlerContext, "values">): HostCaller {
  return checkKind(ctx.values.get(callerKey), ["host"]);
}

/** The calling store, cache, log server or proxy. */
export function requireService(ctx: HandlerContext): ServiceCaller {
  return checkKind(ctx.values.get(callerKey), ["service"]);
}
