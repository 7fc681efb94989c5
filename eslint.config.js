import js from "@eslint/js";
import globals from "globals";
import tseslint from "typescript-eslint";

/**
 * Import directions (DESIGN.md §1, lib/*\/README.md): a component imports
 * gen/ and lib/, never another component's folder, and only testbed/
 * composes several; lib/ imports no component; a server (and a wire file,
 * which both sides import) never imports a `lib/<folder>/client*` file.
 * no-restricted-imports matches the specifier as written, so each rule is
 * spelt for the depth of the importing file: `../` repeated until the
 * specifier reaches the root (or `stores/`), then the forbidden folder.
 */
const COMPONENTS = ["coordinator", "stores/image", "stores/log", "proxy", "supervisor", "cli", "console"];
const SERVERS = ["coordinator", "stores/image", "stores/log", "proxy"];
const SOURCE = "{ts,tsx,js,mjs}";
const DEEPEST = 5;
const COMPOSE = "a component imports gen/ and lib/, never another component's folder; only testbed/ composes (DESIGN.md §1)";
const LIB = "lib/ imports no component and not testbed/: it is what components share (DESIGN.md §1)";
const CLIENT = "a server (or a wire file) imports lib/<folder>/wire.ts and the vocabulary, never a client file (lib/grpc/README.md)";

const escape = (s) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
/** A specifier going up `m` folders: `./` for none. */
const up = (m) => (m === 0 ? "\\./" : `(\\.\\./){${m}}`);
const folders = (path) => path.split("/").length;

/** Patterns that keep a file `depth` folders deep inside `owner` out of every other component (and testbed/). */
function componentPatterns(owner, depth, message) {
  const patterns = [];
  const ownerDepth = folders(owner);
  for (let j = 0; j < ownerDepth; j++) {
    // Going up to the owner's ancestor at depth j, then down into a folder that is not the owner.
    const ancestor = owner.split("/").slice(0, j).join("/");
    const targets = [...COMPONENTS, "testbed"]
      .filter((c) => c !== owner && (ancestor === "" || c.startsWith(`${ancestor}/`)))
      .filter((c) => !owner.startsWith(`${c}/`))
      .map((c) => escape(ancestor === "" ? c : c.slice(ancestor.length + 1)));
    if (targets.length > 0) patterns.push({ regex: `^${up(depth - j)}(${targets.join("|")})(/|\\.js$|$)`, message });
  }
  return patterns;
}

/** Patterns that keep a file `depth` folders deep (inside lib/ or not) out of `lib/<folder>/client*`. */
function clientPatterns(depth, inLib) {
  const patterns = [{ regex: `^${up(depth)}lib/[^/]+/client[^/]*$`, message: CLIENT }];
  if (inLib) patterns.push({ regex: `^${up(depth - 1)}[^/]+/client[^/]*$`, message: CLIENT });
  if (inLib && depth >= 2) patterns.push({ regex: `^${up(depth - 2)}client[^/]*$`, message: CLIENT });
  return patterns;
}

const restrict = (files, patterns) => ({ files, rules: { "no-restricted-imports": ["error", { patterns }] } });
const filesAt = (owner, depth) => [`${owner}/${"*/".repeat(depth - folders(owner))}*.${SOURCE}`];

const directions = [];
for (const owner of [...COMPONENTS, "lib"]) {
  for (let depth = folders(owner); depth <= DEEPEST; depth++) {
    const message = owner === "lib" ? LIB : COMPOSE;
    const server = SERVERS.includes(owner);
    directions.push(
      restrict(filesAt(owner, depth), [...componentPatterns(owner, depth, message), ...(server ? clientPatterns(depth, false) : [])]),
    );
  }
}
// lib/'s server side and its wire files: no client either.
directions.push(restrict([`lib/server.ts`], [...componentPatterns("lib", 1, LIB), ...clientPatterns(1, true)]));
directions.push(
  restrict(
    [`lib/server/*.${SOURCE}`, `lib/grpc/server.ts`, `lib/*/wire.ts`],
    [...componentPatterns("lib", 2, LIB), ...clientPatterns(2, true)],
  ),
);
// A cache fetches from and pushes to other stores: its upstream side is a client of them.
directions.push(restrict(["stores/image/cache.ts"], componentPatterns("stores/image", 2, COMPOSE)));

export default tseslint.config(
  { ignores: ["gen/**", "node_modules/**", "console/dist/**", "dist/**", "dist.*/**", "test/interop/python/gen/**"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { ...globals.node } },
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
      "no-constant-condition": ["error", { checkLoops: false }],
    },
  },
  ...directions,
);
