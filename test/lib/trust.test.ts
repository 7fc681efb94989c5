/**
 * lib/grpc/trust.ts on real TLS sockets: a `--ca-file` is loaded (or refused
 * at start, naming the flag), its CA verifies servers on the Connect path and
 * on the raw gRPC path, and a certificate Node refuses comes back as an
 * error that names the server, the certificate and what to do.
 */
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { EchoRequestSchema, EchoService } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import { ConfigError } from "../../lib/config.js";
import { connectHttp2, openRawCall } from "../../lib/grpc/client.js";
import { clientTransport } from "../../lib/grpc/transport.js";
import { PUBLIC_ROOTS, loadClientTls, type ClientTls } from "../../lib/grpc/trust.js";
import { frame } from "../../lib/grpc/wire.js";
import type { Server } from "../../lib/server.js";
import { startEchoServer } from "../support/echo-service.js";
import { createTestCertificate } from "../support/tls.js";

let dir: string;
let caFile: string;
let server: Server;
/** A server whose certificate names another host than the one dialled. */
let misnamed: Server;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "treadmill-trust-"));
  const certificate = await createTestCertificate();
  caFile = join(dir, "ca.pem");
  await writeFile(caFile, certificate.cert);
  server = await startEchoServer({ tls: certificate });
  const other = await createTestCertificate("DNS:elsewhere.example");
  await writeFile(join(dir, "other.pem"), other.cert);
  misnamed = await startEchoServer({ tls: other });
});

afterAll(async () => {
  await server?.stop();
  await misnamed?.stop();
  await rm(dir, { recursive: true, force: true });
});

/** Echo over a Connect transport verifying with `tls`. */
async function echoConnect(url: string, tls: ClientTls): Promise<string> {
  return (await createClient(EchoService, clientTransport({ baseUrl: url, tls })).echo({ text: "connect" })).text;
}

/** Echo over a raw call on a connection of connectHttp2 verifying with `tls`: the echoed bytes' length. */
async function echoRaw(url: string, tls: ClientTls): Promise<number> {
  const session = connectHttp2(url, tls);
  try {
    const call = openRawCall(session, `/${EchoService.typeName}/Echo`, {}, { maxMessageBytes: 1024 });
    call.write(frame(toBinary(EchoRequestSchema, create(EchoRequestSchema, { text: "raw" }))));
    call.end();
    let bytes = 0;
    for await (const message of call.messages()) bytes += message.length;
    return bytes;
  } finally {
    session.destroy();
  }
}

/**
 * The ConnectError `promise` rejects with. (Under jest's module sandbox Node's
 * errors are not `instanceof Error`, so Connect prefixes their name and code
 * to the message: the tests look for the message within.)
 */
async function failure(promise: Promise<unknown>): Promise<ConnectError> {
  try {
    await promise;
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("it did not fail");
}

describe("a client's trust from --ca-file", () => {
  it("verifies a server of the CA on the Connect path and on the raw path", async () => {
    const trust = loadClientTls(caFile);
    expect(await echoConnect(server.address().url, trust)).toBe("connect");
    expect(await echoRaw(server.address().url, trust)).toBeGreaterThan(0);
  });

  it("refuses a server it does not trust, naming the server, the certificate and --ca-file", async () => {
    const { host } = new URL(server.address().url);
    const message =
      `the server at ${host} presented a certificate "CN=localhost" issued by "CN=localhost" that this machine ` +
      "does not trust (self-signed certificate): give the CA that signed it with --ca-file (docs/tls.md)";
    expect((await failure(echoConnect(server.address().url, PUBLIC_ROOTS))).rawMessage).toContain(message);
    const raw = await failure(echoRaw(server.address().url, PUBLIC_ROOTS));
    expect({ code: raw.code, message: raw.rawMessage }).toEqual({ code: Code.Unavailable, message });
  });

  it("refuses a trusted certificate that does not name the host dialled, and says to reissue it", async () => {
    const trust = loadClientTls(join(dir, "other.pem"));
    const error = await failure(echoConnect(misnamed.address().url, trust));
    expect(error.rawMessage).toContain(
      `the server at ${new URL(misnamed.address().url).host} presented a certificate "CN=localhost" issued by "CN=localhost" ` +
        "whose names (DNS:elsewhere.example) do not include the one dialled: reissue it with that name in its subjectAltName (docs/tls.md)",
    );
  });

  it("stops a component at start when the file is missing, holds no PEM certificate, or a broken one", async () => {
    const problem = (path: string) => {
      try {
        loadClientTls(path);
      } catch (err) {
        expect(err).toBeInstanceOf(ConfigError);
        return (err as ConfigError).message;
      }
      throw new Error(`${path} was accepted`);
    };
    expect(loadClientTls("")).toBe(PUBLIC_ROOTS);
    expect(problem(join(dir, "nope.pem"))).toBe(`--ca-file ${join(dir, "nope.pem")} cannot be read (ENOENT)`);
    await writeFile(join(dir, "key.pem"), "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n");
    expect(problem(join(dir, "key.pem"))).toBe(`--ca-file ${join(dir, "key.pem")} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`);
    await writeFile(join(dir, "broken.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    expect(problem(join(dir, "broken.pem"))).toMatch(new RegExp(`^--ca-file ${join(dir, "broken.pem")} holds a certificate that does not parse \\(.+\\)$`));
  });
});
