#!/usr/bin/env node
// Fixes in dependencies that their releases do not have yet, applied after
// every install (`postinstall`, so `npm ci` and an install of the packed
// tarball both get them). Each fix names its upstream issue, checks the
// version it was written for, and is idempotent; a version it does not know
// fails the install loudly rather than running unpatched.
//
// postgres 3.4.x: when a connection's socket closes, a statement sent on it
// afterwards (the ROLLBACK that sql.begin sends when a query of its
// transaction failed, a statement on a reserved connection) is written from a
// timer to the null socket, and the TypeError kills the process
// (porsager/postgres#1208, #1154; the fix proposed in #1209). The guard
// settles the connection's queries with CONNECTION_CLOSED instead.
//
// postgres 3.4.x: `target_session_attrs=read-write` accepts a hot standby of
// PostgreSQL 14+, which reports `default_transaction_read_only=off` (the
// setting) and `in_hot_standby=on` at startup; the driver looked at the first
// only, so a multi-host DATABASE_URL let the coordinators connect to the
// standby (porsager found it: hapostgres/pg_auto_failover#970). As libpq
// does, read-write now also refuses a server in hot standby and read-only
// accepts one (docs/ha.md).
//
// postgres 3.4.x: with several hosts, a connection being opened swallowed
// every failure and went on to the next host, round after round without
// end, so a query waited for as long as no host was acceptable (the primary
// gone, the standby not yet promoted): an RPC hung until its deadline. The
// local `retries`, meant to count the hosts tried, was never raised. Now, as
// libpq does, one round over the hosts that finds none fails the query with
// the last host's error (mapped to Unavailable), and the pool tries again
// with its backoff at the next query.
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const require = createRequire(import.meta.url);
const FIXES = [
  {
    issue: "porsager/postgres#1208",
    original: `  function nextWrite(fn) {
    const x = socket.write(chunk, fn)`,
    patched: `  function nextWrite(fn) {
    if (socket === null) { // treadmill: porsager/postgres#1208
      nextWriteTimer !== null && clearImmediate(nextWriteTimer)
      chunk = nextWriteTimer = null
      error(Errors.connection('CONNECTION_CLOSED', options))
      return false
    }
    const x = socket.write(chunk, fn)`,
  },
  {
    issue: "target_session_attrs on a hot standby",
    original: `      (x === 'read-write' && xs.default_transaction_read_only === 'on') ||
      (x === 'read-only' && xs.default_transaction_read_only === 'off') ||`,
    patched: `      (x === 'read-write' && (xs.default_transaction_read_only === 'on' || xs.in_hot_standby === 'on')) || // treadmill: target_session_attrs on a hot standby
      (x === 'read-only' && xs.default_transaction_read_only === 'off' && xs.in_hot_standby === 'off') ||`,
  },
  {
    issue: "one round over several hosts",
    original: `    if (connection.queue === queues.connecting && options.host[retries + 1])
      return
`,
    patched: `    if (connection.queue === queues.connecting && options.host[++retries]) // treadmill: one round over several hosts
      return
    retries = 0
`,
  },
];

function packageDir(name) {
  // The package's main entry is under <dir>/cjs/src or <dir>/src: walk up to its package.json.
  let dir = dirname(require.resolve(name));
  for (;;) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
      if (pkg.name === name) return { dir, version: pkg.version };
    } catch {
      // not here
    }
    const up = dirname(dir);
    if (up === dir) throw new Error(`cannot find the directory of ${name}`);
    dir = up;
  }
}

const { dir, version } = packageDir("postgres");
if (!/^3\.4\.(9|10)$/.test(version)) {
  console.error(`scripts/patch-dependencies.mjs: postgres ${version} is not a version these fixes were checked against (3.4.9, 3.4.10); check ${FIXES.map((f) => f.issue).join(" and ")} and update the script`);
  process.exit(1);
}
let patched = 0;
for (const file of ["src/connection.js", "cjs/src/connection.js", "cf/src/connection.js"]) {
  const path = join(dir, file);
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    continue; // not shipped in this build
  }
  let changed = false;
  for (const fix of FIXES) {
    if (text.includes(`treadmill: ${fix.issue}`)) continue;
    if (!text.includes(fix.original)) {
      console.error(`scripts/patch-dependencies.mjs: ${path} does not contain the code the fix for ${fix.issue} replaces`);
      process.exit(1);
    }
    text = text.replace(fix.original, fix.patched);
    changed = true;
  }
  if (changed) {
    writeFileSync(path, text);
    patched++;
  }
}
if (patched > 0) console.log(`patched postgres ${version} (${FIXES.map((f) => f.issue).join("; ")}) in ${patched} files`);
