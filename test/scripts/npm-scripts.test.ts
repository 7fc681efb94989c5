/**
 * The npm scripts the README and the guides name: each exists, and
 * `npm run test:security` (issue #17) runs exactly the security tests, which
 * `npm test` runs as well.
 */
import { describe, expect, it } from "@jest/globals";
import { execFile } from "node:child_process";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const execFileAsync = promisify(execFile);
const REPO = fileURLToPath(new URL("../..", import.meta.url));

/** The test files `npm <args> -- --listTests` would run, relative to the clone. */
async function listed(...args: string[]): Promise<string[]> {
  const { stdout } = await execFileAsync("npm", ["--silent", ...args, "--", "--listTests"], { cwd: REPO });
  return stdout
    .split("\n")
    .filter((line) => line.startsWith(REPO))
    .map((line) => line.slice(REPO.length).replace(/^\//, ""))
    .sort();
}

describe("the npm scripts", () => {
  it("runs exactly the files of test/security with npm run test:security, and npm test runs them too", async () => {
    const security = (await readdir(join(REPO, "test", "security")))
      .filter((name) => name.endsWith(".test.ts"))
      .map((name) => `test/security/${name}`)
      .sort();
    expect(security.length).toBeGreaterThan(0);
    expect(await listed("run", "test:security")).toEqual(security);
    expect(await listed("test")).toEqual(expect.arrayContaining(security));
  }, 60_000);

  it("has every script the README and the guides name", async () => {
    const { scripts } = JSON.parse(await readFile(join(REPO, "package.json"), "utf8")) as { scripts: Record<string, string> };
    const docs = ["README.md", ...(await readdir(join(REPO, "docs"))).filter((name) => name.endsWith(".md")).map((name) => `docs/${name}`)];
    const named = new Set<string>();
    for (const doc of docs) {
      for (const m of (await readFile(join(REPO, doc), "utf8")).matchAll(/npm run ([a-z][a-z:-]*)/g)) named.add(m[1]!);
    }
    expect(named.has("test:security")).toBe(true);
    expect([...named].filter((name) => scripts[name] === undefined)).toEqual([]);
  });
});
