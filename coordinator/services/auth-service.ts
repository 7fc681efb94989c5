import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import type { TransactionSql } from "postgres";
import { isDatabaseUnavailable } from "../db/errors.js";
import { CapabilityScope, CapabilityTokenSchema } from "../../gen/treadmill/common/v1/capability_pb.js";
import {
  type AuthService,
  type CreateAdminCapabilityRequest,
  type CreateTokenRequest,
  type ListTokensRequest,
  type LoginRequest,
  type RevokeTokenRequest,
  JsonWebKeySchema,
  TokenScope,
} from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { actorOf } from "../audit.js";
import { audit } from "../db/queries/audit.js";
import { callerKey, hashSecret, newSecret, requireAdmin, requireUser, type UserCaller } from "../auth.js";
import type { CoordinatorContext } from "../context.js";
import {
  checkId,
  checkText,
  decodePageToken,
  denied,
  durationMs,
  durationOf,
  encodePageToken,
  invalid,
  notFound,
  pageSize,
  uuidv7,
} from "../shared/common.js";
import { dummyHash, verifyPassword } from "./passwords.js";
import { loadToken, loadUser, type TokenRow, tokenMessage, userMessage, type UserRow, userColumns } from "./records.js";

/** How long verifiers may cache GetSigningKeys. */
const KEYS_MAX_AGE_MS = 5 * 60 * 1000;
/** GetSigningKeys re-reads the keys (another replica may have rotated) at most this often. */
const KEYS_REFRESH_MS = 5000;
const ADMIN_CAPABILITY_DEFAULT_MS = 15 * 60 * 1000;
const ADMIN_CAPABILITY_MAX_MS = 24 * 3600 * 1000;

/** created_at::text as PostgreSQL prints it (ISO DateStyle), for keyset page tokens. */
const PG_TIMESTAMP = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,6})?[+-]\d\d(:\d\d)?$/;

const badLogin = () => new ConnectError("wrong name or password", Code.Unauthenticated);

/**
 * AuthService: logins, API tokens (only their sha256 stored), WhoAmI, the
 * capability-token keys and admin capabilities. Every change is audited in
 * its own transaction.
 */
export class AuthServiceImpl implements ServiceImpl<typeof AuthService> {
  /** Failed logins per name in the current window (per replica). */
  private readonly failures = new Map<string, { count: number; since: number }>();
  private keysRefreshedAt = 0;

  constructor(private readonly ctx: CoordinatorContext) {}

  async login(req: LoginRequest) {
    if (req.name === "") throw invalid("name is required");
    if (req.name.length > 256) throw invalid("name must be at most 256 characters");
    if (req.password === "") throw invalid("password is required");
    if (Buffer.byteLength(req.password) > 1024) throw invalid("password must be at most 1024 bytes");
    checkText("description", req.description, 256);
    const ttlMs = this.userTtl(durationMs("ttl", req.ttl));
    const now = this.ctx.clock();
    this.checkLockout(req.name, now);

    const [row] = await this.ctx.sql<{ id: string; password_hash: string | null; disabled: boolean }[]>`
      select id, password_hash, disabled from users where name = ${req.name}`;
    // Unknown users and users without a password cost one scrypt too.
    const ok = await verifyPassword(req.password, row?.password_hash ?? (await dummyHash()));
    if (!row || row.password_hash === null || !ok || row.disabled) {
      this.recordFailure(req.name, now);
      this.ctx.logger.info({ user: req.name.slice(0, 64) }, "login refused");
      throw badLogin();
    }
    this.failures.delete(req.name);
    return this.ctx.sql.begin(async (tx) => {
      const { secret, token } = await this.insertToken(tx, {
        userId: row.id,
        scope: "user",
        description: req.description,
        ttlMs,
      });
      await tx`update users set last_login_at = ${new Date(now)} where id = ${row.id}`;
      await audit(tx, {
        kind: "auth.login",
        actor: `user:${req.name}`,
        userId: row.id,
        message: `${req.name} logged in`,
        details: { tokenId: token.id },
      });
      const user = await loadUser(tx, row.id);
      return { token: secret, info: tokenMessage(token), user };
    });
  }

  async createToken(req: CreateTokenRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const userId = req.userId === "" ? caller.userId : checkId("user_id", req.userId);
    if (userId !== caller.userId && caller.role !== "admin") throw denied("only admins create tokens for other users");
    if (req.scope === TokenScope.SERVICE && caller.role !== "admin") throw denied("only admins create service credentials");
    if (req.scope !== TokenScope.UNSPECIFIED && req.scope !== TokenScope.USER && req.scope !== TokenScope.SERVICE) {
      throw invalid("scope is not a known token scope");
    }
    checkText("description", req.description, 256);
    const scope = req.scope === TokenScope.SERVICE ? "service" : "user";
    const requested = durationMs("ttl", req.ttl);
    const ttlMs =
      scope === "service" ? (requested === undefined ? undefined : Math.min(requested, this.ctx.config.tokenMaxTtlMs)) : this.userTtl(requested);
    return this.ctx.sql.begin(async (tx) => {
      const [user] = await tx`select id, name from users where id = ${userId} for update`;
      if (!user) throw notFound(`user ${userId} not found`);
      const { secret, token } = await this.insertToken(tx, { userId, scope, description: req.description, ttlMs });
      await audit(tx, {
        kind: "token.create",
        actor: actorOf(caller),
        userId,
        message: `${scope} token created for ${user.name as string}`,
        details: { tokenId: token.id, scope, description: req.description },
      });
      return { token: secret, info: tokenMessage(token) };
    });
  }

  async listTokens(req: ListTokensRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const userId = req.userId === "" ? caller.userId : checkId("user_id", req.userId);
    if (userId !== caller.userId && caller.role !== "admin") throw denied("only admins list other users' tokens");
    const size = pageSize(req.pageSize);
    const filters = { userId, inactive: req.includeInactive };
    const after = decodePageToken(req.pageToken, filters, 2);
    if (after && (!PG_TIMESTAMP.test(after[0]) || !/^[0-9a-f-]{36}$/.test(after[1]))) throw invalid("page_token is malformed");
    const sql = this.ctx.sql;
    const [user] = await sql`select id from users where id = ${userId}`;
    if (!user) throw notFound(`user ${userId} not found`);
    const now = new Date(this.ctx.clock());
    const rows = await sql<(TokenRow & { key: string })[]>`
      select id, user_id, scope, name, prefix, created_at, expires_at, last_used_at, revoked_at, created_at::text as key
      from api_tokens
      where user_id = ${userId}
        ${req.includeInactive ? sql`` : sql`and revoked_at is null and (expires_at is null or expires_at > ${now})`}
        ${after ? sql`and (created_at, id) < (${after[0]}::timestamptz, ${after[1]}::uuid)` : sql``}
      order by created_at desc, id desc
      limit ${size + 1}`;
    const page = rows.slice(0, size);
    const last = page.at(-1);
    return {
      tokens: page.map(tokenMessage),
      nextPageToken: rows.length > size && last ? encodePageToken(filters, [last.key, last.id]) : "",
    };
  }

  async revokeToken(req: RevokeTokenRequest, context: HandlerContext) {
    const caller = requireUser(context);
    const tokenId = checkId("token_id", req.tokenId);
    return this.ctx.sql.begin(async (tx) => {
      const token = await loadToken(tx, tokenId);
      if (!token) throw notFound(`token ${tokenId} not found`);
      if (token.user_id !== caller.userId && caller.role !== "admin") throw denied("only admins revoke other users' tokens");
      if (token.revoked_at !== null) return { info: tokenMessage(token) };
      const [row] = await tx<TokenRow[]>`
        update api_tokens set revoked_at = ${new Date(this.ctx.clock())} where id = ${tokenId}
        returning id, user_id, scope, name, prefix, created_at, expires_at, last_used_at, revoked_at`;
      await audit(tx, {
        kind: "token.revoke",
        actor: actorOf(caller),
        userId: token.user_id,
        message: `token ${tokenId} revoked`,
        details: { tokenId, scope: token.scope },
      });
      return { info: tokenMessage(row) };
    });
  }

  async whoAmI(_req: unknown, context: HandlerContext) {
    const caller = context.values.get(callerKey);
    if (caller === undefined) throw new ConnectError("this call needs a credential", Code.Unauthenticated);
    if (caller.kind === "host") return { hostId: caller.hostId };
    const [row] = await this.ctx.sql<UserRow[]>`select ${userColumns(this.ctx.sql)} from users u where u.id = ${caller.userId}`;
    const token = await loadToken(this.ctx.sql, caller.tokenId);
    return { user: row ? userMessage(row) : undefined, token: token ? tokenMessage(token) : undefined };
  }

  async getSigningKeys() {
    const now = this.ctx.clock();
    if (now - this.keysRefreshedAt > KEYS_REFRESH_MS) {
      // Servers verify tokens offline with these keys: while the database is
      // away the keys in memory are still the right answer.
      await this.ctx.keys.refresh().then(
        () => (this.keysRefreshedAt = now),
        (err: unknown) => {
          if (!isDatabaseUnavailable(err)) throw err;
        },
      );
    }
    return {
      issuer: this.ctx.keys.issuer,
      keys: this.ctx.keys.jwks().keys.map((k) =>
        create(JsonWebKeySchema, {
          kid: k.kid ?? "",
          kty: k.kty ?? "",
          crv: k.crv ?? "",
          x: k.x ?? "",
          alg: k.alg ?? "EdDSA",
          use: k.use ?? "sig",
        }),
      ),
      maxAge: durationOf(KEYS_MAX_AGE_MS),
    };
  }

  async createAdminCapability(req: CreateAdminCapabilityRequest, context: HandlerContext) {
    const caller = requireAdmin(context);
    if (req.scope !== CapabilityScope.IMAGE_ADMIN && req.scope !== CapabilityScope.LOG_ADMIN) {
      throw invalid("scope must be CAPABILITY_SCOPE_IMAGE_ADMIN or CAPABILITY_SCOPE_LOG_ADMIN");
    }
    if (req.jobId !== "") {
      // Capability claims (lib/tokens.ts) carry no job for log:admin yet:
      // refuse rather than mint a broader token than asked for.
      if (req.scope === CapabilityScope.IMAGE_ADMIN) throw invalid("job_id applies to CAPABILITY_SCOPE_LOG_ADMIN only");
      checkId("job_id", req.jobId);
      throw invalid("job_id: log:admin tokens restricted to one job are not supported yet; leave it empty");
    }
    const ttlMs = durationMs("ttl", req.ttl) ?? ADMIN_CAPABILITY_DEFAULT_MS;
    if (ttlMs > ADMIN_CAPABILITY_MAX_MS) throw invalid("ttl must be at most 24 hours");
    if (ttlMs < 1000) throw invalid("ttl must be at least 1 second");
    const scope = req.scope === CapabilityScope.IMAGE_ADMIN ? "image:admin" : "log:admin";
    const issuedAt = this.ctx.clock();
    const token = await this.ctx.keys.sign({ scope }, ttlMs, { subject: caller.userId });
    await audit(this.ctx.sql, {
      kind: "capability.admin",
      actor: actorOf(caller),
      userId: caller.userId,
      message: `${scope} capability minted`,
      details: { scope, ttlMs },
    });
    return {
      token: create(CapabilityTokenSchema, {
        token,
        scope: req.scope,
        expireTime: timestampFromMs(Math.floor((issuedAt + ttlMs) / 1000) * 1000),
      }),
    };
  }

  /** A user token's lifetime: the default when unset, capped at the maximum. */
  private userTtl(requested: number | undefined): number {
    return Math.min(requested ?? this.ctx.config.tokenTtlMs, this.ctx.config.tokenMaxTtlMs);
  }

  private checkLockout(name: string, now: number) {
    const entry = this.failures.get(name);
    if (!entry) return;
    if (now - entry.since > this.ctx.config.loginLockoutMs) {
      this.failures.delete(name);
      return;
    }
    if (entry.count >= this.ctx.config.loginMaxFailures) {
      throw new ConnectError("too many failed logins for this name; wait and retry", Code.ResourceExhausted);
    }
  }

  private recordFailure(name: string, now: number) {
    // Bounded: a flood of made-up names must not grow the map without end.
    if (this.failures.size > 10_000) {
      for (const [key, entry] of this.failures) {
        if (now - entry.since > this.ctx.config.loginLockoutMs) this.failures.delete(key);
      }
      if (this.failures.size > 10_000) this.failures.clear();
    }
    const entry = this.failures.get(name);
    if (!entry || now - entry.since > this.ctx.config.loginLockoutMs) this.failures.set(name, { count: 1, since: now });
    else entry.count++;
  }

  /** Inserts a token (checking the per-user limit); returns its secret, shown once. */
  private async insertToken(
    tx: TransactionSql,
    t: { userId: string; scope: "user" | "service"; description: string; ttlMs: number | undefined },
  ): Promise<{ secret: string; token: TokenRow }> {
    const now = this.ctx.clock();
    // The user row lock serialises concurrent token creation for one user.
    await tx`select id from users where id = ${t.userId} for update`;
    const [{ count }] = await tx<{ count: number }[]>`
      select count(*)::int as count from api_tokens
      where user_id = ${t.userId} and revoked_at is null and (expires_at is null or expires_at > ${new Date(now)})`;
    if (count >= this.ctx.config.maxTokensPerUser) {
      throw new ConnectError("too many active tokens for this user; revoke some", Code.ResourceExhausted);
    }
    const secret = newSecret(t.scope === "service" ? "service" : "user");
    const [token] = await tx<TokenRow[]>`
      insert into api_tokens (id, user_id, hash, name, scope, prefix, created_at, expires_at)
      values (${uuidv7(now)}, ${t.userId}, ${hashSecret(secret)}, ${t.description}, ${t.scope}, ${secret.slice(0, 8)},
              ${new Date(now)}, ${t.ttlMs === undefined ? null : new Date(now + t.ttlMs)})
      returning id, user_id, scope, name, prefix, created_at, expires_at, last_used_at, revoked_at`;
    return { secret, token };
  }
}

export type { UserCaller };
