/**
 * A socket factory for postgres.js that coalesces its writes.
 *
 * postgres.js pipelines the statements issued together, but it writes to its
 * socket whenever its buffer passes 1 KiB, and once more on the next
 * setImmediate: a batch of statements (a group commit, a scheduling pass)
 * becomes many small writes, each a system call that also wakes the server.
 * On these machines (virtual CPUs, loopback TCP) those writes were 30% of the
 * coordinator's CPU under load. This socket corks itself on the first write
 * of a turn of the event loop and uncorks on the next setImmediate, so what
 * one turn wrote goes out in one writev.
 *
 * Used only for plain TCP connections; TLS and Unix sockets go through
 * postgres.js's own sockets.
 */
import net from "node:net";

/** Wraps `socket` so that the writes of one event-loop turn go out together. */
export function coalesceWrites(socket: net.Socket): net.Socket {
  const write = socket.write.bind(socket) as (chunk: Uint8Array, cb?: (err?: Error | null) => void) => boolean;
  let corked = false;
  const uncork = () => {
    corked = false;
    socket.uncork();
  };
  socket.write = ((chunk: Uint8Array, cb?: (err?: Error | null) => void) => {
    if (!corked) {
      corked = true;
      socket.cork();
      setImmediate(uncork);
    }
    return write(chunk, cb);
  }) as typeof socket.write;
  return socket;
}

/**
 * A `socket` option for postgres.js connecting to `host`:`port` over TCP with
 * coalesced writes (postgres.js expects it connected).
 */
export function coalescingSocket(host: string, port: number): () => Promise<net.Socket> {
  return () =>
    new Promise((resolve, reject) => {
      const socket = net.connect({ host, port, noDelay: true });
      socket.once("error", reject);
      socket.once("connect", () => {
        socket.off("error", reject);
        resolve(coalesceWrites(socket));
      });
    });
}

/** Host and port of a plain-TCP PostgreSQL URL that can use `coalescingSocket`, or undefined. */
export function plainTcpTarget(url: string): { host: string; port: number } | undefined {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return undefined;
  }
  if (u.protocol !== "postgres:" && u.protocol !== "postgresql:") return undefined;
  for (const key of u.searchParams.keys()) if (/^(ssl|sslmode|host)$/i.test(key)) return undefined;
  if (u.hostname === "" || u.hostname.includes(",") || u.port.includes(",")) return undefined;
  return { host: u.hostname.replace(/^\[|\]$/g, ""), port: Number(u.port || 5432) };
}
