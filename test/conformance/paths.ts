// The three paths a hot RPC is served on (lib/grpc/server.ts): Connect and
// gRPC-Web through the Connect adapter, plain gRPC through the raw route
// adapter. The conformance tests run each call over all three and compare
// what the caller sees.
import { expect } from "@jest/globals";
import { Code, ConnectError, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import type { DescService } from "@bufbuild/protobuf";
import { Http2SessionManager, createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";

export type PathName = "connect" | "grpc-web" | "grpc";

/** A client of one service on each path. */
export type Clients<S extends DescService> = Record<PathName, Client<S>>;

export interface Paths {
  /** A client of `service` on each path. */
  clients<S extends DescService>(service: S): Clients<S>;
  close(): void;
}

/**
 * What the last call said in `grpc-accept-encoding`: the raw path answers
 * `identity` (it refuses compression); the Connect adapter names nothing for
 * these procedures (served uncompressed), so a plain gRPC call that got
 * `identity` went through the raw path.
 */
let lastAcceptEncoding: string | null = null;

const recordAcceptEncoding: Interceptor = (next) => async (request) => {
  lastAcceptEncoding = null;
  try {
    const response = await next(request);
    lastAcceptEncoding = response.header.get("grpc-accept-encoding");
    return response;
  } catch (err) {
    lastAcceptEncoding = ConnectError.from(err).metadata.get("grpc-accept-encoding");
    throw err;
  }
};

/** Clients over HTTP/2 (bidirectional streams need it on every protocol). */
export function threePaths(baseUrl: string): Paths {
  const sessions = new Http2SessionManager(baseUrl);
  const interceptors = [recordAcceptEncoding];
  const transports: Record<PathName, Transport> = {
    connect: createConnectTransport({ baseUrl, httpVersion: "2", sessionManager: sessions, interceptors }),
    "grpc-web": createGrpcWebTransport({ baseUrl, httpVersion: "2", sessionManager: sessions, interceptors }),
    grpc: createGrpcTransport({ baseUrl, sessionManager: sessions, interceptors }),
  };
  return {
    clients: (service) => ({
      connect: createClient(service, transports.connect),
      "grpc-web": createClient(service, transports["grpc-web"]),
      grpc: createClient(service, transports.grpc),
    }),
    close: () => sessions.abort(),
  };
}

/** What a caller saw: the answer, or the error's code and message. */
export type Outcome = { answer: unknown } | { code: string; message: string };

export async function outcome(call: () => Promise<unknown>): Promise<Outcome> {
  try {
    return { answer: await call() };
  } catch (err) {
    const e = ConnectError.from(err);
    return { code: Code[e.code], message: e.rawMessage };
  }
}

/**
 * Runs `call` on each path, expects the same outcome on all three, and
 * returns it (for the test to say what it must be).
 */
export async function sameOnAllPaths(call: (path: PathName) => Promise<unknown>): Promise<Outcome> {
  const seen: Partial<Record<PathName, Outcome>> = {};
  const served: Partial<Record<PathName, string | null>> = {};
  for (const path of ["connect", "grpc-web", "grpc"] as const) {
    seen[path] = await outcome(() => call(path));
    served[path] = lastAcceptEncoding;
  }
  // The adapter served the first two, the raw path the third.
  expect(served).toEqual({ connect: null, "grpc-web": null, grpc: "identity" });
  expect(seen["grpc-web"]).toEqual(seen.connect);
  expect(seen.grpc).toEqual(seen.connect);
  return seen.connect!;
}

/** The messages of a response stream. */
export async function collect<T>(stream: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const m of stream) out.push(m);
  return out;
}

/** An async iterable of the given messages (a request stream). */
export async function* stream<T>(...messages: T[]): AsyncGenerator<T> {
  yield* messages;
}

export const bearer = (token: string) => ({ headers: { authorization: `Bearer ${token}` } });

/** The credentials every refusal test tries: none, one that is not a token, one of the wrong kind. */
export function refusals(wrongKind: string): { name: string; options: { headers?: Record<string, string> } }[] {
  return [
    { name: "no token", options: {} },
    { name: "malformed", options: bearer("not-a-token") },
    { name: "wrong kind", options: bearer(wrongKind) },
  ];
}
