// Shared set-up of the proxy tests: keys and tokens, a proxy on port 0, a TCP
// echo server as the job's "host-local port", exposers and clients.
import net from "node:net";
import { silentLogger } from "../../lib/logger.js";
import { loadProxyConfig, type ProxyConfig } from "../../proxy/config.js";
import { createProxy, type Proxy } from "../../proxy/proxy.js";
import { startExposer, type Exposer, type ExposerOptions } from "../../supervisor/exposer.js";
import type { Exposure } from "../../supervisor/drivers/driver.js";
import { makeKeys as makeTestKeys, type Keys } from "../support/keys.js";

export type { Keys };

/** Keys whose tokens are addressed to the proxy. */
export const makeKeys = (): Promise<Keys> => makeTestKeys({ audience: "proxy" });

/** A proxy in this process on port 0. */
export async function startProxy(keys: Keys, overrides: Partial<ProxyConfig> = {}): Promise<Proxy> {
  const config: ProxyConfig = {
    ...loadProxyConfig({ env: {}, argv: [] }),
    port: 0,
    graceMs: 1000,
    // Generous for a loaded machine: 200 tunnels open at once in one process.
    openTimeoutMs: 30_000,
    logLevel: "silent",
    ...overrides,
  };
  const proxy = createProxy({ config, logger: silentLogger(), keys: async () => keys.jwks });
  await proxy.start();
  return proxy;
}

/** A TCP echo server on 127.0.0.1 (half-close aware: ends after the client does). */
export async function startEchoServer(): Promise<{ port: number; connections: () => number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => socket.destroy());
    socket.pipe(socket);
  });
  await new Promise<void>((resolve) => server.listen({ host: "127.0.0.1", port: 0 }, resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    connections: () => sockets.size,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** An exposer for `jobId` exposing `exposures`, with a fresh expose token. */
export async function exposeJob(
  proxyUrl: string,
  keys: Keys,
  jobId: string,
  exposures: Exposure[],
  extra: Partial<ExposerOptions> = {},
): Promise<Exposer> {
  const token = await keys.token({ scope: "tunnel:expose", job: jobId });
  const exposer = startExposer({
    proxyUrl,
    token: () => token,
    jobId,
    hostId: "host-1",
    exposures: () => exposures,
    logger: silentLogger(),
    signal: new AbortController().signal,
    pollMs: 100,
    backoff: { initialMs: 50, maxMs: 500 },
    ...extra,
  });
  return exposer;
}

/** Rejects if `promise` takes longer than `ms`. */
export function within<T>(promise: Promise<T>, what: string, ms = 20_000): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    }),
  ]);
}

/** Reads a Readable to its end. */
export async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

export const dialToken = (keys: Keys, job: string, exposure: string, ttlMs?: number) =>
  keys.token({ scope: "tunnel:dial", job, exposure }, ttlMs);
