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
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const require = createRequire(import.meta.url);
const MARK = "treadmill: porsager/postgres#1208";
const ORIGINAL = `  function nextWrite(fn) {
    const x = socket.write(chunk, fn)`;
const PATCHED = `  function nextWrite(fn) {
    if (socket === null) { // ${MARK}
      nextWriteTimer !== null && clearImmediate(nextWriteTimer)
      chunk = nextWriteTimer = null
      error(Errors.connection('CONNECTION_CLOSED', options))
      return false
    }
    const x = socket.write(chunk, fn)`;

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
  console.error(`scripts/patch-dependencies.mjs: postgres ${version} is not a version this fix was checked against (3.4.9, 3.4.10); check porsager/postgres#1208 and update the script`);
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
  if (text.includes(MARK)) continue;
  if (!text.includes(ORIGINAL)) {
    console.error(`scripts/patch-dependencies.mjs: ${path} does not contain the code the fix for porsager/postgres#1208 replaces`);
    process.exit(1);
  }
  writeFileSync(path, text.replace(ORIGINAL, PATCHED));
  patched++;
}
if (patched > 0) console.log(`patched postgres ${version} (porsager/postgres#1208) in ${patched} files`);
