// Runs one of this package's programs: its bundle in dist/ (scripts/build.mjs),
// or its TypeScript source through tsx when there is no bundle or a source
// the bundles were built from is newer than it (a checkout being edited), so
// that a bin never runs stale code. An installed package ships no sources:
// it runs the bundle. TREADMILL_FROM_SOURCE=1 runs the source regardless.
import { readFileSync, renameSync, statSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import vm from "node:vm";

const packageRoot = new URL("../", import.meta.url);

/**
 * Runs `bundle` (a file in dist/: an ES module, or a CommonJS `.cjs` run with
 * its code cache, see runCached), or `source` (a path from the package root)
 * when the bundle is missing or stale. Stack traces map back to the sources
 * unless `sourceMaps` is false: node parses every loaded bundle's map when
 * they are on (a fifth of `tml`'s start), so tml turns them on only with
 * --verbose, the one case it prints a stack.
 */
export async function run(bundle, source, { sourceMaps = true } = {}) {
  if (process.env.TREADMILL_FROM_SOURCE !== "1" && isFresh(packageRoot, bundle)) {
    const path = fileURLToPath(new URL(`dist/${bundle}`, packageRoot));
    if (sourceMaps) process.setSourceMapsEnabled(true);
    if (!bundle.endsWith(".cjs")) await import(new URL(`dist/${bundle}`, packageRoot).href);
    else if (sourceMaps) createRequire(import.meta.url)(path);
    else runCached(path);
    return;
  }
  const { register } = await import("tsx/esm/api");
  register();
  await import(new URL(source, packageRoot).href);
}

/**
 * Runs the CommonJS file at `path` compiled with the V8 code cache kept in
 * `<path>.cache`, which saves compiling it at every start. When the cache is
 * missing, or V8 refuses it (another node version, or the bundle changed),
 * the run writes a fresh one as it exits, including the functions it
 * compiled on the way, where it may write (an installed package's directory
 * may be read-only: then it just runs uncached). The write is a rename, so a
 * concurrent start reads a whole cache or none.
 */
export function runCached(path) {
  const cachePath = `${path}.cache`;
  let cachedData;
  try {
    cachedData = readFileSync(cachePath);
  } catch {
    // none yet
  }
  const wrapper = `(function (exports, require, module, __filename, __dirname) {${readFileSync(path, "utf8")}\n})`;
  const script = new vm.Script(wrapper, { filename: path, cachedData });
  if (cachedData === undefined || script.cachedDataRejected) {
    process.once("exit", () => {
      try {
        const partial = `${cachePath}.${process.pid}`;
        writeFileSync(partial, script.createCachedData());
        renameSync(partial, cachePath);
      } catch {
        // a read-only install: run uncached
      }
    });
  }
  const module = { exports: {} };
  script.runInThisContext()(module.exports, createRequire(path), module, path, dirname(path));
}

/**
 * Whether `root`'s dist/<bundle> exists and no source listed in
 * dist/inputs.json is newer than it (a source that is not there, as in an
 * installed package, does not count).
 */
export function isFresh(root, bundle) {
  let built;
  let inputs;
  try {
    built = statSync(new URL(`dist/${bundle}`, root)).mtimeMs;
    inputs = JSON.parse(readFileSync(new URL("dist/inputs.json", root), "utf8"));
  } catch {
    return false;
  }
  for (const input of inputs) {
    const source = statSync(new URL(input, root), { throwIfNoEntry: false });
    if (source !== undefined && source.mtimeMs > built) return false;
  }
  return true;
}
