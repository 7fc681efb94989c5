/**
 * lib/job-file.ts: the job file's parser, variables, matrix, the file of a
 * spec and the JSON Schema. The schema is checked with a small validator of
 * the draft 2020-12 keywords it uses (below): it must accept the examples
 * of docs/job-files.md and refuse bad files.
 */
import { describe, expect, it } from "@jest/globals";
import { create, toJson } from "@bufbuild/protobuf";
import { fileURLToPath } from "node:url";
import { join } from "node:path";
import { parse } from "yaml";
import { DriverKind } from "../../gen/treadmill/coordinator/v1/host_pb.js";
import { JobSpecSchema, RetryCondition } from "../../gen/treadmill/coordinator/v1/job_pb.js";
import { JobFileError, durationText, fileOf, jobFileSchema, readJobFile, uncoveredSpecFields } from "../../lib/job-file.js";
import { docBlocks } from "../support/doc-blocks.js";

const GUIDE = join(fileURLToPath(new URL("../..", import.meta.url)), "docs", "job-files.md");

/** The error readJobFile throws for `text`. */
function errorOf(text: string, options: Parameters<typeof readJobFile>[1] = {}): string {
  try {
    readJobFile(text, { source: "job.yaml", ...options });
  } catch (err) {
    expect(err).toBeInstanceOf(JobFileError);
    return (err as Error).message;
  }
  throw new Error("the file was accepted");
}

type Schema = Record<string, unknown>;

/** Errors of `value` against `schema` (the keywords jobFileSchema uses); empty when valid. */
function validate(root: Schema, schema: Schema, value: unknown, at = "$"): string[] {
  if (typeof schema.$ref === "string") {
    const name = schema.$ref.replace("#/$defs/", "");
    return validate(root, (root.$defs as Record<string, Schema>)[name], value, at);
  }
  const errors: string[] = [];
  const typeOf = (v: unknown) => (v === null ? "null" : Array.isArray(v) ? "array" : Number.isInteger(v) ? "integer" : typeof v);
  if (schema.type !== undefined) {
    const types = Array.isArray(schema.type) ? (schema.type as string[]) : [schema.type as string];
    const t = typeOf(value);
    if (!types.includes(t) && !(t === "integer" && types.includes("number"))) return [`${at}: expected ${types.join("|")}, got ${t}`];
  }
  if (Array.isArray(schema.enum) && !schema.enum.includes(value)) errors.push(`${at}: not one of ${schema.enum.join(", ")}`);
  if (typeof schema.pattern === "string" && typeof value === "string" && !new RegExp(schema.pattern, "u").test(value)) errors.push(`${at}: does not match ${schema.pattern}`);
  if (typeof schema.minimum === "number" && typeof value === "number" && value < schema.minimum) errors.push(`${at}: below ${schema.minimum}`);
  if (typeof schema.maximum === "number" && typeof value === "number" && value > schema.maximum) errors.push(`${at}: above ${schema.maximum}`);
  if (Array.isArray(value)) {
    if (typeof schema.minItems === "number" && value.length < schema.minItems) errors.push(`${at}: fewer than ${schema.minItems} items`);
    if (schema.items) value.forEach((v, i) => errors.push(...validate(root, schema.items as Schema, v, `${at}[${i}]`)));
  }
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    const props = (schema.properties ?? {}) as Record<string, Schema>;
    for (const r of (schema.required ?? []) as string[]) if (!(r in value)) errors.push(`${at}: ${r} is required`);
    for (const [k, v] of Object.entries(value)) {
      if (schema.propertyNames) errors.push(...validate(root, schema.propertyNames as Schema, k, `${at}.${k} (name)`));
      if (k in props) errors.push(...validate(root, props[k], v, `${at}.${k}`));
      else if (schema.additionalProperties === false) errors.push(`${at}.${k}: not allowed`);
      else if (typeof schema.additionalProperties === "object") errors.push(...validate(root, schema.additionalProperties as Schema, v, `${at}.${k}`));
    }
  }
  for (const key of ["anyOf", "oneOf"] as const) {
    const options = schema[key] as Schema[] | undefined;
    if (!options) continue;
    const passing = options.filter((o) => validate(root, o, value, at).length === 0).length;
    if (key === "anyOf" ? passing === 0 : passing !== 1) errors.push(`${at}: matches ${passing} of the ${key} options`);
  }
  return errors;
}

describe("readJobFile", () => {
  it("maps every key of a file to its JobSpec field", () => {
    const [job] = readJobFile(
      [
        "image: ci/tests:1",
        "description: nightly",
        "labels: {ci: nightly}",
        "hosts: {tags: {board: nrf52840dk}, count: 2, site: lab-a, driver: board}",
        "priority: 10",
        "timeout: 1h30m",
        "queue_timeout: 2h",
        "parameters: {SUITE: smoke, COUNT: 3, FAST: true}",
        "secrets: {TOKEN: '${secret:TOKEN}'}",
        "ports: {web: 8080, ssh: {port: 22, description: a shell}}",
        "restarts: 2",
        "retry: {on: [workload-failure, host-start-failure], max: 3, other_host: true}",
        "hold_on_failure: 30m",
        "lease: 01900000-0000-7000-8000-000000000000",
      ].join("\n"),
      { secrets: { TOKEN: "t0k" } },
    );
    expect(job.matrix).toEqual({});
    expect(toJson(JobSpecSchema, job.spec)).toEqual({
      image: "ci/tests:1",
      description: "nightly",
      tags: { ci: "nightly" },
      hosts: { tags: { board: "nrf52840dk" }, hostCount: 2, site: "lab-a", driverKind: "DRIVER_KIND_BOARD" },
      priority: 10,
      jobTimeout: "5400s",
      queueTimeout: "7200s",
      parameters: [
        { name: "SUITE", value: "smoke" },
        { name: "COUNT", value: "3" },
        { name: "FAST", value: "true" },
        { name: "TOKEN", value: "t0k", secret: true },
      ],
      exposedPorts: [
        { name: "web", port: 8080 },
        { name: "ssh", port: 22, description: "a shell" },
      ],
      restartPolicy: { maxRestarts: 2 },
      retry: { on: ["RETRY_CONDITION_WORKLOAD_FAILURE", "RETRY_CONDITION_HOST_START_FAILURE"], max: 3, otherHost: true },
      holdOnFailure: "1800s",
      leaseId: "01900000-0000-7000-8000-000000000000",
    });
  });

  it("has a key for every JobSpec field", () => {
    expect(uncoveredSpecFields()).toEqual([]);
  });

  it("replaces variables from --set over the file's variables, keeps $${ literal, and reads a whole ${n} as an integer", () => {
    const [job] = readJobFile("image: ci/${name}:${tag}\nvariables: {name: tests, tag: '1'}\nhosts: {count: '${n}'}\nparameters: {X: 'a $${b} c'}\n", {
      set: { tag: "2", n: "3" },
    });
    expect(job.spec.image).toBe("ci/tests:2");
    expect(job.spec.hosts?.hostCount).toBe(3);
    expect(job.spec.parameters[0].value).toBe("a ${b} c");
  });

  it("names an undefined variable and its line", () => {
    expect(errorOf("image: x\nparameters:\n  A: ok\n  B: ${missing}\n")).toBe(
      "job.yaml:4: parameters.B: variable ${missing} is not defined: give it with --set missing=VALUE, under variables:, or in matrix:",
    );
  });

  it("refuses unknown keys, wrong types and bad values with the key's path and line", () => {
    expect(errorOf("image: x\nhost: {count: 1}\n")).toMatch(/^job\.yaml:2: host: unknown key \(known: image, description, labels, hosts, /);
    expect(errorOf("image: x\nhosts:\n  count: two\n")).toBe("job.yaml:3: hosts.count: expected an integer");
    expect(errorOf("image: x\nhosts:\n  count: 65\n")).toBe("job.yaml:3: hosts.count: expected an integer from 1 to 64, got 65");
    expect(errorOf("image: x\nhosts: {driver: vm}\n")).toBe('job.yaml:2: hosts.driver: expected one of process, board, qemu, got "vm"');
    expect(errorOf("image: x\ntimeout: soon\n")).toBe('job.yaml:2: timeout: expected a duration like 90s, 30m, 1h30m or 2d, got "soon"');
    expect(errorOf("image: x\nretry: {on: workload-failure}\n")).toBe("job.yaml:2: retry.on: expected a list of workload-failure, host-start-failure");
    expect(errorOf("image: x\nretry: {other_host: maybe}\n")).toBe("job.yaml:2: retry.other_host: expected true or false");
    expect(errorOf("image: x\nparameters: {bad-name: 1}\n")).toBe("job.yaml:2: parameters.bad-name: a parameter's name must match [A-Za-z_][A-Za-z0-9_]{0,63}");
    expect(errorOf("image: x\nparameters: {A: 1, A: 2}\n")).toBe("job.yaml:2: parameters.A: repeated key");
    expect(errorOf("image: x\nparameters: [A]\n")).toBe("job.yaml:2: parameters: expected a mapping (key: value)");
    expect(errorOf("image: x\nparameters: {A: '${secret:A}'}\n")).toBe("job.yaml:2: parameters.A: ${secret:A} may only be the value of a key under secrets:");
    expect(errorOf("description: no image\n")).toBe("job.yaml:1: image: is required");
    expect(errorOf("image: [x\n")).toMatch(/^job\.yaml:\d+: not valid YAML: /);
  });

  it("asks for a secret placeholder's value by name", () => {
    expect(errorOf("image: x\nsecrets: {KEY: '${secret:KEY}'}\n")).toBe(
      "job.yaml:2: secrets.KEY: secret KEY has no value: give it with --secret KEY=VALUE or --secret-file KEY=PATH",
    );
  });
});

describe("matrix", () => {
  it("submits one job per combination, its keys variables and labels, the last key varying fastest", () => {
    const jobs = readJobFile("image: x\nlabels: {ci: n}\nmatrix: {board: [a, b], suite: [x, y]}\ndescription: ${suite} on ${board}\n");
    expect(jobs.map((j) => j.matrix)).toEqual([
      { board: "a", suite: "x" },
      { board: "a", suite: "y" },
      { board: "b", suite: "x" },
      { board: "b", suite: "y" },
    ]);
    expect(jobs.map((j) => j.spec.description)).toEqual(["x on a", "y on a", "x on b", "y on b"]);
    expect(jobs[3].spec.tags).toEqual({ ci: "n", board: "b", suite: "y" });
  });

  it("refuses an empty list, a repeated value, a key also given with --set or under variables:, and more than 64 jobs", () => {
    expect(errorOf("image: x\nmatrix: {board: []}\n")).toBe("job.yaml:2: matrix.board: expected a non-empty list of values");
    expect(errorOf("image: x\nmatrix: {board: [a, a]}\n")).toBe("job.yaml:2: matrix.board: repeated value");
    expect(errorOf("image: x\nmatrix: {board: [a]}\n", { set: { board: "b" } })).toBe("job.yaml:2: matrix.board: is a matrix key and also given with --set board");
    expect(errorOf("image: x\nvariables: {board: c}\nmatrix: {board: [a]}\n")).toBe("job.yaml:3: matrix.board: is a matrix key and also under variables:");
    const big = `image: x\nmatrix: {a: [${[...Array(9).keys()].join(",")}], b: [${[...Array(8).keys()].join(",")}]}\n`;
    expect(errorOf(big)).toBe("job.yaml:2: matrix: makes 72 jobs, more than 64");
  });
});

describe("fileOf", () => {
  it("writes a spec as a file that reads back as the same spec, secrets as placeholders", () => {
    const spec = create(JobSpecSchema, {
      image: "ci/tests:1",
      hosts: { tags: { board: "a" }, hostCount: 1, driverKind: DriverKind.QEMU },
      priority: -5,
      jobTimeout: { seconds: 90n },
      parameters: [
        { name: "S", value: "literal ${x}" },
        { name: "K", value: "", secret: true },
      ],
      exposedPorts: [{ name: "web", port: 80, description: "site" }],
      tags: { ci: "1" },
      retry: { on: [RetryCondition.HOST_START_FAILURE], max: 2 },
    });
    const text = fileOf(spec);
    expect(text).toContain("K: ${secret:K}");
    expect(text).toContain("timeout: 1m30s");
    const [back] = readJobFile(text, { secrets: { K: "" } });
    expect(toJson(JobSpecSchema, back.spec)).toEqual(toJson(JobSpecSchema, spec));
  });

  it("writes durations in their shortest form", () => {
    expect([1500, 90_000, 3_600_000, 5_400_000, 86_400_000 + 1000].map(durationText)).toEqual(["1500ms", "1m30s", "1h", "1h30m", "1d1s"]);
  });
});

describe("jobFileSchema", () => {
  const schema = jobFileSchema();

  it("is a draft 2020-12 schema that every job file of docs/job-files.md validates against", async () => {
    expect(schema.$schema).toBe("https://json-schema.org/draft/2020-12/schema");
    const examples = (await docBlocks(GUIDE)).filter((b) => b.lang === "yaml");
    expect(examples.length).toBeGreaterThanOrEqual(2);
    for (const block of examples) {
      expect({ file: block.name, errors: validate(schema, schema, parse(block.text)) }).toEqual({ file: block.name, errors: [] });
      // And the parser takes it (with its variables and secrets given).
      expect(() => readJobFile(block.text, { set: { commit: "abc" }, secrets: { API_TOKEN: "x" } })).not.toThrow();
    }
  });

  it("refuses a file with an unknown key, a wrong type or a bad value", () => {
    expect(validate(schema, schema, { image: "x", hostz: {} })).toEqual(["$.hostz: not allowed"]);
    expect(validate(schema, schema, { image: "x", hosts: { count: "two" } })).toEqual(["$.hosts.count: matches 0 of the anyOf options"]);
    expect(validate(schema, schema, { image: "x", hosts: { count: "${n}" } })).toEqual([]);
    expect(validate(schema, schema, { image: "x", retry: { on: ["sometimes"] } })).toEqual(["$.retry.on[0]: matches 0 of the anyOf options"]);
    expect(validate(schema, schema, { image: "x", timeout: "soon" })).toEqual(["$.timeout: does not match ^((\\d+(\\.\\d+)?(ms|s|m|h|d))+|.*\\$\\{.*)$"]);
    expect(validate(schema, schema, { description: "x" })).toEqual(["$: image is required"]);
  });
});
