/**
 * docs/scale.md's benchmark as the doc gives it (`npm run bench -- scale`),
 * at a small size: it runs to its end, and prints every figure the doc's
 * tables name (the first column's first `label`), so that the doc's figures stay
 * those the bench measures.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "@jest/globals";
import { docBlock, docBlocks, runBash } from "../support/doc-blocks.js";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
const DOC = join(REPO, "docs", "scale.md");

describe("docs/scale.md's benchmark", () => {
  it("runs as written at a small size and prints every figure the doc's tables name", async () => {
    const block = docBlock(await docBlocks(DOC), DOC, "bench", "scale");
    const small = {
      TREADMILL_BENCH_SCALE_SUPERVISORS: "200",
      TREADMILL_BENCH_SCALE_QUEUED_JOBS: "2000",
      TREADMILL_BENCH_SCALE_DISPATCH_JOBS: "50",
      TREADMILL_BENCH_SCALE_SUBMITTED: "200",
      TREADMILL_BENCH_SCALE_WORKERS: "2",
      TREADMILL_BENCH_SCALE_IDLE_MS: "2000",
    };
    const run = await runBash(`set -euo pipefail\n${block.text}`, { cwd: REPO, env: { ...process.env, ...small } });
    expect({ code: run.code, stderr: run.code === 0 ? "" : run.stderr }).toEqual({ code: 0, stderr: "" });
    const labels = [...(await readFile(DOC, "utf8")).matchAll(/^\| `([^`]+)`/gm)].map((m) => m[1]);
    expect(labels.length).toBeGreaterThan(8);
    for (const label of labels) expect(run.stdout).toContain(label);
  }, 600_000);
});
