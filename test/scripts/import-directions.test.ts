/**
 * `npm run lint` enforces the import directions of DESIGN.md §1 and lib/'s
 * READMEs (issue #19, item 1): no component imports another's folder, lib/
 * imports no component, and a server imports no `lib/<folder>/client*` file.
 * ESLint runs once, in a child, on every case (about as long as one lint).
 */
import { describe, expect, it } from "@jest/globals";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));

/** Lints `text` as if it were each file, in one ESLint child; returns the restricted-import messages of each. */
function lint(cases: { file: string; text: string }[]): Promise<string[][]> {
  const program = `
    import { ESLint } from "eslint";
    const eslint = new ESLint({ cwd: ${JSON.stringify(ROOT)} });
    const out = [];
    for (const { file, text } of JSON.parse(process.argv[1])) {
      const [result] = await eslint.lintText(text, { filePath: file });
      out.push(result.messages.filter((m) => m.ruleId === "no-restricted-imports").map((m) => m.message));
    }
    process.stdout.write(JSON.stringify(out));`;
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--input-type=module", "-e", program, JSON.stringify(cases)], { cwd: ROOT });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.once("error", reject);
    child.once("close", (code) => (code === 0 ? resolve(JSON.parse(stdout) as string[][]) : reject(new Error(stderr))));
  });
}

describe("the import directions", () => {
  it("refuse a component importing another, lib/ importing a component, and a server importing a client file, and allow the rest", async () => {
    const cases = [
      // Refused.
      { file: "proxy/hub.ts", text: 'import "../supervisor/exposer.js";\n', refused: /never another component's folder/ },
      { file: "stores/image/cache.ts", text: 'import "../log/wal.js";\n', refused: /never another component's folder/ },
      { file: "console/src/pages/jobs.ts", text: 'import "../../../coordinator/text.js";\n', refused: /never another component's folder/ },
      { file: "coordinator/jobs/sweeper.ts", text: 'import "../../testbed/testbed.js";\n', refused: /only testbed\/ composes/ },
      { file: "lib/retry.ts", text: 'export * from "../supervisor/images.js";\n', refused: /lib\/ imports no component/ },
      { file: "stores/image/store.ts", text: 'import "../../lib/image/client.js";\n', refused: /never a client file/ },
      { file: "proxy/rpc-side.ts", text: 'import "../lib/tunnel/client.js";\n', refused: /never a client file/ },
      { file: "lib/server/http.ts", text: 'import "../grpc/client.js";\n', refused: /never a client file/ },
      { file: "lib/tunnel/wire.ts", text: 'import "./client.js";\n', refused: /never a client file/ },
      // Allowed.
      { file: "stores/image/cache.ts", text: 'import "../../lib/image/client.js";\n' },
      { file: "supervisor/exposer.ts", text: 'import "../lib/tunnel/client.js";\n' },
      { file: "proxy/hub.ts", text: 'import "../lib/tunnel/wire.js";\nimport "./splice.js";\n' },
      { file: "coordinator/jobs/sweeper.ts", text: 'import "../db/database.js";\nimport "../../gen/treadmill/coordinator/v1/job_pb.js";\n' },
      { file: "testbed/testbed.ts", text: 'import "../supervisor/supervisor.js";\nimport "../coordinator/coordinator.js";\n' },
    ];
    const results = await lint(cases.map(({ file, text }) => ({ file, text })));
    cases.forEach((c, i) => {
      if (c.refused) expect({ case: c.file, messages: results[i] }).toEqual({ case: c.file, messages: [expect.stringMatching(c.refused)] });
      else expect({ case: c.file, messages: results[i] }).toEqual({ case: c.file, messages: [] });
    });
  });
});
