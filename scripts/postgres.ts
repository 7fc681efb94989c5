/**
 * `scripts/postgres.js`: the coordinator's embedded PostgreSQL as a server of
 * its own, for a site whose coordinators should not own their database (they
 * then take DATABASE_URL) and which has no PostgreSQL installed. The same
 * binaries and layout as the coordinator's embedded server
 * (coordinator/db/embedded.ts): 127.0.0.1 only, a generated password, as the
 * `postgres` OS user when run as root. It writes its URL (with the password)
 * to `--url-file`, mode 0600, never to its log. Used by docs/site.md.
 */
import { writeFile, chmod } from "node:fs/promises";
import { startEmbeddedPostgres, type EmbeddedPostgres } from "../coordinator/db/embedded.js";
import { logLevelField } from "../lib/component.js";
import { loadConfig } from "../lib/config.js";
import { runMain } from "../lib/main.js";

const schema = {
  dataDir: { type: "path", default: ".treadmill/postgres", description: "the cluster's directory (made and initialised on first start)" },
  port: { type: "int", default: 5432, min: 1, max: 65535, description: "port on 127.0.0.1" },
  database: { type: "string", default: "treadmill", description: "database made on first start and named in the URL" },
  urlFile: { type: "path", default: "", description: "file to write the database's URL to, mode 0600 (it holds the password)" },
  logLevel: logLevelField("info"),
} as const;

await runMain({
  component: "postgres",
  summary: "scripts/postgres.js: the embedded PostgreSQL as a server of its own; its URL goes to --url-file.",
  schema,
  proc: process,
  load: (source) => loadConfig("postgres", schema, source),
  create: (config, logger) => {
    let server: EmbeddedPostgres | undefined;
    let stopping = false;
    return {
      port: config.port,
      async start() {
        server = await startEmbeddedPostgres({ dataDir: config.dataDir, port: config.port, database: config.database, logger });
        // A postmaster that dies under us takes us along, so that whatever
        // restarts us restarts it.
        void server.exited.then(() => {
          if (!stopping) process.exit(1);
        });
        if (config.urlFile !== "") {
          await writeFile(config.urlFile, `${server.url}\n`, { mode: 0o600 });
          await chmod(config.urlFile, 0o600);
        }
      },
      async stop() {
        stopping = true;
        await server?.stop();
      },
    };
  },
  ready: (server, logger) => logger.info({ port: server.port }, "postgres ready"),
});
