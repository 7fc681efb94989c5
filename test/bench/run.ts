// `npm run bench -- <name> [<name>...]`: runs the benchmarks named (all when
// none is). Each lives in test/bench/<name>.ts and exports `run(): Promise<void>`
// that prints its figures beside baselines measured in the same run.
import { readdir } from "node:fs/promises";

const here = new URL(".", import.meta.url);
const available = (await readdir(here))
  .filter((f) => f.endsWith(".ts") && !["run.ts", "baselines.ts", "report.ts"].includes(f))
  .map((f) => f.slice(0, -3))
  .sort();
const wanted = process.argv.slice(2);
const unknown = wanted.filter((w) => !available.includes(w));
if (unknown.length > 0) {
  process.stderr.write(`unknown benchmark ${unknown.join(", ")}; available: ${available.join(", ")}\n`);
  process.exit(2);
}
for (const name of wanted.length > 0 ? wanted : available) {
  process.stdout.write(`\n== ${name} ==\n`);
  const bench = (await import(new URL(`${name}.ts`, here).href)) as { run: () => Promise<void> };
  await bench.run();
}
process.exit(0);
