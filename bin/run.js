// Runs one of this package's programs: its bundle in dist/ (scripts/build.mjs),
// or its TypeScript source through tsx when there is no bundle or a source
// the bundles were built from is newer than it (a checkout being edited), so
// that a bin never runs stale code. An installed package ships no sources:
// it runs the bundle. TREADMILL_FROM_SOURCE=1 runs the source regardless.
import { readFileSync, statSync } from "node:fs";

const packageRoot = new URL("../", import.meta.url);

/** Runs dist/<name>.js, or `source` (a path from the package root) when the bundle is missing or stale. */
export async function run(name, source) {
  if (process.env.TREADMILL_FROM_SOURCE !== "1" && isFresh(packageRoot, name)) {
    process.setSourceMapsEnabled(true);
    await import(new URL(`dist/${name}.js`, packageRoot).href);
    return;
  }
  const { register } = await import("tsx/esm/api");
  register();
  await import(new URL(source, packageRoot).href);
}

/**
 * Whether `root`'s dist/<name>.js exists and no source listed in
 * dist/inputs.json is newer than it (a source that is not there, as in an
 * installed package, does not count).
 */
export function isFresh(root, name) {
  let built;
  let inputs;
  try {
    built = statSync(new URL(`dist/${name}.js`, root)).mtimeMs;
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
