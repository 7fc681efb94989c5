/**
 * Where this package's files are, whether it runs from TypeScript sources
 * (a checkout, through tsx or jest) or from the compiled bundles in `dist/`
 * (scripts/build.mjs; an installed package): the directory holding its
 * package.json, found by walking up from this module. Files the code reads at
 * run time (migrations, the web console's build, the simulated board's
 * program) are named from here, never relative to the module that reads them,
 * since a bundle moves every module into `dist/`.
 */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

function findRoot(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    const manifest = join(dir, "package.json");
    if (existsSync(manifest) && (JSON.parse(readFileSync(manifest, "utf8")) as { name?: string }).name === "treadmill") return dir;
    if (dirname(dir) === dir) throw new Error(`no package.json of treadmill above ${from}`);
  }
}

/** The package's root directory. */
export const PACKAGE_ROOT = findRoot(dirname(fileURLToPath(import.meta.url)));

/** A path under the package's root. */
export function packagePath(...parts: string[]): string {
  return join(PACKAGE_ROOT, ...parts);
}

/** Whether this code runs from the compiled bundles (`dist/`) rather than the TypeScript sources. */
export const COMPILED = !import.meta.url.endsWith(".ts");
