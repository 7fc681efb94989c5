/**
 * Configuration shared by every component: one schema per component, values
 * from flags, then the environment, then the schema's defaults.
 *
 * A key `fooBarMs` of component `image-store` is read from the flag
 * `--foo-bar-ms=V` (or `--foo-bar-ms V`) and from the environment variable
 * `TREADMILL_IMAGE_STORE_FOO_BAR_MS`; a field may name another variable
 * (`env: "DATABASE_URL"`). Boolean flags are `--x` and `--no-x`. Durations are
 * milliseconds, in keys named `...Ms`: a plain integer, or `250ms`, `5s`, `2m`,
 * `1h`, `1d`, or a sum such as `1m30s`. Lists are comma-separated; a list flag
 * given twice adds up. A `urls` field is a list of http(s) URLs (the replicas
 * of one service, in order of preference). An empty environment variable
 * counts as unset.
 *
 * Every problem (unknown flag or variable, bad value, missing required setting,
 * value outside the choices) is collected and thrown at once as a ConfigError
 * whose message lists them one per line. Pure: reads only what it is given.
 *
 * The same field specs and the same command-line reader (`readArgv`) serve
 * the CLI's commands (cli/args.ts), which add short flags and arguments.
 */

export type FieldType = "string" | "int" | "bool" | "duration" | "list" | "url" | "urls" | "path";

/** One setting of a component. */
export interface FieldSpec {
  readonly type: FieldType;
  /** One line for `--help`. */
  readonly description: string;
  /** Used when neither a flag nor the environment sets it; taken as is. */
  readonly default?: unknown;
  /** Without a default, a missing value is a problem. */
  readonly required?: boolean;
  /** Allowed values (string, and each element of a list). */
  readonly choices?: readonly string[];
  /** Never echoed in errors, usage or `redactConfig`. */
  readonly secret?: boolean;
  /** The environment variable to read instead of `TREADMILL_<COMPONENT>_<KEY>`. */
  readonly env?: string;
  /** Inclusive bounds for int and duration fields. */
  readonly min?: number;
  readonly max?: number;
  /** A one-letter alias (`-o`), on command lines that take them (the CLI's). */
  readonly short?: string;
  /** The value's placeholder in the CLI's help, e.g. "NAME". */
  readonly placeholder?: string;
}

export type ConfigSchema = Readonly<Record<string, FieldSpec>>;

type ChoiceOf<F extends FieldSpec> = F["choices"] extends readonly (infer C extends string)[] ? C : string;

/** The loaded type of one field. */
export type ValueOf<F extends FieldSpec> = F["type"] extends "int" | "duration"
  ? number
  : F["type"] extends "bool"
    ? boolean
    : F["type"] extends "list"
      ? readonly ChoiceOf<F>[]
      : F["type"] extends "urls"
        ? readonly string[]
        : ChoiceOf<F>;

/** Bools default to false and lists to empty; other fields without a default may be undefined. */
type IsAlwaysSet<F extends FieldSpec> = F extends { readonly default: unknown }
  ? true
  : F extends { readonly required: true }
    ? true
    : F["type"] extends "bool" | "list" | "urls"
      ? true
      : false;

/** The loaded config of a schema. */
export type ConfigOf<S extends ConfigSchema> = {
  readonly [K in keyof S]: IsAlwaysSet<S[K]> extends true ? ValueOf<S[K]> : ValueOf<S[K]> | undefined;
};

/** Where settings come from; `argv` excludes the node binary and script. */
export interface ConfigSource {
  env: NodeJS.ProcessEnv | Record<string, string | undefined>;
  argv: readonly string[];
}

/** Every problem found while loading a config; `message` lists them one per line. */
export class ConfigError extends Error {
  override readonly name = "ConfigError";
  readonly problems: readonly string[];

  constructor(problems: readonly string[]) {
    super(problems.join("\n"));
    this.problems = problems;
  }
}

/** `fooBarMs` -> `foo-bar-ms`. */
export function flagName(key: string): string {
  return key
    .replace(/([a-z0-9])([A-Z])/g, "$1-$2")
    .replace(/([A-Z])([A-Z][a-z])/g, "$1-$2")
    .toLowerCase();
}

/** The prefix of a component's environment variables: `image-store` -> `TREADMILL_IMAGE_STORE_`. */
export function envPrefix(component: string): string {
  return `TREADMILL_${component.replace(/[^A-Za-z0-9]+/g, "_").toUpperCase()}_`;
}

/** The environment variable a field is read from. */
export function envName(component: string, key: string, spec: FieldSpec): string {
  return spec.env ?? envPrefix(component) + flagName(key).replace(/-/g, "_").toUpperCase();
}

/** Whether argv asks for help (`--help` or `-h` before any `--`). */
export function wantsHelp(argv: readonly string[]): boolean {
  for (const arg of argv) {
    if (arg === "--") return false;
    if (arg === "--help" || arg === "-h") return true;
  }
  return false;
}

/** Loads a component's config; throws a ConfigError listing every problem. */
export function loadConfig<const S extends ConfigSchema>(
  component: string,
  schema: S,
  source: ConfigSource,
): Readonly<ConfigOf<S>> {
  const problems: string[] = [];

  // Flags: the raw strings per key, in order (lists add up, others keep the last).
  const fromFlags = new Map<string, string[]>();
  const add = (key: string, value: string) => fromFlags.set(key, [...(fromFlags.get(key) ?? []), value]);
  for (const item of readArgv(source.argv, schema, { negation: true, skip: ["--help", "-h"] })) {
    switch (item.kind) {
      case "argument":
        problems.push(`unexpected argument ${JSON.stringify(item.value)}`);
        break;
      case "unknown flag": {
        const hint = closest(item.name, Object.keys(schema).map(flagName), Math.max(2, Math.floor(item.name.length / 3)));
        problems.push(`unknown flag --${item.name}${hint ? ` (did you mean --${hint}?)` : ""}`);
        break;
      }
      case "missing value":
        problems.push(`flag --${item.name} needs a value`);
        break;
      case "switch":
        add(item.key, "true");
        break;
      case "flag":
        add(item.key, item.value);
        break;
    }
  }

  // Environment variables with our prefix that no field reads are typos.
  const prefix = envPrefix(component);
  const known = new Set(Object.entries(schema).map(([key, spec]) => envName(component, key, spec)));
  for (const name of Object.keys(source.env)) {
    if (name.startsWith(prefix) && !known.has(name) && source.env[name] !== undefined) {
      problems.push(`unknown environment variable ${name}`);
    }
  }

  const config: Record<string, unknown> = {};
  for (const [key, spec] of Object.entries(schema)) {
    const env = envName(component, key, spec);
    const flagValues = fromFlags.get(key);
    let parsed: Parsed;
    if (flagValues !== undefined) {
      const where = `--${flagName(key)}`;
      if (spec.type === "list" || spec.type === "urls") {
        const parts = flagValues.map((v) => parse(spec, v, where));
        const bad = parts.find((p) => "problem" in p);
        parsed = bad ?? { value: parts.flatMap((p) => ("value" in p ? (p.value as string[]) : [])) };
      } else {
        parsed = parse(spec, flagValues[flagValues.length - 1], where);
      }
    } else if (source.env[env] !== undefined && source.env[env] !== "") {
      parsed = parse(spec, source.env[env] as string, env);
    } else if ("default" in spec) {
      parsed = { value: spec.default };
    } else if (spec.required) {
      problems.push(`missing required setting --${flagName(key)} (or ${env}): ${spec.description}`);
      continue;
    } else {
      parsed = { value: spec.type === "bool" ? false : spec.type === "list" || spec.type === "urls" ? [] : undefined };
    }
    if ("problem" in parsed) {
      problems.push(parsed.problem);
      continue;
    }
    config[key] = Array.isArray(parsed.value) ? Object.freeze([...parsed.value]) : parsed.value;
  }

  if (problems.length > 0) throw new ConfigError(problems);
  return Object.freeze(config) as ConfigOf<S>;
}

type Parsed = { value: unknown } | { problem: string };

function parse(spec: FieldSpec, raw: string, where: string): Parsed {
  const shown = spec.secret ? "value" : JSON.stringify(raw);
  const bad = (what: string): Parsed => ({ problem: `${where}: ${shown} is not ${what}` });
  const checkBounds = (n: number, unit: string): Parsed => {
    if (spec.min !== undefined && n < spec.min) return { problem: `${where}: ${shown} is below the minimum ${spec.min}${unit}` };
    if (spec.max !== undefined && n > spec.max) return { problem: `${where}: ${shown} is above the maximum ${spec.max}${unit}` };
    return { value: n };
  };
  const checkChoice = (v: string): Parsed =>
    spec.choices && !spec.choices.includes(v)
      ? { problem: `${where}: ${spec.secret ? "value" : JSON.stringify(v)} is not one of ${spec.choices.join(", ")}` }
      : { value: v };
  const text = raw.trim();
  switch (spec.type) {
    case "string":
      return checkChoice(raw);
    case "path":
      return { value: text };
    case "url": {
      if (text === "") return { value: "" };
      try {
        new URL(text);
      } catch {
        return bad("a url");
      }
      return { value: text };
    }
    case "int": {
      if (!/^[+-]?\d+$/.test(text)) return bad("an integer");
      const n = Number(text);
      if (!Number.isSafeInteger(n)) return bad("a safe integer");
      return checkBounds(n, "");
    }
    case "bool": {
      const v = text.toLowerCase();
      if (["true", "1", "yes", "on"].includes(v)) return { value: true };
      if (["false", "0", "no", "off"].includes(v)) return { value: false };
      return bad("a boolean (true or false)");
    }
    case "duration": {
      const ms = parseDuration(text);
      if (ms === undefined) return bad("a duration (milliseconds, or like 250ms, 5s, 2m, 1h)");
      return checkBounds(ms, " ms");
    }
    case "list": {
      const items = splitList(raw);
      for (const item of items) {
        const choice = checkChoice(item);
        if ("problem" in choice) return choice;
      }
      return { value: items };
    }
    case "urls": {
      const urls = splitList(raw);
      const wrong = urls.find((url) => !isHttpUrl(url));
      if (wrong !== undefined) return { problem: `${where}: ${spec.secret ? "value" : JSON.stringify(wrong)} is not an http(s) url` };
      return { value: urls };
    }
  }
}

/** `" a, b ,,c"` -> `["a", "b", "c"]`: the comma-separated items of a list, blanks dropped. */
export function splitList(raw: string): string[] {
  return raw
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s !== "");
}

/** Whether `text` is an absolute http:// or https:// URL with a host. */
export function isHttpUrl(text: string): boolean {
  try {
    const url = new URL(text);
    return (url.protocol === "http:" || url.protocol === "https:") && url.hostname !== "";
  } catch {
    return false;
  }
}

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** `"1500"`, `"250ms"`, `"5s"`, `"1m30s"`, `"1.5h"` -> milliseconds; undefined if malformed. */
export function parseDuration(text: string): number | undefined {
  if (/^\d+$/.test(text)) {
    const n = Number(text);
    return Number.isSafeInteger(n) ? n : undefined;
  }
  if (!/^(\d+(\.\d+)?(ms|s|m|h|d))+$/.test(text)) return undefined;
  let total = 0;
  for (const [, n, , unit] of text.matchAll(/(\d+(\.\d+)?)(ms|s|m|h|d)/g)) total += Number(n) * UNIT_MS[unit];
  const ms = Math.round(total);
  return Number.isSafeInteger(ms) ? ms : undefined;
}

/** The usage text of a component: one entry per flag, with its variable and default. */
export function usage(component: string, schema: ConfigSchema): string {
  const lines = [`Usage: treadmill-${component} [flags]`, "", "Flags (each can also be set by the environment variable shown):"];
  const entries = Object.entries(schema).map(([key, spec]) => {
    const placeholder = spec.type === "bool" ? "" : `=${spec.choices ? spec.choices.join("|") : spec.type.toUpperCase()}`;
    const flag = spec.type === "bool" ? `--[no-]${flagName(key)}` : `--${flagName(key)}${placeholder}`;
    return { key, spec, flag };
  });
  const width = Math.min(28, Math.max(...entries.map((e) => e.flag.length), "--help".length));
  const pad = (s: string) => s.padEnd(width);
  lines.push(`  ${pad("--help")}  print this text and exit`);
  for (const { key, spec, flag } of entries) {
    let tail = "";
    if (spec.required && !("default" in spec)) tail = " (required)";
    else if ("default" in spec && !spec.secret && !isEmptyDefault(spec.default)) tail = ` (default ${showDefault(spec)})`;
    const head = flag.length > width ? `  ${flag}\n  ${pad("")}  ` : `  ${pad(flag)}  `;
    lines.push(`${head}${spec.description}${tail}`);
    lines.push(`  ${pad("")}  env ${envName(component, key, spec)}`);
  }
  return lines.join("\n");
}

function isEmptyDefault(value: unknown): boolean {
  return value === "" || value === undefined || (Array.isArray(value) && value.length === 0);
}

function showDefault(spec: FieldSpec): string {
  const value = spec.default;
  if (spec.type === "duration" && typeof value === "number") return `${value} ms`;
  if (Array.isArray(value)) return value.join(",");
  return typeof value === "string" ? JSON.stringify(value) : String(value);
}

/** A copy of a loaded config safe to log: secret fields replaced when set. */
export function redactConfig<S extends ConfigSchema>(schema: S, config: ConfigOf<S>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(config)) {
    const secret = schema[key]?.secret && value !== undefined && value !== "";
    out[key] = secret ? "[redacted]" : value;
  }
  return out;
}

/** How a command line is read: the components' (loadConfig) and the CLI's (cli/args.ts) differ only in these. */
export interface ArgvDialect {
  /** Fields' `short` letters are flags (`-o json`, `-ojson`, `-o=json`); otherwise a word with one dash is an argument. */
  readonly shortFlags?: boolean;
  /** `--no-x` sets the bool field x to false. */
  readonly negation?: boolean;
  /** A flag's value may be the next word even when it starts with `--` (otherwise the value is missing). */
  readonly anyWordIsValue?: boolean;
  /** Words passed over wherever they stand before `--` (the components' `--help`, which wantsHelp reads). */
  readonly skip?: readonly string[];
}

/** One thing a command line says, in the order it says it. */
export type ArgvItem =
  /** A flag of field `key` with its value; `name` is the flag as written (the long name, or the short letter). */
  | { readonly kind: "flag"; readonly key: string; readonly name: string; readonly value: string }
  /** A bool flag given without `=value`. */
  | { readonly kind: "switch"; readonly key: string; readonly name: string }
  /** A word that is not a flag; `afterDashes` when it came after `--`. */
  | { readonly kind: "argument"; readonly value: string; readonly index: number; readonly afterDashes: boolean }
  | { readonly kind: "unknown flag"; readonly name: string; readonly short: boolean }
  | { readonly kind: "missing value"; readonly key: string; readonly name: string };

/**
 * Reads a command line against field specs (`--foo-bar` is field `fooBar`):
 * the one flag parser of the tree. Finds no fault itself: the caller words
 * (and collects, or throws at the first of) the unknown flags and missing
 * values, and checks the values.
 */
export function readArgv(argv: readonly string[], schema: ConfigSchema, dialect: ArgvDialect = {}): ArgvItem[] {
  const byFlag = new Map<string, string>();
  const byShort = new Map<string, string>();
  for (const [key, spec] of Object.entries(schema)) {
    byFlag.set(flagName(key), key);
    if (dialect.shortFlags && spec.short !== undefined) byShort.set(spec.short, key);
  }
  const items: ArgvItem[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (dialect.skip?.includes(arg)) continue;
    if (arg === "--") {
      for (let j = i + 1; j < argv.length; j++) items.push({ kind: "argument", value: argv[j], index: j, afterDashes: true });
      break;
    }
    const long = arg.startsWith("--");
    if (!long && !(dialect.shortFlags && arg.startsWith("-") && arg !== "-")) {
      items.push({ kind: "argument", value: arg, index: i, afterDashes: false });
      continue;
    }
    let name: string;
    let value: string | undefined;
    let key: string | undefined;
    if (long) {
      const eq = arg.indexOf("=");
      name = eq === -1 ? arg.slice(2) : arg.slice(2, eq);
      value = eq === -1 ? undefined : arg.slice(eq + 1);
      key = byFlag.get(name);
      const positive = byFlag.get(name.slice(3));
      if (key === undefined && dialect.negation && name.startsWith("no-") && value === undefined && positive !== undefined && schema[positive].type === "bool") {
        items.push({ kind: "flag", key: positive, name: name.slice(3), value: "false" });
        continue;
      }
    } else {
      name = arg.slice(1, 2);
      value = arg.length > 2 ? arg.slice(2).replace(/^=/, "") : undefined;
      key = byShort.get(name);
    }
    if (key === undefined) {
      items.push({ kind: "unknown flag", name, short: !long });
    } else if (value !== undefined) {
      items.push({ kind: "flag", key, name, value });
    } else if (schema[key].type === "bool") {
      items.push({ kind: "switch", key, name });
    } else if (i + 1 < argv.length && (dialect.anyWordIsValue || !argv[i + 1].startsWith("--"))) {
      items.push({ kind: "flag", key, name, value: argv[++i] });
    } else {
      items.push({ kind: "missing value", key, name });
    }
  }
  return items;
}

/** The candidate nearest to a mistyped word, if within `maxDistance` edits (the first of equals wins). */
export function closest(word: string, candidates: Iterable<string>, maxDistance: number): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const candidate of candidates) {
    const d = editDistance(word, candidate);
    if (d < bestDistance) {
      best = candidate;
      bestDistance = d;
    }
  }
  return bestDistance <= maxDistance ? best : undefined;
}

/** Edit distance with transpositions (optimal string alignment): "hsot" is one edit from "host". */
export function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}
