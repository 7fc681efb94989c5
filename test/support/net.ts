/** Ports for tests that need an address before anything listens on it (a server started later, a restart, a refusal). */
import { createServer } from "node:net";

/**
 * A loopback TCP port nothing listens on when this resolves, below Linux's
 * ephemeral range (32768-60999): a port from that range may be taken by any
 * outgoing connection before the test's server starts (or restarts) on it.
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = 20000 + Math.floor(Math.random() * (EPHEMERAL_FIRST - 20000));
    if (await isFree(port)) return port;
  }
}

/** The first port of Linux's default ephemeral range. */
const EPHEMERAL_FIRST = 32768;

function isFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once("error", () => resolve(false));
    server.listen(port, "127.0.0.1", () => server.close(() => resolve(true)));
  });
}

/** The first of `count` consecutive loopback ports nothing listens on when this resolves (a testbed's --base-port). */
export async function freePortRange(count: number): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * (EPHEMERAL_FIRST - 20000 - count));
    const servers = [];
    try {
      for (let i = 0; i < count; i++) {
        const server = createServer();
        await new Promise<void>((resolve, reject) => {
          server.once("error", reject);
          server.listen(base + i, "127.0.0.1", resolve);
        });
        servers.push(server);
      }
      return base;
    } catch {
      // taken: another base
    } finally {
      for (const server of servers) await new Promise((resolve) => server.close(resolve));
    }
  }
  throw new Error(`no ${count} consecutive free ports found`);
}
