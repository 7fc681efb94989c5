/**
 * Output: aligned tables for people, JSON (stable, for scripts) and YAML.
 * Colour only when the stream is a terminal, NO_COLOR is unset and
 * `--no-color` was not given. Data goes to stdout; progress, notes and
 * errors go to stderr, so `-o json` output stays clean.
 */
import type { Writable } from "node:stream";

export type Format = "table" | "json" | "yaml";

export interface Column<T> {
  header: string;
  value: (row: T) => string;
}

const CODES = { bold: [1, 22], dim: [2, 22], red: [31, 39], green: [32, 39], yellow: [33, 39], cyan: [36, 39] } as const;
export type Style = keyof typeof CODES;

export class Output {
  constructor(
    readonly stdout: Writable & { isTTY?: boolean; columns?: number },
    readonly stderr: Writable & { isTTY?: boolean; columns?: number },
    readonly format: Format,
    private readonly colour: { stdout: boolean; stderr: boolean },
  ) {}

  /** `text` styled for stdout (plain when stdout is not a colour terminal). */
  style(text: string, style: Style): string {
    return this.colour.stdout ? paint(text, style) : text;
  }

  /** `text` styled for stderr. */
  errStyle(text: string, style: Style): string {
    return this.colour.stderr ? paint(text, style) : text;
  }

  /** A line of data on stdout. */
  line(text = ""): void {
    this.stdout.write(text + "\n");
  }

  /** A note for people on stderr (never mixed into data). */
  note(text: string): void {
    this.stderr.write(text + "\n");
  }

  /** Prints data: as JSON or YAML, or by `table()` for the table format. */
  data(value: unknown, table: () => void): void {
    if (this.format === "json") this.line(JSON.stringify(value, null, 2));
    else if (this.format === "yaml") this.stdout.write(toYaml(value));
    else table();
  }

  /** An aligned table with a header row; "No X." on stderr when empty. */
  table<T>(rows: T[], columns: Column<T>[], empty = "Nothing to show."): void {
    if (rows.length === 0) {
      this.note(empty);
      return;
    }
    const cells = rows.map((r) => columns.map((c) => c.value(r)));
    const widths = columns.map((c, i) => Math.max(c.header.length, ...cells.map((row) => row[i].length)));
    const render = (row: string[]) =>
      row
        .map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i])))
        .join("  ")
        .trimEnd();
    this.line(this.style(render(columns.map((c) => c.header)), "bold"));
    for (const row of cells) this.line(render(row));
  }

  /** `key: value` lines, keys aligned, for one record. */
  fields(pairs: [string, string | undefined][]): void {
    const shown = pairs.filter(([, v]) => v !== undefined && v !== "");
    const width = Math.max(0, ...shown.map(([k]) => k.length));
    for (const [k, v] of shown) this.line(`${this.style(`${k}:`.padEnd(width + 1), "bold")} ${v}`);
  }
}

function paint(text: string, style: Style): string {
  const [on, off] = CODES[style];
  return `\u001b[${on}m${text}\u001b[${off}m`;
}

/** Whether colour is wanted on `stream`. */
export function colourWanted(stream: { isTTY?: boolean }, env: Record<string, string | undefined>, noColor: boolean): boolean {
  return stream.isTTY === true && !noColor && env.NO_COLOR === undefined && env.TERM !== "dumb";
}

const PLAIN = /^[A-Za-z_./][A-Za-z0-9_./:@+-]*$/;
const RESERVED = /^(true|false|yes|no|on|off|null|~|y|n)$/i;

function yamlString(s: string): string {
  if (s !== "" && PLAIN.test(s) && !RESERVED.test(s) && !/: /.test(s)) return s;
  return JSON.stringify(s);
}

function yamlKey(k: string): string {
  return /^[A-Za-z_][A-Za-z0-9_.-]*$/.test(k) && !RESERVED.test(k) ? k : JSON.stringify(k);
}

function isScalar(v: unknown): boolean {
  return v === null || v === undefined || typeof v !== "object";
}

function scalar(v: unknown): string {
  if (v === null || v === undefined) return "null";
  if (typeof v === "string") return yamlString(v);
  if (typeof v === "number" || typeof v === "boolean" || typeof v === "bigint") return String(v);
  return JSON.stringify(v);
}

/** A small YAML emitter for plain data (objects, arrays, strings, numbers, booleans, null). */
export function toYaml(value: unknown): string {
  const out: string[] = [];
  const emit = (v: unknown, indent: string): void => {
    if (Array.isArray(v)) {
      for (const item of v) {
        if (isScalar(item)) out.push(`${indent}- ${scalar(item)}`);
        else if (Array.isArray(item) ? item.length === 0 : Object.keys(item as object).length === 0) {
          out.push(`${indent}- ${Array.isArray(item) ? "[]" : "{}"}`);
        } else {
          const start = out.length;
          emit(item, indent + "  ");
          // Put the first line of the item on the dash line.
          out[start] = `${indent}- ${out[start].slice(indent.length + 2)}`;
        }
      }
      return;
    }
    for (const [k, item] of Object.entries(v as Record<string, unknown>)) {
      if (item === undefined) continue;
      if (isScalar(item)) out.push(`${indent}${yamlKey(k)}: ${scalar(item)}`);
      else if (Array.isArray(item) ? item.length === 0 : Object.keys(item as object).length === 0) {
        out.push(`${indent}${yamlKey(k)}: ${Array.isArray(item) ? "[]" : "{}"}`);
      } else {
        out.push(`${indent}${yamlKey(k)}:`);
        emit(item, Array.isArray(item) ? indent : indent + "  ");
      }
    }
  };
  if (isScalar(value)) return scalar(value) + "\n";
  if (Array.isArray(value) && value.length === 0) return "[]\n";
  emit(value, "");
  return out.join("\n") + "\n";
}
