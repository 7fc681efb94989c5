// Starts the test run's PostgreSQL (test/support/pg-server.ts) and passes its
// URL to the test workers through the environment. Jest loads this file
// through a CommonJS hook that cannot resolve our NodeNext ".js" imports, so the
// real module is loaded through tsx's CommonJS loader, which can.
import { require as tsxRequire } from "tsx/cjs/api";

type PgServerModule = typeof import("./pg-server.js");

export default async function globalSetup(): Promise<void> {
  const { startTestServer } = tsxRequire("./pg-server.ts", import.meta.url) as PgServerModule;
  const server = await startTestServer(process.env);
  // Read by test/support/db.ts in the workers, which inherit this environment.
  process.env.TREADMILL_TEST_PG_URL = server.url;
  process.env.TREADMILL_TEST_PG_TEMPLATE = server.template;
  // Shared with global-teardown.ts, which runs in this same process.
  (globalThis as { treadmillTestPg?: { stop(): Promise<void> } }).treadmillTestPg = server;
}
