import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import { CapabilityScope } from "../../gen/treadmill/common/v1/capability_pb.js";
import { AuthService, TokenScope } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { HostService } from "../../gen/treadmill/coordinator/v1/host_service_pb.js";
import { UserService } from "../../gen/treadmill/coordinator/v1/user_service_pb.js";
import { Role } from "../../gen/treadmill/coordinator/v1/user_pb.js";
import { bootstrapAdmin } from "../../coordinator/bootstrap.js";
import { SigningKeys } from "../../coordinator/signing.js";
import { coordinatorTransport, coordinatorKeySource } from "../../lib/coordinator-client.js";
import { silentLogger } from "../../lib/logger.js";
import { TokenVerifier } from "../../lib/tokens.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";
import { codeOf } from "../support/codes.js";


describe("AuthService", () => {
  let c: TestCoordinator;
  let admin: { id: string; token: string };
  beforeAll(async () => {
    c = await startTestCoordinator({ config: { loginMaxFailures: 3 } });
    admin = await c.createUser({ role: "admin" });
  });
  afterAll(async () => {
    await c?.stop();
  });

  const createUser = async (name: string, password = "correct horse battery") =>
    (await c.client(UserService, admin.token).createUser({ name, password, role: Role.USER })).user!;

  it("logs in with the right password, records the login, and the token works", async () => {
    const user = await createUser("login-ok");
    const auth = c.client(AuthService);
    const res = await auth.login({ name: "login-ok", password: "correct horse battery", description: "laptop" });
    expect(res.token).toMatch(/^tmu_/);
    expect(res.user?.id).toBe(user.id);
    expect(res.user?.lastLoginTime).toBeDefined();
    expect(res.info?.description).toBe("laptop");
    expect(res.info?.prefix).toBe(res.token.slice(0, 8));
    // The default lifetime (30 days) applies.
    const ttl = Number(res.info!.expireTime!.seconds - res.info!.createTime!.seconds);
    expect(ttl).toBe(30 * 24 * 3600);
    const me = await c.client(AuthService, res.token).whoAmI({});
    expect(me.user?.name).toBe("login-ok");
    expect(me.token?.id).toBe(res.info?.id);
    // Only the hash is stored, and the password hash is scrypt.
    const [row] = await c.sql`select password_hash from users where id = ${user.id}`;
    expect(row.password_hash).toMatch(/^\$scrypt\$ln=15,r=8,p=1\$/);
    const tokens = await c.sql`select hash from api_tokens where id = ${res.info!.id}`;
    expect(Buffer.from(tokens[0].hash).toString("utf8")).not.toContain(res.token);
    const events = await c.sql`select kind, actor from audit_events where user_id = ${user.id} order by id`;
    expect(events.map((e) => e.kind)).toEqual(["user.create", "auth.login"]);
  });

  it("refuses a wrong password, an unknown user and a disabled user alike, then rate-limits the name", async () => {
    await createUser("login-bad");
    const auth = c.client(AuthService);
    const wrong = await auth.login({ name: "login-bad", password: "not the password" }).catch((e) => ConnectError.from(e));
    const unknown = await auth.login({ name: "nobody-here", password: "whatever it is" }).catch((e) => ConnectError.from(e));
    expect(wrong).toBeInstanceOf(ConnectError);
    expect((wrong as ConnectError).code).toBe(Code.Unauthenticated);
    expect((unknown as ConnectError).code).toBe(Code.Unauthenticated);
    expect((wrong as ConnectError).rawMessage).toBe((unknown as ConnectError).rawMessage);
    await createUser("login-disabled");
    await c.sql`update users set disabled = true where name = 'login-disabled'`;
    expect(await codeOf(auth.login({ name: "login-disabled", password: "correct horse battery" }))).toBe("Unauthenticated");
    // Three failures (loginMaxFailures) lock the name, even for the right password.
    await codeOf(auth.login({ name: "login-bad", password: "wrong again!" }));
    await codeOf(auth.login({ name: "login-bad", password: "wrong again!" }));
    expect(await codeOf(auth.login({ name: "login-bad", password: "correct horse battery" }))).toBe("ResourceExhausted");
  });

  it("creates, lists (with last use, paged) and revokes tokens", async () => {
    const user = await createUser("tokens-user");
    const { token } = await c.client(AuthService).login({ name: "tokens-user", password: "correct horse battery" });
    const auth = c.client(AuthService, token);
    const created: { token: string; info?: { id: string } }[] = [];
    for (let i = 0; i < 3; i++) created.push(await auth.createToken({ description: `t${i}`, ttl: { seconds: 3600n, nanos: 0 } }));
    // A ttl over the maximum is capped.
    const long = await auth.createToken({ ttl: { seconds: BigInt(10 * 365 * 24 * 3600), nanos: 0 } });
    expect(Number(long.info!.expireTime!.seconds - long.info!.createTime!.seconds)).toBe(365 * 24 * 3600);
    await c.client(AuthService, created[0].token).whoAmI({});

    const first = await auth.listTokens({ pageSize: 2 });
    expect(first.tokens).toHaveLength(2);
    expect(first.nextPageToken).not.toBe("");
    const all = [...first.tokens];
    for (let next = first.nextPageToken; next !== ""; ) {
      const page = await auth.listTokens({ pageSize: 2, pageToken: next });
      all.push(...page.tokens);
      next = page.nextPageToken;
    }
    expect(all).toHaveLength(5);
    expect(new Set(all.map((t) => t.id)).size).toBe(5);
    expect(all.every((t) => t.userId === user.id)).toBe(true);
    expect(all.find((t) => t.id === created[0].info!.id)?.lastUseTime).toBeDefined();
    expect(all.find((t) => t.id === created[1].info!.id)?.lastUseTime).toBeUndefined();
    // The page token is bound to its filters.
    expect(await codeOf(auth.listTokens({ pageSize: 2, pageToken: first.nextPageToken, includeInactive: true }))).toBe("InvalidArgument");

    const revoked = await auth.revokeToken({ tokenId: created[1].info!.id });
    expect(revoked.info?.revokeTime).toBeDefined();
    expect(await codeOf(auth.revokeToken({ tokenId: created[1].info!.id }))).toBe("OK");
    expect(await codeOf(c.client(AuthService, created[1].token).whoAmI({}))).toBe("Unauthenticated");
    expect((await auth.listTokens({})).tokens.map((t) => t.id)).not.toContain(created[1].info!.id);
    expect((await auth.listTokens({ includeInactive: true })).tokens.map((t) => t.id)).toContain(created[1].info!.id);
    const kinds = await c.sql`select kind from audit_events where user_id = ${user.id} and kind like 'token.%'`;
    expect(kinds.filter((k) => k.kind === "token.create")).toHaveLength(4);
    expect(kinds.filter((k) => k.kind === "token.revoke")).toHaveLength(1);
  });

  it("lets an admin make a service credential that only RegistryService accepts", async () => {
    const auth = c.client(AuthService, admin.token);
    const svc = await auth.createToken({ scope: TokenScope.SERVICE, description: "log server lab-a" });
    expect(svc.token).toMatch(/^tms_/);
    expect(svc.info?.expireTime).toBeUndefined();
    expect(await codeOf(c.client(HostService, svc.token).listHosts({}))).toBe("PermissionDenied");
    const me = await c.client(AuthService, svc.token).whoAmI({});
    expect(me.token?.scope).toBe(TokenScope.SERVICE);
  });

  it("publishes the signing keys with the issuer, and a rotated key by its kid", async () => {
    const auth = c.client(AuthService);
    const before = await auth.getSigningKeys({});
    expect(before.issuer).toBe("treadmill-coordinator");
    expect(before.keys.length).toBeGreaterThan(0);
    expect(before.keys[0]).toMatchObject({ kty: "OKP", crv: "Ed25519", alg: "EdDSA", use: "sig" });
    expect(JSON.stringify(before.keys)).not.toContain('"d"');

    // An admin capability verifies against the published keys.
    const cap = await c.client(AuthService, admin.token).createAdminCapability({ scope: CapabilityScope.IMAGE_ADMIN });
    const verifier = new TokenVerifier({ keys: coordinatorKeySource(coordinatorTransport(c.url)), issuer: before.issuer, audience: "image" });
    const verified = await verifier.verify(cap.token!.token, { scope: "image:admin" });
    expect(verified.subject).toBe(admin.id);

    // Another replica rotates: the new kid is published next to the old one.
    const other = await SigningKeys.load(c.sql, { issuer: "treadmill-coordinator", logger: silentLogger() });
    const kid = await other.rotate();
    const deadline = Date.now() + 30_000;
    let kids: string[] = [];
    while (!kids.includes(kid)) {
      if (Date.now() > deadline) throw new Error("rotated key never published");
      kids = (await auth.getSigningKeys({})).keys.map((k) => k.kid);
      if (!kids.includes(kid)) await new Promise((r) => setTimeout(r, 250));
    }
    expect(kids).toEqual(expect.arrayContaining([before.keys[0].kid, kid]));
  });

  it("mints admin capabilities for admins only, with bounded lifetimes", async () => {
    const user = await c.createUser();
    expect(await codeOf(c.client(AuthService, user.token).createAdminCapability({ scope: CapabilityScope.LOG_ADMIN }))).toBe(
      "PermissionDenied",
    );
    const auth = c.client(AuthService, admin.token);
    const log = await auth.createAdminCapability({ scope: CapabilityScope.LOG_ADMIN, ttl: { seconds: 60n, nanos: 0 } });
    expect(log.token?.scope).toBe(CapabilityScope.LOG_ADMIN);
    expect(await codeOf(auth.createAdminCapability({ scope: CapabilityScope.IMAGE_WRITE }))).toBe("InvalidArgument");
    expect(await codeOf(auth.createAdminCapability({ scope: CapabilityScope.LOG_ADMIN, ttl: { seconds: 90_000n, nanos: 0 } }))).toBe(
      "InvalidArgument",
    );
  });
});

describe("the first admin", () => {
  it("is created once with a printed random password when there is no user, and can log in", async () => {
    const c = await startTestCoordinator();
    try {
      // The coordinator's own start ran the bootstrap on the empty database
      // (quietly: the test logger is silent). Run it again as a second replica
      // would, on a database without users.
      const [bootstrapped] = await c.sql`select name, role from users where name = 'admin'`;
      expect(bootstrapped).toEqual({ name: "admin", role: "admin" });
      await c.sql`delete from users`;
      const printed: string[] = [];
      const ctx = {
        sql: c.sql,
        logger: silentLogger(),
        config: { ...(await import("../../coordinator/config.js")).loadCoordinatorConfig({ env: {}, argv: [] }), adminName: "root" },
        clock: Date.now,
        keys: undefined as never,
        notifications: undefined as never,
        databaseUrl: "",
        replicaId: "test",
      };
      const results = await Promise.all([
        bootstrapAdmin(ctx, { announce: (t) => printed.push(t) }),
        bootstrapAdmin(ctx, { announce: (t) => printed.push(t) }),
      ]);
      expect(results.filter((r) => r.created)).toHaveLength(1);
      expect(printed).toHaveLength(1);
      const password = results.find((r) => r.generatedPassword)!.generatedPassword!;
      expect(password.length).toBeGreaterThanOrEqual(20);
      expect(printed[0]).toContain(password);
      const res = await c.client(AuthService).login({ name: "root", password });
      expect(res.user?.role).toBe(Role.ADMIN);
      // A later start does nothing.
      expect(await bootstrapAdmin(ctx, { announce: (t) => printed.push(t) })).toEqual({});
      expect(printed).toHaveLength(1);
    } finally {
      await c.stop();
    }
  });

  it("takes the configured name and password, never printing it", async () => {
    const c = await startTestCoordinator({ config: { adminName: "boss", adminPassword: "configured-secret-1" } });
    try {
      const res = await c.client(AuthService).login({ name: "boss", password: "configured-secret-1" });
      expect(res.user?.role).toBe(Role.ADMIN);
      const [event] = await c.sql`select details from audit_events where kind = 'user.bootstrap'`;
      expect(JSON.stringify(event.details)).not.toContain("configured-secret-1");
    } finally {
      await c.stop();
    }
  });
});
