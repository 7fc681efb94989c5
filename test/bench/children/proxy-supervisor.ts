// The supervisor's side of the proxy benchmark, in its own process: a TCP
// echo server (the job's host-local port) and an exposer announcing it.
// `node --import tsx proxy-supervisor.ts <proxyUrl> <jobId> <exposeToken>`;
// prints `echo port <n>` and `exposer connected`.
import net from "node:net";
import { silentLogger } from "../../../lib/logger.js";
import { startExposer } from "../../../supervisor/exposer.js";
import { startRelay } from "./tcp-relay.js";

const [proxyUrl, jobId, token] = process.argv.slice(2);
const server = net.createServer({ allowHalfOpen: true }, (socket) => {
  socket.setNoDelay(true);
  socket.on("error", () => socket.destroy());
  socket.pipe(socket);
});
server.listen({ host: "127.0.0.1", port: 0 }, () => {
  const port = (server.address() as net.AddressInfo).port;
  process.stdout.write(`echo port ${port}\n`);
  // The ceiling baseline's relay in the supervisor's place (see tcp-relay.ts).
  void startRelay(port).then((relay) => process.stdout.write(`relay port ${relay}\n`));
  const exposer = startExposer({
    proxyUrl,
    token: () => token,
    jobId,
    hostId: "bench-host",
    exposures: () => [{ name: "echo", host: "127.0.0.1", port, kind: "tcp" }],
    logger: silentLogger(),
    signal: new AbortController().signal,
    pollMs: 100,
  });
  const timer = setInterval(() => {
    if (exposer.connected()) {
      clearInterval(timer);
      // The announce follows the welcome by at most one poll.
      setTimeout(() => process.stdout.write("exposer connected\n"), 300);
    }
  }, 20);
});
