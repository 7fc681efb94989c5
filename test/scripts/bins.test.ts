/**
 * The bins run their bundle in dist/ while it is fresh, and the TypeScript
 * sources otherwise (bin/run.js's isFresh), so that a checkout being edited
 * never runs stale code; and every bin's bundle is there after a build.
 */
import { describe, expect, it } from "@jest/globals";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
// @ts-expect-error bin/run.js is plain JavaScript without declarations
import { isFresh } from "../../bin/run.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const fresh = isFresh as (root: URL, name: string) => boolean;

/** A package root with dist/tool.js built at `builtAt` from cli/a.ts, whose time is `sourceAt` (seconds). */
async function fakeRoot(builtAt: number, sourceAt: number, inputs = ["cli/a.ts", "gone.ts"]): Promise<string> {
  const root = await mkdtemp(join(tmpdir(), "treadmill-bins-"));
  await mkdir(join(root, "dist"));
  await mkdir(join(root, "cli"));
  await writeFile(join(root, "dist", "tool.js"), "");
  await writeFile(join(root, "dist", "inputs.json"), JSON.stringify(inputs));
  await writeFile(join(root, "cli", "a.ts"), "");
  await utimes(join(root, "dist", "tool.js"), builtAt, builtAt);
  await utimes(join(root, "cli", "a.ts"), sourceAt, sourceAt);
  return root;
}

describe("the bins", () => {
  it("run the bundle only while no source it was built from is newer, and without one run the sources", async () => {
    const roots = [await fakeRoot(2000, 1000), await fakeRoot(1000, 2000), await fakeRoot(2000, 1000, ["cli/a.ts"])];
    try {
      const url = (root: string) => pathToFileURL(`${root}/`);
      expect(fresh(url(roots[0]!), "tool")).toBe(true); // gone.ts is missing, as in an installed package: it does not count
      expect(fresh(url(roots[1]!), "tool")).toBe(false); // cli/a.ts edited since the build
      expect(fresh(url(roots[2]!), "other")).toBe(false); // no bundle of that name
      await rm(join(roots[2]!, "dist", "inputs.json"));
      expect(fresh(url(roots[2]!), "tool")).toBe(false); // no record of what the bundle was built from
    } finally {
      for (const root of roots) await rm(root, { recursive: true, force: true });
    }
  });

  it("have a fresh bundle each after the build npm test runs, which tml runs", async () => {
    const bins = Object.keys((JSON.parse(await readFile(join(REPO, "package.json"), "utf8")) as { bin: Record<string, string> }).bin);
    for (const bin of bins) {
      expect({ bin, bundle: existsSync(join(REPO, "dist", `${bin}.js`)) }).toEqual({ bin, bundle: true });
      expect({ bin, fresh: fresh(pathToFileURL(`${REPO}/`), bin) }).toEqual({ bin, fresh: true });
    }
    const help = spawnSync(process.execPath, [join(REPO, "bin", "tml.js"), "--help"], { encoding: "utf8" });
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/^tml: the Treadmill command-line client/);
  });
});
