/**
 * A small command-line parser: a tree of subcommands, `--flag value`,
 * `--flag=value`, short aliases (`-o json`), repeated flags, boolean flags,
 * `--` to end flags, and `-h`/`--help` anywhere. Every problem is a
 * UsageError (exit code 2) that names the flag or argument.
 */
import { UsageError } from "./errors.js";

export type FlagType = "string" | "bool" | "list";

export interface FlagSpec {
  type: FlagType;
  /** One-letter alias, without the dash. */
  short?: string;
  /** Placeholder in help, e.g. "NAME". */
  value?: string;
  description: string;
  /** Allowed values (for string flags). */
  choices?: readonly string[];
}

export interface ArgSpec {
  name: string;
  required?: boolean;
  /** Takes every remaining argument. */
  variadic?: boolean;
  description?: string;
}

export type FlagValues = Record<string, string | boolean | string[] | undefined>;

export interface ParsedCommand {
  /** Positional arguments by name (variadic ones joined in `rest`). */
  args: Record<string, string | undefined>;
  rest: string[];
  flags: FlagValues;
}

export interface CommandSpec<C = unknown> {
  /** Words after `tml`, e.g. ["job", "run"]. */
  path: string[];
  summary: string;
  description?: string;
  args?: ArgSpec[];
  flags?: Record<string, FlagSpec>;
  examples?: string[];
  run(ctx: C, input: ParsedCommand): Promise<number>;
}

/** Flags every command takes. */
export const globalFlags: Record<string, FlagSpec> = {
  context: { type: "string", value: "NAME", description: "use this saved context instead of the current one" },
  output: {
    type: "string",
    short: "o",
    value: "FORMAT",
    choices: ["table", "json", "yaml"],
    description: "output format: table (default), json or yaml",
  },
  "no-color": { type: "bool", description: "never colour the output (also: NO_COLOR set)" },
  verbose: { type: "bool", short: "v", description: "say more (job run: also the supervisor's log channel)" },
  help: { type: "bool", short: "h", description: "show help for the command" },
};

export interface Resolution<C> {
  /** The command found, or undefined when argv names only a group (or nothing). */
  command?: CommandSpec<C>;
  /** The words that named the command or group. */
  path: string[];
  input: ParsedCommand;
}

/** Edit distance with transpositions (optimal string alignment), for "did you mean". */
function distance(a: string, b: string): number {
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

/** The closest of `candidates` to `word`, when close enough to suggest. */
export function suggest(word: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const c of candidates) {
    const d = distance(word, c);
    if (d < bestDistance) {
      best = c;
      bestDistance = d;
    }
  }
  return bestDistance <= Math.max(1, Math.floor(word.length / 2)) ? best : undefined;
}

/** Words that may follow `path` in the command tree. */
export function childrenOf<C>(commands: CommandSpec<C>[], path: string[]): string[] {
  const words = new Set<string>();
  for (const c of commands) {
    if (c.path.length > path.length && path.every((w, i) => c.path[i] === w)) words.add(c.path[path.length]);
  }
  return [...words];
}

/**
 * Finds the command argv names and parses its flags and arguments. Flags may
 * come before, between and after the command's words. Throws UsageError on an
 * unknown command, unknown flag, missing value or argument count.
 */
export function parseArgv<C>(commands: CommandSpec<C>[], argv: string[]): Resolution<C> {
  // First pass: the command path is the leading non-flag words that walk the tree.
  const path: string[] = [];
  const remaining: string[] = [];
  let command: CommandSpec<C> | undefined;
  let i = 0;
  let skipValue = false;
  for (; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--") break;
    if (skipValue) {
      skipValue = false;
      remaining.push(arg);
      continue;
    }
    if (arg.startsWith("-") && arg !== "-") {
      remaining.push(arg);
      // A global flag that takes a value keeps its value out of the path.
      const name = flagName(arg);
      const spec = name === undefined ? undefined : lookupGlobal(name);
      if (spec && spec.type !== "bool" && !arg.includes("=")) skipValue = true;
      continue;
    }
    if (command) break;
    const children = childrenOf(commands, path);
    if (!children.includes(arg)) {
      if (children.length === 0) break;
      if (path.length === 0 && commands.every((c) => c.path.length > 0)) {
        const hint = suggest(arg, children);
        throw new UsageError(`unknown command "${arg}"${hint ? ` (did you mean "${hint}"?)` : ""}; see \`tml --help\``);
      }
      const hint = suggest(arg, children);
      throw new UsageError(
        `unknown command "tml ${[...path, arg].join(" ")}"${hint ? ` (did you mean "${hint}"?)` : ""}; see \`tml ${path.join(" ")} --help\``,
      );
    }
    path.push(arg);
    command = commands.find((c) => c.path.length === path.length && c.path.every((w, k) => w === path[k]));
    if (command && childrenOf(commands, path).length > 0) command = undefined;
  }
  remaining.push(...argv.slice(i));
  const flagSpecs: Record<string, FlagSpec> = { ...globalFlags, ...(command?.flags ?? {}) };
  const input = parseFlags(flagSpecs, remaining, command ? `tml ${command.path.join(" ")}` : "tml");
  if (command && input.flags.help !== true) assignArgs(command, input);
  return { command, path, input };
}

function flagName(arg: string): string | undefined {
  if (arg.startsWith("--")) return arg.slice(2).split("=")[0];
  if (arg.length === 2) return arg.slice(1);
  return undefined;
}

function lookupGlobal(name: string): FlagSpec | undefined {
  if (name in globalFlags) return globalFlags[name];
  return Object.values(globalFlags).find((f) => f.short === name);
}

function parseFlags(specs: Record<string, FlagSpec>, argv: string[], where: string): ParsedCommand {
  const flags: FlagValues = {};
  const positional: string[] = [];
  const byShort = new Map(Object.entries(specs).flatMap(([name, s]) => (s.short ? [[s.short, name] as const] : [])));
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--") {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith("-") || arg === "-") {
      positional.push(arg);
      continue;
    }
    let name: string;
    let value: string | undefined;
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      name = eq < 0 ? arg.slice(2) : arg.slice(2, eq);
      value = eq < 0 ? undefined : arg.slice(eq + 1);
    } else {
      const short = arg.slice(1, 2);
      const long = byShort.get(short);
      if (long === undefined) throw new UsageError(`unknown flag -${short} for \`${where}\`; see \`${where} --help\``);
      name = long;
      value = arg.length > 2 ? arg.slice(2).replace(/^=/, "") : undefined;
    }
    const spec = specs[name];
    if (spec === undefined) {
      const hint = suggest(name, Object.keys(specs));
      throw new UsageError(
        `unknown flag --${name} for \`${where}\`${hint ? ` (did you mean --${hint}?)` : ""}; see \`${where} --help\``,
      );
    }
    if (spec.type === "bool") {
      if (value === undefined || value === "true") flags[name] = true;
      else if (value === "false") flags[name] = false;
      else throw new UsageError(`flag --${name} takes no value (or =true/=false), got "${value}"`);
      continue;
    }
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new UsageError(`flag --${name} needs a value${spec.value ? ` (${spec.value})` : ""}`);
      value = argv[++i];
    }
    if (spec.choices && !spec.choices.includes(value)) {
      throw new UsageError(`flag --${name} must be one of ${spec.choices.join(", ")}, got "${value}"`);
    }
    if (spec.type === "list") flags[name] = [...((flags[name] as string[] | undefined) ?? []), value];
    else flags[name] = value;
  }
  return { args: {}, rest: positional, flags };
}

function assignArgs<C>(command: CommandSpec<C>, input: ParsedCommand): void {
  const specs = command.args ?? [];
  const given = input.rest;
  const where = `tml ${command.path.join(" ")}`;
  let k = 0;
  for (const spec of specs) {
    if (spec.variadic) {
      input.rest = given.slice(k);
      if (spec.required && input.rest.length === 0) throw new UsageError(`\`${where}\` needs ${spec.name}; see \`${where} --help\``);
      return;
    }
    if (k < given.length) input.args[spec.name] = given[k++];
    else if (spec.required) throw new UsageError(`\`${where}\` needs ${spec.name}; see \`${where} --help\``);
  }
  if (k < given.length) {
    throw new UsageError(`unexpected argument "${given[k]}" for \`${where}\`; see \`${where} --help\``);
  }
  input.rest = [];
}

/** `k=v` pairs of a repeated flag as a record; UsageError naming the flag on a bad one. */
export function keyValues(flag: string, values: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const v of values ?? []) {
    const eq = v.indexOf("=");
    if (eq <= 0) throw new UsageError(`flag --${flag} takes key=value, got "${v}"`);
    out[v.slice(0, eq)] = v.slice(eq + 1);
  }
  return out;
}

/**
 * A duration such as `90s`, `15m`, `2h`, `7d`, `500ms` or a bare number of
 * seconds, in milliseconds. UsageError naming the flag otherwise.
 */
export function parseDuration(flag: string, text: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(text.trim());
  if (!match) throw new UsageError(`flag --${flag} takes a duration like 30s, 15m, 2h or 7d, got "${text}"`);
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[match[2] ?? "s"]!;
  return Math.round(Number(match[1]) * unit);
}

/** An integer flag value within [min, max]. */
export function parseIntFlag(flag: string, text: string, min: number, max: number): number {
  if (!/^-?\d+$/.test(text) || Number(text) < min || Number(text) > max) {
    throw new UsageError(`flag --${flag} takes a whole number from ${min} to ${max}, got "${text}"`);
  }
  return Number(text);
}

/** A byte size such as `10M`, `512K`, `1G` or a plain number of bytes. */
export function parseBytes(flag: string, text: string): number {
  const match = /^(\d+(?:\.\d+)?)([KMG]i?B?|B)?$/i.exec(text.trim());
  if (!match) throw new UsageError(`flag --${flag} takes a size like 512K, 10M or 1G, got "${text}"`);
  const unit = (match[2] ?? "B").toUpperCase()[0];
  const factor = { B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[unit]!;
  return Math.round(Number(match[1]) * factor);
}

/** The help text of a command. */
export function commandHelp(command: CommandSpec<unknown>): string {
  const where = `tml ${command.path.join(" ")}`;
  const args = (command.args ?? []).map((a) => {
    const word = a.variadic ? `${a.name}...` : a.name;
    return a.required ? word : `[${word}]`;
  });
  const lines = [`${command.summary}`, "", "Usage:", `  ${[where, ...args].join(" ")}${command.flags ? " [flags]" : ""}`];
  if (command.description) lines.push("", ...command.description.split("\n"));
  const described = (command.args ?? []).filter((a) => a.description);
  if (described.length > 0) {
    lines.push("", "Arguments:");
    const width = Math.max(...described.map((a) => a.name.length));
    for (const a of described) lines.push(`  ${a.name.padEnd(width)}  ${a.description}`);
  }
  if (command.flags && Object.keys(command.flags).length > 0) lines.push("", "Flags:", ...flagLines(command.flags));
  lines.push("", "Global flags:", ...flagLines(globalFlags));
  if (command.examples && command.examples.length > 0) {
    lines.push("", "Examples:", ...command.examples.map((e) => `  ${e}`));
  }
  return lines.join("\n") + "\n";
}

function flagLines(flags: Record<string, FlagSpec>): string[] {
  const rows = Object.entries(flags).map(([name, f]) => {
    const left = `${f.short ? `-${f.short}, ` : "    "}--${name}${f.type === "bool" ? "" : ` ${f.value ?? "VALUE"}`}`;
    const repeat = f.type === "list" ? " (repeatable)" : "";
    return [left, f.description + repeat] as const;
  });
  const width = Math.max(...rows.map(([l]) => l.length));
  return rows.map(([l, d]) => `  ${l.padEnd(width)}  ${d}`);
}

/** The help text of a group (or of `tml` itself): its subcommands. */
export function groupHelp<C>(commands: CommandSpec<C>[], path: string[], summaries: Record<string, string>): string {
  const where = ["tml", ...path].join(" ");
  const children = childrenOf(commands, path);
  const rows = children.map((word) => {
    const full = [...path, word];
    const exact = commands.find((c) => c.path.join(" ") === full.join(" "));
    return [word, exact?.summary ?? summaries[full.join(" ")] ?? ""] as const;
  });
  const width = Math.max(...rows.map(([w]) => w.length));
  const lines = [
    path.length === 0 ? "tml: the Treadmill command-line client" : (summaries[path.join(" ")] ?? where),
    "",
    "Usage:",
    `  ${where} COMMAND [flags]`,
    "",
    "Commands:",
    ...rows.map(([w, s]) => `  ${w.padEnd(width)}  ${s}`),
    "",
    "Global flags:",
    ...flagLines(globalFlags),
    "",
    `Run \`${where} COMMAND --help\` for a command's flags and examples.`,
  ];
  return lines.join("\n") + "\n";
}
