// A plain TCP relay for the proxy benchmark's ceiling baseline: every
// connection to the printed port is piped to 127.0.0.1:<target> and back,
// with nothing else (no framing, no auth). Two of them, one in the proxy's
// place and one in the supervisor's, are the most any relay written in Node
// can carry with the proxy's topology on this machine.
// `node --import tsx tcp-relay.ts <target port>`; prints `relay port <n>`.
import net from "node:net";

/** Starts a relay to 127.0.0.1:`target` on a free port; resolves with the port. */
export function startRelay(target: number): Promise<number> {
  const server = net.createServer({ allowHalfOpen: true }, (inbound) => {
    const outbound = net.connect({ host: "127.0.0.1", port: target, allowHalfOpen: true });
    for (const s of [inbound, outbound]) {
      s.setNoDelay(true);
      s.on("error", () => {
        inbound.destroy();
        outbound.destroy();
      });
    }
    inbound.pipe(outbound);
    outbound.pipe(inbound);
  });
  return new Promise((resolve) => server.listen({ host: "127.0.0.1", port: 0 }, () => resolve((server.address() as net.AddressInfo).port)));
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split("/").pop()!)) {
  const port = await startRelay(Number(process.argv[2]));
  process.stdout.write(`relay port ${port}\n`);
}
