/**
 * Job files (docs/job-files.md): a YAML file that mirrors JobSpec, with
 * variables (`${name}`, given by `--set`, the file's `variables:` or its
 * matrix) and a matrix (one job per combination of its values). Pure, so
 * that `tml` and the web console read a file alike: parsing, expansion into
 * specs, the file of a spec (`tml job get -o yaml`) and the file's JSON
 * Schema (`tml job schema`) all follow one table of keys, FIELDS; a new
 * JobSpec field is one line there (a test checks that every field has one).
 *
 * Errors are JobFileError: the file's name, the line, the key's path and
 * what is wrong ("job.yaml:7: hosts.count: expected an integer").
 */
import { fromJson, toJson, type JsonObject, type JsonValue } from "@bufbuild/protobuf";
import { Document, LineCounter, type Node, isMap, isScalar, isSeq, parseDocument } from "yaml";
import { DriverKind } from "../gen/treadmill/coordinator/v1/host_pb.js";
import { type JobSpec, JobSpecSchema, RetryCondition } from "../gen/treadmill/coordinator/v1/job_pb.js";
import { parseDuration } from "./config.js";

/** At most this many jobs from one file's matrix. */
export const MAX_MATRIX_JOBS = 64;

/** A problem with a job file, where it is. */
export class JobFileError extends Error {
  constructor(
    readonly source: string,
    readonly line: number | undefined,
    readonly path: string,
    readonly problem: string,
  ) {
    super(`${source}${line === undefined ? "" : `:${line}`}: ${path === "" ? "" : `${path}: `}${problem}`);
    this.name = "JobFileError";
  }
}

/** One job of a file: its matrix values (empty without a matrix) and its spec. */
export interface FileJob {
  /** The matrix's values of this job, in the matrix's key order. */
  matrix: Record<string, string>;
  spec: JobSpec;
}

export interface ReadOptions {
  /** The file's name in errors. */
  source?: string;
  /** `--set` variables; they win over the file's `variables:`. */
  set?: Record<string, string>;
  /** Values of the file's `${secret:NAME}` placeholders. */
  secrets?: Record<string, string>;
}

/** What a key of the file holds, and how it maps to JobSpec's proto JSON. */
type Kind =
  | { t: "string"; pattern?: string }
  | { t: "int"; min: number; max: number }
  | { t: "bool" }
  | { t: "duration" }
  | { t: "labels" }
  | { t: "enum"; words: Record<string, number> }
  | { t: "enums"; words: Record<string, number> }
  | { t: "object"; fields: Field[] }
  | { t: "parameters"; secret: boolean }
  | { t: "ports" }
  /** Proto JSON of a JobSpec field, passed through as written (fields other parts of Treadmill define). */
  | { t: "proto" };

interface Field {
  /** The key in the file. */
  key: string;
  /** Where it goes in JobSpec's proto JSON, dotted. */
  to: string;
  kind: Kind;
  description: string;
}

/** `DRIVER_KIND_PROCESS` -> `process`, `RETRY_CONDITION_WORKLOAD_FAILURE` -> `workload-failure`. */
function words(e: Record<string, string | number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [name, v] of Object.entries(e)) {
    if (typeof v === "number" && v !== 0) out[name.toLowerCase().replaceAll("_", "-")] = v;
  }
  return out;
}

const NAME = "^[A-Za-z_][A-Za-z0-9_]{0,63}$";

/** Every key of a job file. Its order is the order `fileOf` writes them. */
const FIELDS: Field[] = [
  { key: "image", to: "image", kind: { t: "string" }, description: "the image: name:tag from the catalog, or a manifest digest" },
  { key: "description", to: "description", kind: { t: "string" }, description: "free text shown in listings, at most 256 characters" },
  { key: "labels", to: "tags", kind: { t: "labels" }, description: "the job's own labels (key: value), for filtering; a matrix adds its keys" },
  {
    key: "hosts",
    to: "hosts",
    description: "the hosts the job needs",
    kind: {
      t: "object",
      fields: [
        { key: "tags", to: "tags", kind: { t: "labels" }, description: "every host must carry these tags" },
        { key: "count", to: "hostCount", kind: { t: "int", min: 1, max: 64 }, description: "how many hosts, co-allocated (default 1)" },
        { key: "site", to: "site", kind: { t: "string" }, description: "only hosts of this site" },
        { key: "driver", to: "driverKind", kind: { t: "enum", words: words(DriverKind) }, description: "only hosts with this driver" },
      ],
    },
  },
  { key: "priority", to: "priority", kind: { t: "int", min: -100, max: 100 }, description: "-100 to 100, higher first (default 0)" },
  { key: "timeout", to: "jobTimeout", kind: { t: "duration" }, description: "longest run of one attempt, from its assignment, e.g. 30m" },
  { key: "queue_timeout", to: "queueTimeout", kind: { t: "duration" }, description: "longest wait for hosts, e.g. 1h" },
  { key: "parameters", to: "parameters", kind: { t: "parameters", secret: false }, description: "parameters for the workload (NAME: value)" },
  {
    key: "secrets",
    to: "parameters",
    kind: { t: "parameters", secret: true },
    description: "secret parameters (NAME: value); a value ${secret:NAME} is given with --secret or --secret-file",
  },
  { key: "ports", to: "exposedPorts", kind: { t: "ports" }, description: "ports to expose (name: port, or name: {port, description})" },
  { key: "restarts", to: "restartPolicy.maxRestarts", kind: { t: "int", min: 0, max: 10 }, description: "re-queues after an infrastructure failure" },
  {
    key: "retry",
    to: "retry",
    description: "new attempts after the workload's failure or a failed start, each with a fresh timeout",
    kind: {
      t: "object",
      fields: [
        { key: "on", to: "on", kind: { t: "enums", words: words(RetryCondition) }, description: "the ends that cause a retry" },
        { key: "max", to: "max", kind: { t: "int", min: 1, max: 10 }, description: "retries per condition" },
        { key: "other_host", to: "otherHost", kind: { t: "bool" }, description: "run a retry on a host no earlier attempt ran on" },
      ],
    },
  },
  { key: "hold_on_failure", to: "holdOnFailure", kind: { t: "duration" }, description: "keep a failed job's host this long for a post-mortem" },
  { key: "lease", to: "leaseId", kind: { t: "string" }, description: "run inside this lease of yours" },
  { key: "results", to: "results", kind: { t: "proto" }, description: "how the job reports test results (docs/results.md)" },
  { key: "artifacts", to: "artifacts", kind: { t: "proto" }, description: "files the job keeps (docs/artifacts.md)" },
  { key: "inputs", to: "inputs", kind: { t: "proto" }, description: "files given to the job (docs/artifacts.md)" },
];

/** The JobSpec fields of this build by JSON name: a `proto` key whose field is missing is refused. */
const SPEC_FIELDS = new Set(JobSpecSchema.fields.map((f) => f.jsonName));

/** Keys of the file that are not JobSpec's. */
const FILE_KEYS = ["variables", "matrix"];

/** The JobSpec fields (by JSON name) the job file does not cover; empty when FIELDS is complete. */
export function uncoveredSpecFields(): string[] {
  const covered = new Set(FIELDS.map((f) => f.to.split(".")[0]));
  return [...SPEC_FIELDS].filter((f) => !covered.has(f));
}

const VARIABLE = /\$\$\{|\$\{([^}]*)\}/g;
const VARIABLE_NAME = /^[A-Za-z_][A-Za-z0-9_.-]*$/;
const SECRET_REF = /^secret:([A-Za-z_][A-Za-z0-9_]{0,63})$/;

/** Reads one file for one set of variables. */
class Reader {
  constructor(
    private readonly source: string,
    private readonly lines: LineCounter,
    private readonly vars: Record<string, string>,
    private readonly secrets: Record<string, string>,
  ) {}

  fail(node: Node | null | undefined, path: string, problem: string): never {
    const offset = node?.range?.[0];
    throw new JobFileError(this.source, offset === undefined ? undefined : this.lines.linePos(offset).line, path, problem);
  }

  /** A scalar's text with its variables replaced; `whole`: it was one `${name}` and nothing else. */
  text(node: Node | null, path: string, secretAllowed = false): { text: string; whole: boolean } {
    if (!isScalar(node) || node.value === null || typeof node.value === "object") this.fail(node, path, "expected a value");
    const raw = node.value;
    if (typeof raw !== "string") return { text: String(raw), whole: false };
    const whole = /^\$\{[^}]*\}$/.test(raw);
    const text = raw.replace(VARIABLE, (match, name: string | undefined) => {
      if (name === undefined) return "${";
      const secret = SECRET_REF.exec(name);
      if (secret) {
        if (!secretAllowed) this.fail(node, path, `\${${name}} may only be the value of a key under secrets:`);
        const value = this.secrets[secret[1]];
        if (value === undefined) this.fail(node, path, `secret ${secret[1]} has no value: give it with --secret ${secret[1]}=VALUE or --secret-file ${secret[1]}=PATH`);
        return value;
      }
      if (!VARIABLE_NAME.test(name)) this.fail(node, path, `"${match}" is not a variable reference (\${name}; $\${ for a literal \${)`);
      const value = this.vars[name];
      if (value === undefined) this.fail(node, path, `variable \${${name}} is not defined: give it with --set ${name}=VALUE, under variables:, or in matrix:`);
      return value;
    });
    return { text, whole };
  }

  /** The entries of a mapping, keys as written (never substituted). */
  entries(node: Node | null, path: string): [string, Node | null, Node][] {
    if (!isMap(node)) this.fail(node, path, "expected a mapping (key: value)");
    const seen = new Set<string>();
    return node.items.map((pair) => {
      const key = pair.key as Node;
      if (!isScalar(key) || (typeof key.value !== "string" && typeof key.value !== "number")) this.fail(key, path, "expected a plain key");
      const name = String(key.value);
      if (seen.has(name)) this.fail(key, path === "" ? name : `${path}.${name}`, "repeated key");
      seen.add(name);
      return [name, pair.value as Node | null, key];
    });
  }

  /** The value of one field. */
  value(kind: Kind, node: Node | null, path: string): JsonValue {
    switch (kind.t) {
      case "string":
        return this.text(node, path).text;
      case "int": {
        const { value, whole } = this.scalar(node, path);
        const n = typeof value === "number" ? value : whole && /^-?\d+$/.test(value as string) ? Number(value) : NaN;
        if (!Number.isInteger(n)) this.fail(node, path, "expected an integer");
        if (n < kind.min || n > kind.max) this.fail(node, path, `expected an integer from ${kind.min} to ${kind.max}, got ${n}`);
        return n;
      }
      case "bool": {
        const { value, whole } = this.scalar(node, path);
        if (typeof value === "boolean") return value;
        if (whole && (value === "true" || value === "false")) return value === "true";
        return this.fail(node, path, "expected true or false");
      }
      case "duration": {
        const { text } = this.text(node, path);
        const ms = /^\d+$/.test(text) ? undefined : parseDuration(text);
        if (ms === undefined || ms <= 0) this.fail(node, path, `expected a duration like 90s, 30m, 1h30m or 2d, got "${text}"`);
        return `${ms / 1000}s`;
      }
      case "labels": {
        const out: JsonObject = {};
        for (const [k, v] of this.entries(node, path)) out[k] = this.text(v, `${path}.${k}`).text;
        return out;
      }
      case "enum": {
        const { text } = this.text(node, path);
        if (!(text in kind.words)) this.fail(node, path, `expected one of ${Object.keys(kind.words).join(", ")}, got "${text}"`);
        return kind.words[text];
      }
      case "enums": {
        if (!isSeq(node)) this.fail(node, path, `expected a list of ${Object.keys(kind.words).join(", ")}`);
        return node.items.map((item, i) => this.value({ t: "enum", words: kind.words }, item as Node, `${path}[${i}]`));
      }
      case "object":
        return this.object(kind.fields, node, path);
      case "parameters":
        return this.entries(node, path).map(([name, v, key]) => {
          if (!new RegExp(NAME).test(name)) this.fail(key, `${path}.${name}`, "a parameter's name must match [A-Za-z_][A-Za-z0-9_]{0,63}");
          return { name, value: this.text(v, `${path}.${name}`, kind.secret).text, secret: kind.secret };
        });
      case "ports":
        return this.entries(node, path).map(([name, v]) => {
          const at = `${path}.${name}`;
          if (isMap(v)) {
            const port = this.object(
              [
                { key: "port", to: "port", kind: { t: "int", min: 0, max: 65535 }, description: "" },
                { key: "description", to: "description", kind: { t: "string" }, description: "" },
              ],
              v,
              at,
            );
            return { name, ...port } as JsonObject;
          }
          return { name, port: this.value({ t: "int", min: 0, max: 65535 }, v, at) } as JsonObject;
        });
      case "proto":
        return this.plain(node, path);
    }
  }

  /** A scalar as YAML typed it, its strings with their variables replaced. */
  private scalar(node: Node | null, path: string): { value: string | number | boolean; whole: boolean } {
    if (isScalar(node) && (typeof node.value === "number" || typeof node.value === "boolean")) return { value: node.value, whole: false };
    const { text, whole } = this.text(node, path);
    return { value: text, whole };
  }

  /** Any YAML value as JSON, its strings with their variables replaced. */
  private plain(node: Node | null, path: string): JsonValue {
    if (isMap(node)) return Object.fromEntries(this.entries(node, path).map(([k, v]) => [k, this.plain(v, `${path}.${k}`)]));
    if (isSeq(node)) return node.items.map((item, i) => this.plain(item as Node, `${path}[${i}]`));
    if (isScalar(node) && node.value === null) return null;
    return this.scalar(node, path).value;
  }

  /** A mapping of `fields` into proto JSON; unknown keys refused. */
  object(fields: Field[], node: Node | null, path: string, skip: string[] = []): JsonObject {
    const out: JsonObject = {};
    for (const [key, v, keyNode] of this.entries(node, path)) {
      if (skip.includes(key)) continue;
      const at = path === "" ? key : `${path}.${key}`;
      const field = fields.find((f) => f.key === key);
      const known = fields.filter((f) => f.kind.t !== "proto" || SPEC_FIELDS.has(f.to)).map((f) => f.key);
      if (!field) this.fail(keyNode, at, `unknown key (known: ${[...known, ...skip].join(", ")})`);
      if (field.kind.t === "proto" && path === "" && !SPEC_FIELDS.has(field.to)) this.fail(keyNode, at, "not supported by this version of Treadmill");
      const value = this.value(field.kind, v, at);
      setPath(out, field.to, value, field.kind.t === "parameters");
    }
    return out;
  }
}

function setPath(target: JsonObject, dotted: string, value: JsonValue, append: boolean): void {
  const parts = dotted.split(".");
  let at = target;
  for (const p of parts.slice(0, -1)) at = (at[p] ??= {}) as JsonObject;
  const last = parts[parts.length - 1];
  const had = at[last];
  at[last] = append && Array.isArray(had) && Array.isArray(value) ? [...had, ...value] : value;
}

/** The combinations of a matrix, in order (the last key varies fastest). */
function combinations(matrix: [string, string[]][]): Record<string, string>[] {
  let out: Record<string, string>[] = [{}];
  for (const [key, values] of matrix) out = out.flatMap((c) => values.map((v) => ({ ...c, [key]: v })));
  return out;
}

/**
 * The jobs of a job file: one, or one per combination of its matrix (whose
 * keys are variables and labels of each job). Throws JobFileError.
 */
export function readJobFile(text: string, options: ReadOptions = {}): FileJob[] {
  const source = options.source ?? "job file";
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: false });
  const bad = doc.errors[0];
  if (bad) throw new JobFileError(source, lines.linePos(bad.pos[0]).line, "", `not valid YAML: ${bad.message.split("\n")[0]}`);
  const root = doc.contents as Node | null;
  const set = options.set ?? {};
  for (const name of Object.keys(set)) {
    if (!VARIABLE_NAME.test(name)) throw new JobFileError(source, undefined, "", `--set ${name}: a variable's name must match [A-Za-z_][A-Za-z0-9_.-]*`);
  }
  // variables: and matrix: first, their values with --set's variables only.
  const outer: Reader = new Reader(source, lines, set, {});
  const top = outer.entries(root, "");
  const vars: Record<string, string> = {};
  const node = (key: string) => top.find(([k]) => k === key);
  const declared = node("variables");
  if (declared) {
    for (const [k, v, keyNode] of outer.entries(declared[1], "variables")) {
      if (!VARIABLE_NAME.test(k)) outer.fail(keyNode, `variables.${k}`, "a variable's name must match [A-Za-z_][A-Za-z0-9_.-]*");
      vars[k] = outer.text(v, `variables.${k}`).text;
    }
  }
  Object.assign(vars, set);
  const matrix: [string, string[]][] = [];
  const m = node("matrix");
  if (m) {
    for (const [k, v, keyNode] of outer.entries(m[1], "matrix")) {
      if (!VARIABLE_NAME.test(k)) outer.fail(keyNode, `matrix.${k}`, "a matrix key must match [A-Za-z_][A-Za-z0-9_.-]*");
      if (k in set) outer.fail(keyNode, `matrix.${k}`, `is a matrix key and also given with --set ${k}`);
      if (k in vars) outer.fail(keyNode, `matrix.${k}`, `is a matrix key and also under variables:`);
      if (!isSeq(v) || v.items.length === 0) outer.fail(v ?? keyNode, `matrix.${k}`, "expected a non-empty list of values");
      const values = v.items.map((item, i) => outer.text(item as Node, `matrix.${k}[${i}]`).text);
      if (new Set(values).size !== values.length) outer.fail(v, `matrix.${k}`, "repeated value");
      matrix.push([k, values]);
    }
    const count = matrix.reduce((n, [, values]) => n * values.length, 1);
    if (count > MAX_MATRIX_JOBS) outer.fail(m[2], "matrix", `makes ${count} jobs, more than ${MAX_MATRIX_JOBS}`);
  }
  if (!node("image")) outer.fail(root, "image", "is required");
  return combinations(matrix).map((combination) => {
    const reader: Reader = new Reader(source, lines, { ...vars, ...combination }, options.secrets ?? {});
    const json = reader.object(FIELDS, root, "", FILE_KEYS);
    if (Object.keys(combination).length > 0) json.tags = { ...((json.tags as JsonObject | undefined) ?? {}), ...combination };
    let spec: JobSpec;
    try {
      spec = fromJson(JobSpecSchema, json);
    } catch (err) {
      // Only a passed-through (proto) key's value can be wrong here.
      throw new JobFileError(source, undefined, "", `not a valid job: ${(err as Error).message}`);
    }
    return { matrix: combination, spec };
  });
}

// The file of a spec (`tml job get -o yaml`).

/** Milliseconds as the shortest duration text: 90000 -> "1m30s". */
export function durationText(ms: number): string {
  if (ms % 1000 !== 0) return `${ms}ms`;
  let s = ms / 1000;
  let out = "";
  for (const [unit, size] of [
    ["d", 86_400],
    ["h", 3600],
    ["m", 60],
  ] as const) {
    if (s >= size) {
      out += `${Math.floor(s / size)}${unit}`;
      s %= size;
    }
  }
  return s > 0 || out === "" ? `${out}${s}s` : out;
}

function getPath(json: JsonObject, dotted: string): JsonValue | undefined {
  let at: JsonValue | undefined = json;
  for (const p of dotted.split(".")) at = at !== null && typeof at === "object" && !Array.isArray(at) ? at[p] : undefined;
  return at;
}

/** A literal text as the file writes it: `${` escaped as `$${`, so it is not read as a variable. */
const literal = (text: JsonValue | undefined) => String(text ?? "").replaceAll("${", () => "$${");

/** A spec field's proto JSON as the file writes it; undefined: left out (default). */
function render(kind: Kind, json: JsonValue | undefined): unknown {
  if (json === undefined || json === null) return undefined;
  switch (kind.t) {
    case "string":
      return json === "" ? undefined : literal(json);
    case "int":
      return json === 0 ? undefined : json;
    case "bool":
      return json === true ? true : undefined;
    case "duration":
      return durationText(Math.round(Number(String(json).replace(/s$/, "")) * 1000));
    case "labels": {
      const entries = Object.entries(json as JsonObject);
      return entries.length === 0 ? undefined : Object.fromEntries(entries.map(([k, v]) => [k, literal(v)]));
    }
    case "enum":
      return Object.entries(kind.words).find(([, v]) => v === json)?.[0];
    case "enums": {
      const list = (json as JsonValue[]).map((v) => render({ t: "enum", words: kind.words }, v));
      return list.length === 0 ? undefined : list;
    }
    case "object": {
      const out: Record<string, unknown> = {};
      for (const f of kind.fields) {
        const v = render(f.kind, getPath(json as JsonObject, f.to));
        if (v !== undefined) out[f.key] = v;
      }
      return Object.keys(out).length === 0 ? undefined : out;
    }
    case "parameters": {
      const params = (json as JsonObject[]).filter((p) => (p.secret === true) === kind.secret);
      if (params.length === 0) return undefined;
      return Object.fromEntries(params.map((p) => [p.name, kind.secret ? `\${secret:${String(p.name)}}` : literal(p.value)]));
    }
    case "ports": {
      const ports = json as JsonObject[];
      if (ports.length === 0) return undefined;
      return Object.fromEntries(ports.map((p) => [p.name, p.description ? { port: p.port ?? 0, description: literal(p.description) } : (p.port ?? 0)]));
    }
    case "proto":
      return Array.isArray(json) && json.length === 0 ? undefined : json;
  }
}

/**
 * A job file of `spec`: submitting it again (readJobFile) gives the same
 * spec. Secret values are never in a spec returned by the API: each secret
 * is written as `${secret:NAME}`, to be given again with --secret.
 */
export function fileOf(spec: JobSpec, header?: string): string {
  // Enums as numbers (the table's words map them), durations as "30s".
  const json = toJson(JobSpecSchema, spec, { enumAsInteger: true }) as JsonObject;
  const out: Record<string, unknown> = {};
  for (const f of FIELDS) {
    const v = f.kind.t === "parameters" ? render(f.kind, json.parameters) : render(f.kind, getPath(json, f.to));
    if (v !== undefined) out[f.key] = v;
  }
  const doc = new Document(out);
  const lines = header === undefined ? [] : [header];
  if (spec.parameters.some((p) => p.secret)) lines.push("secret values are not shown: give each again with --secret NAME=VALUE or --secret-file NAME=PATH");
  if (lines.length > 0) doc.commentBefore = lines.map((l) => ` ${l}`).join("\n");
  return doc.toString({ lineWidth: 0 });
}


// The JSON Schema (`tml job schema`).

const VARIABLE_REF = { type: "string", pattern: "^\\$\\{[A-Za-z_][A-Za-z0-9_.-]*\\}$", description: "a variable, ${name}" };

function schemaOf(kind: Kind, description: string): Record<string, unknown> {
  const d = description === "" ? {} : { description };
  switch (kind.t) {
    case "string":
      return { type: "string", ...d };
    case "int":
      return { ...d, anyOf: [{ type: "integer", minimum: kind.min, maximum: kind.max }, { $ref: "#/$defs/variable" }] };
    case "bool":
      return { ...d, anyOf: [{ type: "boolean" }, { $ref: "#/$defs/variable" }] };
    case "duration":
      return { type: "string", pattern: "^((\\d+(\\.\\d+)?(ms|s|m|h|d))+|.*\\$\\{.*)$", examples: ["30m", "1h30m"], ...d };
    case "labels":
      return { type: "object", additionalProperties: { type: ["string", "number", "boolean"] }, ...d };
    case "enum":
      return { ...d, anyOf: [{ enum: Object.keys(kind.words) }, { $ref: "#/$defs/variable" }] };
    case "enums":
      return { type: "array", items: schemaOf({ t: "enum", words: kind.words }, ""), ...d };
    case "object":
      return {
        type: "object",
        additionalProperties: false,
        properties: Object.fromEntries(kind.fields.map((f) => [f.key, schemaOf(f.kind, f.description)])),
        ...d,
      };
    case "parameters":
      return { type: "object", propertyNames: { pattern: NAME }, additionalProperties: { type: ["string", "number", "boolean"] }, ...d };
    case "ports": {
      const port = { anyOf: [{ type: "integer", minimum: 0, maximum: 65535 }, { $ref: "#/$defs/variable" }] };
      return {
        type: "object",
        additionalProperties: {
          anyOf: [port, { type: "object", additionalProperties: false, required: ["port"], properties: { port, description: { type: "string" } } }],
        },
        ...d,
      };
    }
    case "proto":
      return { ...d };
  }
}

/** The JSON Schema (draft 2020-12) of a job file, for editors. */
export function jobFileSchema(): Record<string, unknown> {
  const fields = FIELDS.filter((f) => f.kind.t !== "proto" || SPEC_FIELDS.has(f.to));
  const top = schemaOf({ t: "object", fields }, "") as { properties: Record<string, unknown> };
  return {
    $schema: "https://json-schema.org/draft/2020-12/schema",
    $id: "https://treadmill.dev/schemas/job-file.json",
    title: "Treadmill job file",
    description: "A job for `tml job run -f` (docs/job-files.md).",
    type: "object",
    required: ["image"],
    additionalProperties: false,
    properties: {
      ...top.properties,
      variables: {
        description: "default values of variables (${name}); --set overrides them",
        type: "object",
        propertyNames: { pattern: VARIABLE_NAME.source },
        additionalProperties: { type: ["string", "number", "boolean"] },
      },
      matrix: {
        description: "one job per combination of these values; each key is a variable and a label of its jobs",
        type: "object",
        propertyNames: { pattern: VARIABLE_NAME.source },
        additionalProperties: { type: "array", minItems: 1, items: { type: ["string", "number", "boolean"] } },
      },
    },
    $defs: { variable: VARIABLE_REF },
  };
}
