/** Ports for tests that need an address before anything listens on it (a server started later, a restart, a refusal). */
import { createServer, type AddressInfo } from "node:net";

/** A loopback TCP port the OS picked and nothing listens on when this resolves. */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** The first of `count` consecutive loopback ports nothing listens on when this resolves (a testbed's --base-port). */
export async function freePortRange(count: number): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * 20000);
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
