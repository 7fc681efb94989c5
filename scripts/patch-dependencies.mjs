#!/usr/bin/env node
// Fixes in dependencies that their releases do not have yet, applied after
// every install (`postinstall`, so `npm ci` and an install of the packed
// tarball both get them; scripts/build.mjs bundles the patched code). Each
// fix names its upstream issue or cause, checks the versions it was written
// for, and is idempotent; a version it does not know fails the install loudly
// rather than running unpatched.
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const require = createRequire(import.meta.url);

const FIXES = [
  {
    // When a connection's socket closes, a statement sent on it afterwards
    // (the ROLLBACK that sql.begin sends when a query of its transaction
    // failed, a statement on a reserved connection) is written from a timer
    // to the null socket, and the TypeError kills the process
    // (porsager/postgres#1208, #1154; the fix proposed in #1209). The guard
    // settles the connection's queries with CONNECTION_CLOSED instead.
    name: "postgres",
    versions: /^3\.4\.(9|10)$/,
    mark: "treadmill: porsager/postgres#1208",
    files: ["src/connection.js", "cjs/src/connection.js", "cf/src/connection.js"],
    original: `  function nextWrite(fn) {
    const x = socket.write(chunk, fn)`,
    patched: (mark) => `  function nextWrite(fn) {
    if (socket === null) { // ${mark}
      nextWriteTimer !== null && clearImmediate(nextWriteTimer)
      chunk = nextWriteTimer = null
      error(Errors.connection('CONNECTION_CLOSED', options))
      return false
    }
    const x = socket.write(chunk, fn)`,
  },
  {
    // sql.begin reserves its connection from the hook that sending BEGIN
    // calls, last in a chain that stops early once the connection's
    // pipeline is full: a BEGIN that fills it goes out unreserved, its
    // transaction fails with UNSAFE_TRANSACTION and the connection goes
    // back to the pool inside it (porsager/postgres#1189, #823; the fix
    // proposed in #1218). Ten thousand supervisors attaching at once hit it
    // (npm run bench -- scale). The hook now runs whenever BEGIN is sent.
    name: "postgres",
    versions: /^3\.4\.(9|10)$/,
    mark: "treadmill: porsager/postgres#1189",
    files: ["src/connection.js", "cjs/src/connection.js", "cf/src/connection.js"],
    original: `      return write(toBuffer(q))
        && !q.describeFirst
        && !q.cursorFn
        && sent.length < max_pipeline
        && (!q.options.onexecute || q.options.onexecute(connection))`,
    patched: (mark) => `      const ready = write(toBuffer(q)) // ${mark}
        && !q.describeFirst
        && !q.cursorFn
        && sent.length < max_pipeline
      return q.options.onexecute ? (q.options.onexecute(connection), false) : ready`,
  },
  {
    // `target_session_attrs=read-write` accepted a hot standby of PostgreSQL
    // 14+, which reports `default_transaction_read_only=off` (the setting)
    // and `in_hot_standby=on` at startup: the driver looked at the first
    // only, so a multi-host DATABASE_URL let the coordinators connect to the
    // standby (porsager met it: hapostgres/pg_auto_failover#970). As libpq
    // does, read-write now also refuses a server in hot standby, and
    // read-only accepts one (docs/ha.md).
    name: "postgres",
    versions: /^3\.4\.(9|10)$/,
    mark: "treadmill: target_session_attrs on a hot standby",
    files: ["src/connection.js", "cjs/src/connection.js", "cf/src/connection.js"],
    original: `      (x === 'read-write' && xs.default_transaction_read_only === 'on') ||
      (x === 'read-only' && xs.default_transaction_read_only === 'off') ||`,
    patched: (mark) => `      (x === 'read-write' && (xs.default_transaction_read_only === 'on' || xs.in_hot_standby === 'on')) || // ${mark}
      (x === 'read-only' && xs.default_transaction_read_only === 'off' && xs.in_hot_standby === 'off') ||`,
  },
  {
    // With several hosts, a connection being opened swallowed every failure
    // and went on to the next host, round after round without end, so a
    // query waited as long as no host would do (the primary gone, the
    // standby not yet promoted): an RPC hung until its deadline. The local
    // `retries`, meant to count the hosts tried, was never raised. As libpq
    // does, one round over the hosts that finds none now fails the query
    // with the last host's error (the coordinator answers Unavailable), and
    // the pool tries again, with its backoff, at the next query.
    name: "postgres",
    versions: /^3\.4\.(9|10)$/,
    mark: "treadmill: one round over several hosts",
    files: ["src/connection.js", "cjs/src/connection.js", "cf/src/connection.js"],
    original: `    if (connection.queue === queues.connecting && options.host[retries + 1])
      return
`,
    patched: (mark) => `    if (connection.queue === queues.connecting && options.host[++retries]) // ${mark}
      return
    retries = 0
`,
  },
  {
    // A reserved connection (sql.reserve, which the scheduler's pass and
    // the job system's transactions use) could be lost while the server
    // was away: a reserve that reached a connection being opened by another
    // route than its own (the pool hands queued requests to a connection
    // that closed) was dropped when that connection came up, and a reserve
    // already failed stayed queued and took the next connection that came
    // up with it. The first never settled (a scheduling pass hung after a
    // restart of PostgreSQL: test/coordinator/database-outage.test.ts), the
    // second leaked a connection of the pool. A reserve now leaves the
    // queue when it settles, once, and the connection that came up for it
    // hands itself over (below, in connection.js) or goes back to the pool.
    name: "postgres",
    versions: /^3\.4\.(9|10)$/,
    mark: "treadmill: a reserve settles once and leaves the queue",
    files: ["src/index.js", "cjs/src/index.js", "cf/src/index.js"],
    original: `const query = { reserve: resolve, reject }`,
    patched: (mark) => `const query = { // ${mark}
          reserve: (c) => query.settled ? false : (query.settled = true, queries.remove(query), resolve(c), true),
          reject: (e) => query.settled || (query.settled = true, queries.remove(query), reject(e))
        }`,
    extra: {
      original: `    while (ready && queries.length && max-- > 0) {
      const query = queries.shift()
      if (query.reserve)
        return query.reserve(c)

      ready = c.execute(query)
    }

    ready
      ? move(c, busy)
      : move(c, full)`,
      patched: `    let executed = 0
    while (ready && queries.length && max-- > 0) {
      const query = queries.shift()
      if (query.reserve) {
        if (query.reserve(c))
          return
        continue
      }
      ready = c.execute(query)
      executed++
    }

    executed === 0
      ? move(c, open)
      : ready ? move(c, busy) : move(c, full)`,
    },
  },
  {
    // The other half of the fix above: a connection opened for a reserve
    // hands itself to it once ready (after the array types, when it fetches
    // them), or, when the reserve has settled meanwhile, goes to the pool.
    name: "postgres",
    versions: /^3\.4\.(9|10)$/,
    mark: "treadmill: a connection opened for a reserve hands itself over",
    files: ["src/connection.js", "cjs/src/connection.js", "cf/src/connection.js"],
    original: `      if (needsTypes) {
        initial.reserve && (initial = null)
        return fetchArrayTypes()
      }

      initial && !initial.reserve && execute(initial)
      options.shared.retries = retries = 0
      initial = null
      return`,
    // A connection that closes while it fetches the array types fails its
    // queries (errored); the fetch's own rejection, which nobody awaited, was
    // an unhandled rejection (it failed database-outage.test.ts at random).
    patched: (mark) => `      if (needsTypes)
        return fetchArrayTypes().catch(() => undefined) // ${mark}

      const first = initial
      options.shared.retries = retries = 0
      initial = null
      if (!first.reserve)
        return execute(first)
      first.reserve(connection) || onopen(connection)
      return`,
  },
  {
    // A reserved connection's handle outlived its connection: after the
    // socket closed, the pool reconnected the same connection for other
    // queries, and a statement still sent on the old handle (the next one
    // of a transaction that had not yet seen the failure) went out on the
    // new session, mid-startup, outside its transaction; its release put a
    // connection that was opening (or reserved by another) into the pool;
    // statements queued behind a full pipeline never settled. Seen in a
    // PostgreSQL failover (test/interop/pg-failover.test.ts). A handle now
    // serves only its own reservation: once the connection closed or was
    // released, its statements fail with CONNECTION_CLOSED (those queued
    // too) and its release does nothing.
    name: "postgres",
    versions: /^3\.4\.(9|10)$/,
    mark: "treadmill: a reserved handle serves only its own reservation",
    files: ["src/index.js", "cjs/src/index.js", "cf/src/index.js"],
    original: `    move(c, reserved)
    c.reserved = () => queue.length
      ? c.execute(queue.shift())
      : move(c, reserved)
    c.reserved.release = true

    const sql = Sql(handler)
    sql.release = () => {
      c.reserved = null
      onopen(c)
    }

    return sql

    function handler(q) {
      c.queue === full
        ? queue.push(q)
        : c.execute(q) || move(c, full)
    }`,
    patched: (mark) => `    move(c, reserved)
    const token = c.reserved = () => queue.length // ${mark}
      ? c.execute(queue.shift())
      : move(c, reserved)
    c.reserved.release = true
    c.reserved.fail = (e) => { while (queue.length) queue.shift().reject(e) }

    const sql = Sql(handler)
    sql.release = () => {
      if (c.reserved !== token)
        return
      c.reserved = null
      onopen(c)
    }

    return sql

    function handler(q) {
      if (c.reserved !== token)
        return q.reject(Errors.connection('CONNECTION_CLOSED', options))
      c.queue === full
        ? queue.push(q)
        : c.execute(q) || move(c, full)
    }`,
    extra: {
      original: `  function onclose(c, e) {
    move(c, closed)
    c.reserved = null`,
      patched: `  function onclose(c, e) {
    move(c, closed)
    c.reserved && c.reserved.fail && c.reserved.fail(e)
    c.reserved = null`,
    },
  },
  {
    // target_session_attrs was checked only while the query that opened a
    // connection was pending: when that query failed during the startup
    // (an error from the old server's backend, a statement that had gone
    // out mid-startup), the check was skipped and the connection joined
    // the pool on whatever server it had reached, a hot standby during a
    // failover (test/interop/pg-failover.test.ts). A connection is now
    // handed out only once its session was checked.
    name: "postgres",
    versions: /^3\.4\.(9|10)$/,
    mark: "treadmill: a session is checked before the connection is handed out",
    files: ["src/connection.js", "cjs/src/connection.js", "cf/src/connection.js"],
    original: `    if (initial) {
      if (target_session_attrs) {`,
    patched: (mark) => `    if (initial || !opened) { // ${mark}
      if (target_session_attrs) {`,
    extra: [
      {
        original: `      const first = initial
      options.shared.retries = retries = 0
      initial = null
      if (!first.reserve)
        return execute(first)
      first.reserve(connection) || onopen(connection)
      return
    }`,
        patched: `      const first = initial
      opened = true
      options.shared.retries = retries = 0
      initial = null
      if (first && !first.reserve)
        return execute(first)
      if (first && first.reserve(connection))
        return
    }`,
      },
      { original: "    , needsTypes = options.fetch_types\n", patched: "    , needsTypes = options.fetch_types\n    , opened = false\n" },
      { original: "      needsTypes = options.fetch_types\n", patched: "      needsTypes = options.fetch_types\n      opened = false\n" },
      // A socket that drains during the startup is not a connection to hand out yet.
      { original: "    !query && onopen(connection)\n", patched: "    !query && opened && onopen(connection)\n" },
    ],
  },
  {
    // Every reflected message built its own field-number map on its first
    // findNumber, so decoding N messages built N maps: a third of `tml`'s
    // start went to decoding the generated file descriptors this way, and
    // every binary decode pays it per message. One map per message type, as
    // the sorted field list beside it already is.
    name: "@bufbuild/protobuf",
    versions: /^2\.13\.\d+$/,
    mark: "treadmill: one field-number map per message type",
    files: ["dist/esm/reflect/reflect.js", "dist/commonjs/reflect/reflect.js"],
    original: `        if (!this._fieldsByNumber) {
            this._fieldsByNumber = new Map(this.desc.fields.map((f) => [f.number, f]));
        }
        return this._fieldsByNumber.get(number);`,
    patched: (mark) => `        // ${mark}
        let byNumber = messageFieldsByNumber.get(this.desc);
        if (byNumber === undefined) {
            byNumber = new Map(this.desc.fields.map((f) => [f.number, f]));
            messageFieldsByNumber.set(this.desc, byNumber);
        }
        return byNumber.get(number);`,
    // The map's home, beside the sorted fields' cache.
    extra: {
      original: "const messageSortedFields = new WeakMap();",
      patched: "const messageSortedFields = new WeakMap();\nconst messageFieldsByNumber = new WeakMap();",
    },
  },
];

function packageDir(name) {
  // The package's main entry is some folders down: walk up to its package.json.
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

function fail(message) {
  console.error(`scripts/patch-dependencies.mjs: ${message}`);
  process.exit(1);
}

for (const fix of FIXES) {
  const { dir, version } = packageDir(fix.name);
  if (!fix.versions.test(version)) {
    fail(`${fix.name} ${version} is not a version this fix was checked against (${fix.versions}); check "${fix.mark}" and update the script`);
  }
  let patched = 0;
  for (const file of fix.files) {
    const path = join(dir, file);
    let text;
    try {
      text = readFileSync(path, "utf8");
    } catch {
      continue; // not shipped in this build
    }
    if (text.includes(fix.mark)) continue;
    const edits = [{ original: fix.original, patched: fix.patched(fix.mark) }, ...[fix.extra ?? []].flat()];
    for (const edit of edits) {
      if (!text.includes(edit.original)) fail(`${path} does not contain the code the fix "${fix.mark}" replaces`);
      text = text.replace(edit.original, edit.patched);
    }
    writeFileSync(path, text);
    patched++;
  }
  if (patched > 0) console.log(`patched ${fix.name} ${version} (${fix.mark}) in ${patched} files`);
}
