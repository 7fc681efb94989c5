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
