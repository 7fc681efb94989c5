// Run by `npm test` (`node scripts/check.mjs test`), `npm run test:security`
// (`... security`, which needs what `npm test` needs) and `npm run test:interop`
// (`... interop`) before jest starts: exits 1 at once, naming what is missing
// and `npm run setup`, rather than letting tests fail one by one minutes later.
// Plain JavaScript and file checks only, so it costs a few milliseconds.
import { accessSync, constants, existsSync, readFileSync, readdirSync } from "node:fs";
import { delimiter, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
const run = process.argv[2] ?? "test";
const wanted = run === "interop" ? ["test", "interop"] : ["test"];
const command = run === "test" ? "npm test" : `npm run test:${run}`;

/** The requirements file's rows: package, proof, needed by, purpose. */
function requirements() {
  const text = readFileSync(join(root, "scripts", "requirements.txt"), "utf8");
  return text
    .split("\n")
    .filter((line) => line.trim() !== "" && !line.startsWith("#"))
    .map((line) => {
      const [pkg, proof, neededBy, ...purpose] = line.trim().split(/\s+/);
      return { pkg, proof, neededBy, purpose: purpose.join(" ") };
    });
}

function executable(path) {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** An absolute path exists; a bare name is an executable on PATH (or in the sbin directories). */
function present(proof) {
  if (proof.startsWith("/")) return existsSync(proof);
  const dirs = [...(process.env.PATH ?? "").split(delimiter), "/usr/sbin", "/sbin"];
  return dirs.some((dir) => dir !== "" && executable(join(dir, proof)));
}

const missing = requirements()
  .filter((r) => wanted.includes(r.neededBy) && !present(r.proof))
  .map((r) => `  ${r.proof} (Debian package ${r.pkg}): ${r.purpose}`);
if (!existsSync(join(root, "node_modules", "jest"))) missing.unshift("  node_modules (run `npm ci` first)");
// Debian's kernel package is fetched by the qemu tests: apt needs its lists.
const lists = "/var/lib/apt/lists";
if (existsSync(lists) && !readdirSync(lists).some((f) => f.endsWith("_Packages") || f.endsWith("_Packages.lz4"))) {
  missing.push("  apt package lists (apt-get update): the qemu tests download Debian's kernel package");
}
if (missing.length > 0) {
  process.stderr.write(
    `${command} needs what is not installed here:\n${missing.join("\n")}\n` +
      "Run `npm run setup` (it installs them with apt-get, as root or through sudo), then run the tests again.\n",
  );
  process.exit(1);
}
