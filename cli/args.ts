/**
 * tml's command tree on lib/config.ts's field specs and command-line reader:
 * subcommands, `--flag value`, `--flag=value`, short aliases (`-o json`),
 * repeated flags, boolean flags, `--` to end flags, and `-h`/`--help`
 * anywhere. Every problem is a UsageError (exit code 2) that names the flag
 * or argument. `defineCommand` (cli/command.ts) types each command's
 * arguments and flags from these specs.
 */
import { closest, readArgv, type ArgvDialect, type ConfigOf, type FieldSpec } from "../lib/config.js";
import { UsageError } from "./errors.js";

/**
 * A flag of a command: a field spec of a type the command line gives as is
 * (`list`: repeated, one value per flag, commas kept). Its key is its name.
 */
export type FlagSpec = FieldSpec & { readonly type: "string" | "bool" | "list" };
export type FlagSchema = Readonly<Record<string, FlagSpec>>;

export interface ArgSpec {
  readonly name: string;
  readonly required?: boolean;
  /** Takes every remaining argument. */
  readonly variadic?: boolean;
  readonly description?: string;
}

type ArgValue<S extends ArgSpec> = S extends { readonly variadic: true }
  ? readonly string[]
  : S extends { readonly required: true }
    ? string
    : string | undefined;

/** The arguments of a command by name, typed by their specs. */
export type ArgsOf<A extends readonly ArgSpec[]> = { readonly [S in A[number] as S["name"]]: ArgValue<S> };

export type FlagValue = string | boolean | readonly string[] | undefined;

/** A parsed command line: every argument and flag the specs name (bools false and lists empty when not given). */
export interface ParsedCommand {
  readonly args: Readonly<Record<string, string | readonly string[] | undefined>>;
  readonly flags: Readonly<Record<string, FlagValue>>;
}

/** Flags every command takes. */
export const globalFlags = {
  context: { type: "string", placeholder: "NAME", description: "use this saved context instead of the current one" },
  output: {
    type: "string",
    short: "o",
    placeholder: "FORMAT",
    choices: ["table", "json", "yaml"],
    description: "output format: table (default), json or yaml",
  },
  "no-color": { type: "bool", description: "never colour the output (also: NO_COLOR set)" },
  verbose: { type: "bool", short: "v", description: "say more (job run: also the supervisor's log channel)" },
  help: { type: "bool", short: "h", description: "show help for the command" },
} as const satisfies FlagSchema;

export type GlobalFlags = ConfigOf<typeof globalFlags>;

/** What a command's run gets: its arguments and flags (its own and the global ones), typed by its specs. */
export interface Input<A extends readonly ArgSpec[], F extends FlagSchema> {
  readonly args: ArgsOf<A>;
  readonly flags: ConfigOf<F> & GlobalFlags;
}

/** A parsed command line as the specs it was parsed against type it. */
export function inputOf<A extends readonly ArgSpec[], F extends FlagSchema>(parsed: ParsedCommand): Input<A, F> {
  // The one place the types meet the values: parseArgv gave every field of the specs a value of its type.
  return parsed as unknown as Input<A, F>;
}

/** A command as the tree, help and completion see it. */
export interface CommandSpec<C> {
  /** Words after `tml`, e.g. ["job", "run"]. */
  readonly path: readonly string[];
  readonly summary: string;
  readonly description?: string;
  readonly args?: readonly ArgSpec[];
  readonly flags?: FlagSchema;
  readonly examples?: readonly string[];
  run(ctx: C, input: ParsedCommand): Promise<number>;
}

export interface Resolution<C> {
  /** The command found, or undefined when argv names only a group (or nothing). */
  command?: CommandSpec<C>;
  /** The words that named the command or group. */
  path: string[];
  input: ParsedCommand;
}

const DIALECT: ArgvDialect = { shortFlags: true, anyWordIsValue: true };

/** The closest of `candidates` to `word`, when close enough to suggest. */
export function suggest(word: string, candidates: Iterable<string>): string | undefined {
  return closest(word, candidates, Math.max(1, Math.floor(word.length / 2)));
}

/** Words that may follow `path` in the command tree. */
export function childrenOf<C>(commands: readonly CommandSpec<C>[], path: readonly string[]): string[] {
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
export function parseArgv<C>(commands: readonly CommandSpec<C>[], argv: readonly string[]): Resolution<C> {
  // The command path: the leading words that walk the tree (a global flag's value is not one).
  const path: string[] = [];
  const pathWords = new Set<number>();
  let command: CommandSpec<C> | undefined;
  for (const item of readArgv(argv, globalFlags, DIALECT)) {
    if (item.kind !== "argument") continue;
    if (item.afterDashes || command) break;
    const arg = item.value;
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
    pathWords.add(item.index);
    command = commands.find((c) => c.path.length === path.length && c.path.every((w, k) => w === path[k]));
    if (command && childrenOf(commands, path).length > 0) command = undefined;
  }
  const remaining = argv.filter((_, i) => !pathWords.has(i));
  const specs: FlagSchema = { ...globalFlags, ...(command?.flags ?? {}) };
  const { flags, positional } = parseFlags(specs, remaining, command ? `tml ${command.path.join(" ")}` : "tml");
  const args = command && flags.help !== true ? assignArgs(command, positional) : {};
  return { command, path, input: { args, flags } };
}

function parseFlags(specs: FlagSchema, argv: readonly string[], where: string): { flags: Record<string, FlagValue>; positional: string[] } {
  const flags: Record<string, FlagValue> = {};
  const lists = new Map<string, string[]>();
  for (const [name, spec] of Object.entries(specs)) {
    if (spec.type === "bool") flags[name] = false;
    if (spec.type === "list") lists.set(name, []);
  }
  const positional: string[] = [];
  for (const item of readArgv(argv, specs, DIALECT)) {
    switch (item.kind) {
      case "argument":
        positional.push(item.value);
        break;
      case "unknown flag": {
        if (item.short) throw new UsageError(`unknown flag -${item.name} for \`${where}\`; see \`${where} --help\``);
        const hint = suggest(item.name, Object.keys(specs));
        throw new UsageError(`unknown flag --${item.name} for \`${where}\`${hint ? ` (did you mean --${hint}?)` : ""}; see \`${where} --help\``);
      }
      case "missing value": {
        const placeholder = specs[item.key].placeholder;
        throw new UsageError(`flag --${item.key} needs a value${placeholder ? ` (${placeholder})` : ""}`);
      }
      case "switch":
        flags[item.key] = true;
        break;
      case "flag": {
        const { key, value } = item;
        const spec = specs[key];
        if (spec.type === "bool") {
          if (value !== "true" && value !== "false") throw new UsageError(`flag --${key} takes no value (or =true/=false), got "${value}"`);
          flags[key] = value === "true";
          break;
        }
        if (spec.choices && !spec.choices.includes(value)) {
          throw new UsageError(`flag --${key} must be one of ${spec.choices.join(", ")}, got "${value}"`);
        }
        const list = lists.get(key);
        if (list) list.push(value);
        else flags[key] = value;
        break;
      }
    }
  }
  for (const [name, values] of lists) flags[name] = values;
  return { flags, positional };
}

function assignArgs<C>(command: CommandSpec<C>, given: readonly string[]): Record<string, string | readonly string[]> {
  const args: Record<string, string | readonly string[]> = {};
  const where = `tml ${command.path.join(" ")}`;
  let k = 0;
  for (const spec of command.args ?? []) {
    if (spec.variadic) {
      args[spec.name] = given.slice(k);
      if (spec.required && k >= given.length) throw new UsageError(`\`${where}\` needs ${spec.name}; see \`${where} --help\``);
      return args;
    }
    if (k < given.length) args[spec.name] = given[k++];
    else if (spec.required) throw new UsageError(`\`${where}\` needs ${spec.name}; see \`${where} --help\``);
  }
  if (k < given.length) {
    throw new UsageError(`unexpected argument "${given[k]}" for \`${where}\`; see \`${where} --help\``);
  }
  return args;
}

/** `k=v` pairs of a repeated flag as a record; UsageError naming the flag on a bad one. */
export function keyValues(flag: string, values: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const v of values) {
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

/**
 * A time given on the command line, in milliseconds since the epoch: `14:00`
 * or `14:00:30` (the next such local time after `now`: today, or tomorrow
 * once it has passed), a local `2026-12-08 14:00` or `2026-12-08T14:00`, an
 * RFC 3339 time with its offset (`2026-12-08T14:00:00Z`), or `+DURATION`
 * from now (`+90m`). UsageError naming the flag otherwise.
 */
export function parseTime(flag: string, text: string, now: number): number {
  const t = text.trim();
  const bad = () => new UsageError(`flag --${flag} takes a time like 14:00, 2026-12-08T14:00, 2026-12-08T14:00:00Z or +2h, got "${text}"`);
  if (t.startsWith("+")) {
    try {
      return now + parseDuration(flag, t.slice(1));
    } catch {
      throw bad();
    }
  }
  const clock = /^(\d{1,2}):(\d{2})(?::(\d{2}))?$/.exec(t);
  if (clock) {
    const [hours, minutes, seconds] = [Number(clock[1]), Number(clock[2]), Number(clock[3] ?? 0)];
    if (hours > 23 || minutes > 59 || seconds > 59) throw bad();
    const at = new Date(now);
    at.setHours(hours, minutes, seconds, 0);
    if (at.getTime() <= now) at.setDate(at.getDate() + 1);
    return at.getTime();
  }
  const stamp = /^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})?$/i.exec(t);
  if (!stamp) throw bad();
  const [year, month, day, hours, minutes, seconds] = stamp.slice(1, 7).map((x) => Number(x ?? 0));
  if (month < 1 || month > 12 || day < 1 || day > 31 || hours > 23 || minutes > 59 || seconds > 59) throw bad();
  // With an offset it is that instant; without, a local time (as the clock form).
  const local = new Date(year, month - 1, day, hours, minutes, seconds);
  // A day the month does not have (02-30) rolls over in Date: refused instead.
  if (local.getDate() !== day) throw bad();
  const at = stamp[7] === undefined ? local.getTime() : Date.parse(t.replace(" ", "T"));
  if (Number.isNaN(at)) throw bad();
  return at;
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
export function commandHelp<C>(command: CommandSpec<C>): string {
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

function flagLines(flags: FlagSchema): string[] {
  const rows = Object.entries(flags).map(([name, f]) => {
    const left = `${f.short ? `-${f.short}, ` : "    "}--${name}${f.type === "bool" ? "" : ` ${f.placeholder ?? "VALUE"}`}`;
    const repeat = f.type === "list" ? " (repeatable)" : "";
    return [left, f.description + repeat] as const;
  });
  const width = Math.max(...rows.map(([l]) => l.length));
  return rows.map(([l, d]) => `  ${l.padEnd(width)}  ${d}`);
}

/** The help text of a group (or of `tml` itself): its subcommands. */
export function groupHelp<C>(commands: readonly CommandSpec<C>[], path: readonly string[], summaries: Readonly<Record<string, string>>): string {
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
