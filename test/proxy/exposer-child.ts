// A supervisor's exposer in a child process, so that a test can kill it:
// `node --import tsx exposer-child.ts <proxyUrl> <jobId> <token> <name>=<port>...`.
import { silentLogger } from "../../lib/logger.js";
import { startExposer } from "../../supervisor/exposer.js";

const [proxyUrl, jobId, token, ...ports] = process.argv.slice(2);
const exposer = startExposer({
  proxyUrl,
  token: () => token,
  jobId,
  hostId: "child-host",
  exposures: () =>
    ports.map((p) => {
      const [name, port] = p.split("=");
      return { name, host: "127.0.0.1" as const, port: Number(port), kind: "tcp" as const };
    }),
  logger: silentLogger(),
  signal: new AbortController().signal,
  pollMs: 100,
  backoff: { initialMs: 50, maxMs: 500 },
});
const timer = setInterval(() => {
  if (exposer.connected()) {
    process.stdout.write("exposer connected\n");
    clearInterval(timer);
  }
}, 20);
process.on("SIGTERM", () => void exposer.stop().then(() => process.exit(0)));
