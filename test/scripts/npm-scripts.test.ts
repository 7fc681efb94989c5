/**
 * The npm scripts the README and the guides name: each exists, and
 * `npm run test:security` (issue #17), as docs/security.md shows it, runs
 * exactly the security tests, which `npm test` runs as well.
 */
import { describe, expect, it } from "@jest/globals";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { docBlock, docBlocks, runBash } from "../support/doc-blocks.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const SECURITY_GUIDE = join(REPO, "docs", "security.md");

/** The test files an npm command line would run (jest's --listTests), relative to the clone. */
async function listed(command: string): Promise<string[]> {
  const args = command.includes(" -- ") ? "--listTests" : "-- --listTests";
  const result = await runBash(`${command} ${args}`, { cwd: REPO, env: process.env });
  expect({ command, code: result.code }).toEqual({ command, code: 0 });
  return result.stdout
    .split("\n")
    .filter((line) => line.startsWith(REPO))
    .map((line) => line.slice(REPO.length).replace(/^\//, ""))
    .sort();
}

describe("the npm scripts", () => {
  it("runs, as docs/security.md shows, all of test/security or one file of it, and npm test runs them too", async () => {
    const security = (await readdir(join(REPO, "test", "security")))
      .filter((name) => name.endsWith(".test.ts"))
      .map((name) => `test/security/${name}`)
      .sort();
    expect(security.length).toBeGreaterThan(0);
    const commands = docBlock(await docBlocks(SECURITY_GUIDE), SECURITY_GUIDE, "security", "run")
      .text.split("\n")
      .map((line) => line.replace(/#.*$/, "").trim())
      .filter((line) => line !== "");
    expect(commands).toEqual(["npm run test:security", "npm run test:security -- test/security/images.test.ts"]);
    expect(await listed(commands[0]!)).toEqual(security);
    expect(await listed(commands[1]!)).toEqual(["test/security/images.test.ts"]);
    expect(await listed("npm test")).toEqual(expect.arrayContaining(security));
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
