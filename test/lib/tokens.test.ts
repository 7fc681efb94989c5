import { describe, it, expect, beforeAll } from "@jest/globals";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  TokenSigner,
  TokenVerifier,
  bearerToken,
  generateSigningKey,
  publicJwk,
  type Capability,
  type JSONWebKeySet,
  type Requirement,
  type SigningKeyPair,
} from "../../lib/tokens.js";

const ISSUER = "https://coordinator.test";
const DIGEST = `sha256:${"ab".repeat(32)}`;

/** A clock the test moves by hand. */
function manualClock(start = Date.UTC(2030, 0, 1)) {
  let now = start;
  return { now: () => now, advance: (ms: number) => (now += ms) };
}

/** A key source that counts fetches and serves whatever `keys` holds. */
function keySource(keys: JSONWebKeySet) {
  const source = {
    keys,
    fetches: 0,
    fail: false,
    fetch: async () => {
      source.fetches++;
      if (source.fail) throw new Error("coordinator down");
      return structuredClone(source.keys);
    },
  };
  return source;
}

async function rejection(promise: Promise<unknown>): Promise<ConnectError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(ConnectError);
    return err as ConnectError;
  }
  throw new Error("expected a rejection");
}

const logRead = (job: string): Capability => ({ scope: "log:read", job });

describe("capability tokens", () => {
  let key: SigningKeyPair;
  let other: SigningKeyPair;

  beforeAll(async () => {
    key = await generateSigningKey({ kid: "k1" });
    other = await generateSigningKey({ kid: "k2" });
  });

  function setup(options: { audience?: string; minRefetchIntervalMs?: number } = {}) {
    const clock = manualClock();
    const source = keySource({ keys: [key.publicJwk] });
    const verifier = new TokenVerifier({ keys: source.fetch, issuer: ISSUER, clock: clock.now, ...options });
    return { clock, source, verifier };
  }

  it("generates ed25519 jwks whose public half has no private part", async () => {
    expect(key.privateJwk).toMatchObject({ kty: "OKP", crv: "Ed25519", kid: "k1", alg: "EdDSA" });
    expect(typeof key.privateJwk.d).toBe("string");
    expect(key.publicJwk).toEqual({ kty: "OKP", crv: "Ed25519", x: key.privateJwk.x, kid: "k1", alg: "EdDSA", use: "sig" });
    expect(publicJwk(key.privateJwk)).not.toHaveProperty("d");
    const thumbprinted = await generateSigningKey();
    expect(thumbprinted.kid).toMatch(/^[A-Za-z0-9_-]{43}$/);
    // Round trip through JSON, as the coordinator stores it.
    const signer = await TokenSigner.create(JSON.parse(JSON.stringify(key)), { issuer: ISSUER });
    expect(signer.publicJwks()).toEqual({ keys: [key.publicJwk] });
  });

  it("signs and verifies a token for every scope", async () => {
    const { clock, verifier } = setup();
    const signer = await TokenSigner.create(key, { issuer: ISSUER, clock: clock.now });
    const capabilities: Capability[] = [
      { scope: "log:write", job: "j1" },
      { scope: "log:read", job: "j1" },
      { scope: "image:read", digest: DIGEST, holder: "test" },
      { scope: "image:write" },
      { scope: "tunnel:expose", job: "j1" },
      { scope: "tunnel:dial", job: "j1", port: 22 },
      { scope: "service:register" },
    ];
    for (const capability of capabilities) {
      const token = await signer.sign(capability, 60_000, { subject: "host:h1" });
      const verified = await verifier.verify(token, capability);
      expect(verified.capability).toEqual(capability);
      expect(verified).toMatchObject({ subject: "host:h1", issuer: ISSUER, kid: "k1", audience: [] });
      expect(verified.expiresAtMs - verified.issuedAtMs).toBe(60_000);
      expect(verified.id).toMatch(/^[0-9a-f-]{36}$/);
    }
  });

  it("rejects an expired token, allowing a small clock skew", async () => {
    const { clock, verifier } = setup();
    const signer = await TokenSigner.create(key, { issuer: ISSUER, clock: clock.now });
    const token = await signer.sign(logRead("j1"), 60_000, { subject: "u1" });
    clock.advance(60_000 + 29_000);
    await expect(verifier.verify(token, logRead("j1"))).resolves.toBeDefined();
    clock.advance(2_000);
    const err = await rejection(verifier.verify(token, logRead("j1")));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(err.rawMessage).toBe("token expired");
  });

  it("rejects a token issued in the future beyond the skew", async () => {
    const { clock, verifier } = setup();
    const signer = await TokenSigner.create(key, { issuer: ISSUER, clock: () => clock.now() + 120_000 });
    const token = await signer.sign(logRead("j1"), 600_000, { subject: "u1" });
    const err = await rejection(verifier.verify(token, logRead("j1")));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(err.rawMessage).toBe("token not yet valid");
  });

  it("denies a valid token for another scope or resource", async () => {
    const { clock, verifier } = setup();
    const signer = await TokenSigner.create(key, { issuer: ISSUER, clock: clock.now });
    const read = await signer.sign(logRead("j1"), 60_000, { subject: "u1" });
    const dial = await signer.sign({ scope: "tunnel:dial", job: "j1", port: 22 }, 60_000, { subject: "u1" });
    const image = await signer.sign({ scope: "image:read", digest: DIGEST, holder: "test" }, 60_000, { subject: "u1" });
    const cases: Array<[string, Requirement, string]> = [
      [read, { scope: "log:write", job: "j1" }, "token does not grant log:write"],
      [read, logRead("j2"), "token does not grant log:read on job j2"],
      [dial, { scope: "tunnel:dial", job: "j1", port: 2222 }, "token does not grant tunnel:dial on port 2222"],
      [dial, { scope: "tunnel:dial", job: "j2", port: 22 }, "token does not grant tunnel:dial on job j2"],
      [image, { scope: "image:read", digest: `sha256:${"cd".repeat(32)}` }, `token does not grant image:read on sha256:${"cd".repeat(32)}`],
      [image, { scope: "image:write" }, "token does not grant image:write"],
      [image, { scope: "image:read", digest: DIGEST, holder: "other" }, "token does not grant image:read backed by holder other"],
    ];
    for (const [token, required, message] of cases) {
      const err = await rejection(verifier.verify(token, required));
      expect(err.code).toBe(Code.PermissionDenied);
      expect(err.rawMessage).toBe(message);
      expect(err.message).not.toContain(token);
    }
  });

  it("checks the audience when the token names one", async () => {
    const { clock, verifier } = setup({ audience: "log" });
    const signer = await TokenSigner.create(key, { issuer: ISSUER, clock: clock.now });
    const forLog = await signer.sign(logRead("j1"), 60_000, { subject: "u1", audience: "log" });
    const forProxy = await signer.sign(logRead("j1"), 60_000, { subject: "u1", audience: "proxy" });
    const forAny = await signer.sign(logRead("j1"), 60_000, { subject: "u1" });
    await expect(verifier.verify(forLog, logRead("j1"))).resolves.toMatchObject({ audience: ["log"] });
    await expect(verifier.verify(forAny, logRead("j1"))).resolves.toBeDefined();
    expect((await rejection(verifier.verify(forProxy, logRead("j1")))).code).toBe(Code.PermissionDenied);
  });

  it("rejects a token from another issuer", async () => {
    const { clock, verifier } = setup();
    const signer = await TokenSigner.create(key, { issuer: "https://elsewhere.test", clock: clock.now });
    const token = await signer.sign(logRead("j1"), 60_000, { subject: "u1" });
    const err = await rejection(verifier.verify(token, logRead("j1")));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(err.rawMessage).toBe("token from another issuer");
  });

  it("rejects a token signed by another key under the same kid", async () => {
    const { clock, verifier } = setup();
    const impostor = await generateSigningKey({ kid: "k1" });
    const signer = await TokenSigner.create(impostor, { issuer: ISSUER, clock: clock.now });
    const token = await signer.sign(logRead("j1"), 60_000, { subject: "u1" });
    const err = await rejection(verifier.verify(token, logRead("j1")));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(err.rawMessage).toBe("invalid token signature");
  });

  it("rejects tampered, malformed and missing tokens without echoing them", async () => {
    const { clock, verifier } = setup();
    const signer = await TokenSigner.create(key, { issuer: ISSUER, clock: clock.now });
    const token = await signer.sign(logRead("j1"), 60_000, { subject: "u1" });
    const [header, payload, signature] = token.split(".");
    const claims = JSON.parse(Buffer.from(payload, "base64url").toString());
    const forged = Buffer.from(JSON.stringify({ ...claims, job: "j2" })).toString("base64url");
    const tampered = `${header}.${forged}.${signature}`;
    const err = await rejection(verifier.verify(tampered, logRead("j2")));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(err.rawMessage).toBe("invalid token signature");
    expect(err.message).not.toContain(tampered);

    const noneAlg = `${Buffer.from(JSON.stringify({ alg: "none", kid: "k1" })).toString("base64url")}.${payload}.`;
    for (const bad of ["garbage", "a.b.c", noneAlg, `${header}.${payload}`]) {
      const e = await rejection(verifier.verify(bad, logRead("j1")));
      expect(e.code).toBe(Code.Unauthenticated);
      expect(e.rawMessage).toBe("malformed token");
    }
    for (const missing of [undefined, ""]) {
      const e = await rejection(verifier.verify(missing, logRead("j1")));
      expect(e.code).toBe(Code.Unauthenticated);
      expect(e.rawMessage).toBe("missing token");
    }
  });

  it("refetches the keys once for an unknown kid, rate-limited", async () => {
    const { clock, source, verifier } = setup({ minRefetchIntervalMs: 5_000 });
    const signer = await TokenSigner.create(key, { issuer: ISSUER, clock: clock.now });
    const rotated = await TokenSigner.create(other, { issuer: ISSUER, clock: clock.now });
    await verifier.verify(await signer.sign(logRead("j1"), 60_000, { subject: "u1" }), logRead("j1"));
    expect(source.fetches).toBe(1);

    // The coordinator rotates: k2 appears in its key set.
    clock.advance(5_000);
    source.keys = { keys: [key.publicJwk, other.publicJwk] };
    const fresh = await rotated.sign(logRead("j1"), 60_000, { subject: "u1" });
    await expect(verifier.verify(fresh, logRead("j1"))).resolves.toMatchObject({ kid: "k2" });
    expect(source.fetches).toBe(2);
    await verifier.verify(fresh, logRead("j1"));
    expect(source.fetches).toBe(2);

    // A flood of tokens naming unknown kids costs at most one fetch per interval.
    const strangers = await Promise.all(
      ["x1", "x2", "x3"].map(async (kid) =>
        (await TokenSigner.create(await generateSigningKey({ kid }), { issuer: ISSUER, clock: clock.now })).sign(
          logRead("j1"),
          60_000,
          { subject: "u1" },
        ),
      ),
    );
    clock.advance(5_000);
    const results = await Promise.all(
      Array.from({ length: 30 }, (_, i) => rejection(verifier.verify(strangers[i % 3], logRead("j1")))),
    );
    for (const err of results) {
      expect(err.code).toBe(Code.Unauthenticated);
      expect(err.rawMessage).toBe("unknown signing key");
    }
    expect(source.fetches).toBe(3);
    await rejection(verifier.verify(strangers[0], logRead("j1")));
    expect(source.fetches).toBe(3);
    clock.advance(5_000);
    await rejection(verifier.verify(strangers[0], logRead("j1")));
    expect(source.fetches).toBe(4);
  });

  it("drops keys the coordinator no longer publishes once the cache is old", async () => {
    const clock = manualClock();
    const source = keySource({ keys: [key.publicJwk] });
    const verifier = new TokenVerifier({ keys: source.fetch, clock: clock.now, maxKeyAgeMs: 60_000 });
    const signer = await TokenSigner.create(key, { issuer: ISSUER, clock: clock.now });
    const token = await signer.sign(logRead("j1"), 600_000, { subject: "u1" });
    await verifier.verify(token, logRead("j1"));
    source.keys = { keys: [other.publicJwk] };
    clock.advance(30_000);
    await verifier.verify(token, logRead("j1"));
    clock.advance(31_000);
    expect((await rejection(verifier.verify(token, logRead("j1")))).rawMessage).toBe("unknown signing key");
  });

  it("answers Unavailable when the keys cannot be fetched and the kid is unknown", async () => {
    const { clock, source, verifier } = setup();
    const signer = await TokenSigner.create(key, { issuer: ISSUER, clock: clock.now });
    source.fail = true;
    const err = await rejection(verifier.verify(await signer.sign(logRead("j1"), 60_000, { subject: "u1" }), logRead("j1")));
    expect(err.code).toBe(Code.Unavailable);
    source.fail = false;
    clock.advance(5_000);
    await expect(verifier.verify(await signer.sign(logRead("j1"), 60_000, { subject: "u1" }), logRead("j1"))).resolves.toBeDefined();
  });

  it("refuses to sign malformed capabilities", async () => {
    const signer = await TokenSigner.create(key, { issuer: ISSUER });
    await expect(signer.sign({ scope: "image:read", digest: "md5:x", holder: "test" }, 60_000, { subject: "u" })).rejects.toThrow();
    await expect(signer.sign({ scope: "image:read", digest: DIGEST, holder: "" }, 60_000, { subject: "u" })).rejects.toThrow();
    await expect(signer.sign({ scope: "tunnel:dial", job: "j", port: 0 }, 60_000, { subject: "u" })).rejects.toThrow();
    await expect(signer.sign(logRead(""), 60_000, { subject: "u" })).rejects.toThrow();
    await expect(signer.sign(logRead("j"), 10, { subject: "u" })).rejects.toThrow(RangeError);
  });
});

describe("bearerToken", () => {
  it("reads the token of an authorization bearer header", () => {
    expect(bearerToken(new Headers({ authorization: "Bearer abc.def.ghi" }))).toBe("abc.def.ghi");
    expect(bearerToken(new Headers({ Authorization: "bearer   xyz " }))).toBe("xyz");
    expect(bearerToken(new Headers({ authorization: "Basic dXNlcjpwdw==" }))).toBeUndefined();
    expect(bearerToken(new Headers({ authorization: "Bearer" }))).toBeUndefined();
    expect(bearerToken(new Headers())).toBeUndefined();
  });
});
