/**
 * The bins run their bundle in dist/ while it is fresh, and the TypeScript
 * sources otherwise (bin/run.js's isFresh), so that a checkout being edited
 * never runs stale code; every bin's bundle is there after a build; tml's
 * CommonJS bundle runs with a V8 code cache that a stale or broken cache
 * never stops (bin/run.js's runCached).
 */
import { describe, expect, it } from "@jest/globals";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
// @ts-expect-error bin/run.js is plain JavaScript without declarations
import { isFresh, runCached } from "../../bin/run.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const fresh = isFresh as (root: URL, bundle: string) => boolean;
void runCached; // run in a child below: it runs a program in the calling process

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
      expect(fresh(url(roots[0]!), "tool.js")).toBe(true); // gone.ts is missing, as in an installed package: it does not count
      expect(fresh(url(roots[1]!), "tool.js")).toBe(false); // cli/a.ts edited since the build
      expect(fresh(url(roots[2]!), "other.js")).toBe(false); // no bundle of that name
      await rm(join(roots[2]!, "dist", "inputs.json"));
      expect(fresh(url(roots[2]!), "tool.js")).toBe(false); // no record of what the bundle was built from
    } finally {
      for (const root of roots) await rm(root, { recursive: true, force: true });
    }
  });

  it("have a fresh bundle each after the build npm test runs, which tml runs", async () => {
    const bins = Object.keys((JSON.parse(await readFile(join(REPO, "package.json"), "utf8")) as { bin: Record<string, string> }).bin);
    for (const bin of bins) {
      const bundle = bin === "tml" ? "tml.cjs" : `${bin}.js`;
      expect({ bin, bundle: existsSync(join(REPO, "dist", bundle)) }).toEqual({ bin, bundle: true });
      expect({ bin, fresh: fresh(pathToFileURL(`${REPO}/`), bundle) }).toEqual({ bin, fresh: true });
    }
    expect(existsSync(join(REPO, "dist", "tml.cjs.cache"))).toBe(true);
    const help = spawnSync(process.execPath, [join(REPO, "bin", "tml.js"), "--help"], { encoding: "utf8" });
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/^tml: the Treadmill command-line client/);
  });

  it("run tml's bundle with its code cache, and write a fresh cache when there is none or V8 refuses it", async () => {
    const dir = await mkdtemp(join(tmpdir(), "treadmill-cache-"));
    try {
      const program = join(dir, "program.cjs");
      await writeFile(program, 'const parts = __filename.split("/"); console.log(`ran ${parts[parts.length - 1]} with ${typeof require("node:path").join}`);\n');
      const runIt = () =>
        spawnSync(process.execPath, ["--input-type=module", "-e", `import { runCached } from ${JSON.stringify(pathToFileURL(join(REPO, "bin", "run.js")).href)}; runCached(${JSON.stringify(program)});`], { encoding: "utf8" });
      const cache = `${program}.cache`;
      expect(runIt().stdout).toBe("ran program.cjs with function\n");
      const written = await readFile(cache);
      expect(written.length).toBeGreaterThan(0);
      expect(runIt().stdout).toBe("ran program.cjs with function\n");
      expect((await readFile(cache)).equals(written)).toBe(true); // accepted: not written again
      await writeFile(cache, "not a code cache");
      expect(runIt().stdout).toBe("ran program.cjs with function\n");
      const rewritten = await readFile(cache); // refused, so written afresh
      expect(rewritten.toString("latin1")).not.toBe("not a code cache");
      expect(runIt().stdout).toBe("ran program.cjs with function\n");
      expect((await readFile(cache)).equals(rewritten)).toBe(true); // and accepted again
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
