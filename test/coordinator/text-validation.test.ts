/**
 * Text that PostgreSQL cannot store never reaches it (issue #17): a NUL in
 * any text field of any coordinator RPC (nested messages, lists, map keys
 * and values, oneof members), and a lone UTF-16 surrogate sent as Connect
 * JSON (no UTF-8 encoding), answer InvalidArgument naming the field, never
 * Internal. Driven from
 * the service descriptors, so new RPCs and fields are covered; over Connect
 * and gRPC (which reaches the hand-framed Attach).
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { ScalarType, create, type DescField, type DescMessage, type DescMethod } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { Http2SessionManager, createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { AuthService } from "../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { coordinatorServices } from "../../coordinator/routes.js";
import { startTestCoordinator, type TestCoordinator } from "../support/coordinator.js";

const BAD = "a\u0000b";
/** Deep enough for every request of the contract; recursive types (Struct) stop here. */
const MAX_DEPTH = 5;

/** One text field of a request, reached by `path` (proto names), and a request whose only text there is BAD. */
interface Case {
  path: string;
  init: Record<string, unknown>;
}

/** Every way to put BAD in a text field of `schema`, as request inits (localName keys, oneofs as {case, value}). */
function textCases(schema: DescMessage, depth = 0): Case[] {
  if (depth > MAX_DEPTH) return [];
  const cases: Case[] = [];
  for (const field of schema.fields) {
    const wrap = (path: string, value: unknown): Case => ({ path: field.name + path, init: place(field, value) });
    switch (field.fieldKind) {
      case "scalar":
        if (field.scalar === ScalarType.STRING) cases.push(wrap("", BAD));
        break;
      case "message":
        for (const inner of textCases(field.message, depth + 1)) cases.push(wrap(`.${inner.path}`, inner.init));
        break;
      case "list":
        if (field.listKind === "scalar" && field.scalar === ScalarType.STRING) cases.push(wrap("[0]", [BAD]));
        if (field.listKind === "message") {
          for (const inner of textCases(field.message, depth + 1)) cases.push(wrap(`[0].${inner.path}`, [inner.init]));
        }
        break;
      case "map": {
        if (field.mapKey === ScalarType.STRING) {
          const value = field.mapKind === "message" ? {} : field.mapKind === "enum" ? 0 : field.scalar === ScalarType.STRING ? "v" : defaultScalar(field.scalar);
          cases.push(wrap(" key", { [BAD]: value }));
        }
        const key = field.mapKey === ScalarType.STRING ? "k" : "1";
        if (field.mapKind === "scalar" && field.scalar === ScalarType.STRING) cases.push(wrap(`["${key}"]`, { [key]: BAD }));
        if (field.mapKind === "message") {
          for (const inner of textCases(field.message, depth + 1)) cases.push(wrap(`["${key}"].${inner.path}`, { [key]: inner.init }));
        }
        break;
      }
      case "enum":
        break;
    }
  }
  return cases;
}

/** An init that sets `field` to `value` (through its oneof when it has one). */
function place(field: DescField, value: unknown): Record<string, unknown> {
  return field.oneof ? { [field.oneof.localName]: { case: field.localName, value } } : { [field.localName]: value };
}

function defaultScalar(type: ScalarType): unknown {
  if (type === ScalarType.BOOL) return false;
  if (type === ScalarType.BYTES) return new Uint8Array();
  if ([ScalarType.INT64, ScalarType.UINT64, ScalarType.SINT64, ScalarType.FIXED64, ScalarType.SFIXED64].includes(type)) return 0n;
  return 0;
}

describe("text fields of every coordinator rpc", () => {
  let c: TestCoordinator;
  let tokens: Record<string, string | undefined>;
  const sessions: Http2SessionManager[] = [];

  beforeAll(async () => {
    c = await startTestCoordinator();
    const admin = (await c.createUser({ role: "admin" })).token;
    const service = await c.createServiceToken(admin);
    const host = (await c.createHost()).credential;
    tokens = {
      "treadmill.coordinator.v1.SupervisorService": host,
      "treadmill.coordinator.v1.RegistryService": service,
      "/treadmill.coordinator.v1.AuthService/Login": undefined,
      "/treadmill.coordinator.v1.AuthService/GetSigningKeys": undefined,
      default: admin,
    };
  });
  afterAll(async () => {
    for (const s of sessions) s.abort();
    await c?.stop();
  });

  /** The token a call of `method` is made with: one the procedure takes, so the check of its text is what answers. */
  const tokenFor = (method: DescMethod): string | undefined => {
    const procedure = `/${method.parent.typeName}/${method.name}`;
    if (procedure in tokens) return tokens[procedure];
    return tokens[method.parent.typeName] ?? tokens.default;
  };

  async function call(method: DescMethod, init: Record<string, unknown>, protocol: "connect" | "grpc"): Promise<ConnectError | undefined> {
    const sessionManager = new Http2SessionManager(c.url);
    sessions.push(sessionManager);
    const transport =
      protocol === "grpc"
        ? createGrpcTransport({ baseUrl: c.url, sessionManager })
        : createConnectTransport({ baseUrl: c.url, httpVersion: "2", sessionManager });
    const client = createClient(method.parent, transport) as unknown as Record<string, (r: unknown, o: unknown) => unknown>;
    const token = tokenFor(method);
    const options = { timeoutMs: 10_000, headers: token === undefined ? {} : { authorization: `Bearer ${token}` } };
    const request = create(method.input, init);
    try {
      if (method.methodKind === "unary") {
        await client[method.localName](request, options);
      } else {
        const input = method.methodKind === "bidi_streaming" ? (async function* () { yield request; })() : request;
        for await (const _ of client[method.localName](input, options) as AsyncIterable<unknown>) break;
      }
      return undefined;
    } catch (err) {
      return ConnectError.from(err);
    } finally {
      sessionManager.abort();
    }
  }

  it("finds the text fields of every rpc's request in the descriptors", () => {
    const methods = coordinatorServices.flatMap((s) => s.methods);
    expect(methods.length).toBeGreaterThan(40);
    expect(methods.flatMap((m) => textCases(m.input)).length).toBeGreaterThan(100);
  });

  it("answers InvalidArgument naming the field to a nul byte in any text field, over connect and grpc", async () => {
    const wrong: string[] = [];
    for (const service of coordinatorServices) {
      for (const method of service.methods) {
        for (const { path, init } of textCases(method.input)) {
          for (const protocol of ["connect", "grpc"] as const) {
            const err = await call(method, init, protocol);
            const expected = `${path} must not contain a nul character`;
            if (err?.code !== Code.InvalidArgument || err.rawMessage !== expected) {
              wrong.push(`${service.name}.${method.name} ${path} over ${protocol}: ${err ? `${Code[err.code]} ${err.rawMessage}` : "OK"}`);
            }
          }
        }
      }
    }
    expect(wrong).toEqual([]);
  }, 300_000);

  it("answers InvalidArgument, not Internal, to a login whose name holds a nul byte", async () => {
    for (const protocol of ["connect", "grpc"] as const) {
      const err = await call(AuthService.method.login, { name: "adm\u0000in", password: "long-enough-pw" }, protocol);
      expect([err && Code[err.code], err?.rawMessage]).toEqual(["InvalidArgument", "name must not contain a nul character"]);
    }
  });

  it("answers InvalidArgument to a lone surrogate sent as connect json", async () => {
    const response = await fetch(`${c.url}/treadmill.coordinator.v1.AuthService/Login`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: '{"name":"\\ud800admin","password":"long-enough-pw"}',
    });
    const body = (await response.json()) as { code: string; message: string };
    // The runtime's JSON decoder refuses it before any interceptor runs.
    expect(body.code).toBe("invalid_argument");
    expect(body.message).toContain("LoginRequest.name");
  });

  it("still logs a user in whose name and password are ordinary text", async () => {
    const err = await call(AuthService.method.login, { name: "nobody", password: "long-enough-pw" }, "connect");
    expect(err?.code).toBe(Code.Unauthenticated);
  });
});
