// A process that starts an embedded PostgreSQL and waits to be killed, for the
// crash tests in test/coordinator/embedded-postgres.test.ts. Run with
// `node --import tsx embedded-child.ts <dataDir> [pdeathsig|no-pdeathsig]`;
// prints one JSON line { pid, url } once the server is ready.
import { startEmbeddedPostgres } from "../../coordinator/db/embedded.js";
import { silentLogger } from "../../lib/logger.js";

const [dataDir, mode = "pdeathsig"] = process.argv.slice(2);
const server = await startEmbeddedPostgres({
  dataDir,
  logger: silentLogger(),
  ephemeral: true,
  dieWithParent: mode !== "no-pdeathsig",
});
process.stdout.write(`${JSON.stringify({ pid: server.pid, url: server.url })}\n`);
setInterval(() => undefined, 1 << 30);
