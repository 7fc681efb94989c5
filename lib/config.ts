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
 * given twice adds up. An empty environment variable counts as unset.
 *
 * Every problem (unknown flag or variable, bad value, missing required setting,
 * value outside the choices) is collected and thrown at once as a ConfigError
 * whose message lists them one per line. Pure: reads only what it is given.
 */

export type FieldType = "string" | "int" | "bool" | "duration" | "list" | "url" | "path";

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
      : ChoiceOf<F>;

/** Bools default to false and lists to empty; other fields without a default may be undefined. */
type IsAlwaysSet<F extends FieldSpec> = F extends { readonly default: unknown }
  ? true
  : F extends { readonly required: true }
    ? true
    : F["type"] extends "bool" | "list"
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
  const byFlag = new Map<string, string>();
  for (const key of Object.keys(schema)) byFlag.set(flagName(key), key);

  // Flags: the raw strings per key, in order (lists add up, others keep the last).
  const fromFlags = new Map<string, string[]>();
  const argv = source.argv;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--help" || arg === "-h") continue;
    if (arg === "--") {
      for (const rest of argv.slice(i + 1)) problems.push(`unexpected argument ${JSON.stringify(rest)}`);
      break;
    }
    if (!arg.startsWith("--") || arg.length === 2) {
      problems.push(`unexpected argument ${JSON.stringify(arg)}`);
      continue;
    }
    const eq = arg.indexOf("=");
    let name = eq === -1 ? arg.slice(2) : arg.slice(2, eq);
    let value: string | undefined = eq === -1 ? undefined : arg.slice(eq + 1);
    let key = byFlag.get(name);
    if (key === undefined && name.startsWith("no-") && value === undefined) {
      const positive = byFlag.get(name.slice(3));
      if (positive !== undefined && schema[positive].type === "bool") {
        key = positive;
        name = name.slice(3);
        value = "false";
      }
    }
    if (key === undefined) {
      const hint = closest(name, [...byFlag.keys()]);
      problems.push(`unknown flag --${name}${hint ? ` (did you mean --${hint}?)` : ""}`);
      continue;
    }
    if (value === undefined) {
      if (schema[key].type === "bool") {
        value = "true";
      } else if (i + 1 < argv.length && !argv[i + 1].startsWith("--")) {
        value = argv[++i];
      } else {
        problems.push(`flag --${name} needs a value`);
        continue;
      }
    }
    const seen = fromFlags.get(key) ?? [];
    seen.push(value);
    fromFlags.set(key, seen);
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
      if (spec.type === "list") {
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
      parsed = { value: spec.type === "bool" ? false : spec.type === "list" ? [] : undefined };
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
      const items = raw
        .split(",")
        .map((s) => s.trim())
        .filter((s) => s !== "");
      for (const item of items) {
        const choice = checkChoice(item);
        if ("problem" in choice) return choice;
      }
      return { value: items };
    }
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

/** The known flag nearest to a mistyped one, if it is close enough to be a typo. */
function closest(name: string, candidates: string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const candidate of candidates) {
    const d = editDistance(name, candidate);
    if (d < bestDistance) {
      best = candidate;
      bestDistance = d;
    }
  }
  return bestDistance <= Math.max(2, Math.floor(name.length / 3)) ? best : undefined;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}
