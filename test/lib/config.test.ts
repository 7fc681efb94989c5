import { describe, it, expect } from "@jest/globals";
import { closest, ConfigError, envName, flagName, loadConfig, parseDuration, readArgv, redactConfig, usage, wantsHelp } from "../../lib/config.js";

const schema = {
  port: { type: "int", default: 7700, min: 0, max: 65535, description: "port to listen on" },
  host: { type: "string", default: "127.0.0.1", description: "address to listen on" },
  graceMs: { type: "duration", default: 5000, description: "drain time" },
  verbose: { type: "bool", description: "log more" },
  corsOrigins: { type: "list", default: [], description: "allowed origins" },
  logLevel: { type: "string", default: "info", choices: ["debug", "info", "warn"], description: "log level" },
  databaseUrl: { type: "url", env: "DATABASE_URL", secret: true, description: "postgres url" },
  dataDir: { type: "path", required: true, description: "state directory" },
} as const;

const load = (env: Record<string, string | undefined>, argv: string[]) => loadConfig("image-store", schema, { env, argv });

function problemsOf(fn: () => unknown): readonly string[] {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as ConfigError).problems;
  }
  throw new Error("expected a ConfigError");
}

describe("loadConfig", () => {
  it("maps keys to flags and environment variables", () => {
    expect(flagName("fooBarMs")).toBe("foo-bar-ms");
    expect(flagName("tlsCertFile")).toBe("tls-cert-file");
    expect(envName("image-store", "fooBarMs", { type: "int", description: "" })).toBe("TREADMILL_IMAGE_STORE_FOO_BAR_MS");
    expect(envName("coordinator", "databaseUrl", schema.databaseUrl)).toBe("DATABASE_URL");
  });

  it("uses defaults when nothing is set", () => {
    const config = load({}, ["--data-dir=/d"]);
    // The loaded type follows the schema (checked by tsc).
    const typed: { port: number; verbose: boolean; logLevel: "debug" | "info" | "warn"; corsOrigins: readonly string[] } = config;
    const url: string | undefined = config.databaseUrl;
    // @ts-expect-error a field without a default may be undefined
    const notUndefined: string = config.databaseUrl;
    expect([typed.port, url, notUndefined]).toEqual([7700, undefined, undefined]);
    expect(config).toEqual({
      port: 7700,
      host: "127.0.0.1",
      graceMs: 5000,
      verbose: false,
      corsOrigins: [],
      logLevel: "info",
      databaseUrl: undefined,
      dataDir: "/d",
    });
    expect(Object.isFrozen(config)).toBe(true);
  });

  it("prefers flags over the environment and the environment over defaults", () => {
    const env = {
      TREADMILL_IMAGE_STORE_PORT: "8000",
      TREADMILL_IMAGE_STORE_HOST: "0.0.0.0",
      TREADMILL_IMAGE_STORE_DATA_DIR: "/env",
      DATABASE_URL: "postgres://u:p@db/x",
    };
    const config = load(env, ["--port", "9000", "--data-dir=/flag"]);
    expect(config.port).toBe(9000);
    expect(config.host).toBe("0.0.0.0");
    expect(config.dataDir).toBe("/flag");
    expect(config.databaseUrl).toBe("postgres://u:p@db/x");
  });

  it("treats an empty environment variable as unset", () => {
    expect(load({ TREADMILL_IMAGE_STORE_PORT: "" }, ["--data-dir=/d"]).port).toBe(7700);
  });

  it("parses bools, durations and lists", () => {
    const config = load({ TREADMILL_IMAGE_STORE_VERBOSE: "yes", TREADMILL_IMAGE_STORE_CORS_ORIGINS: "a, b,,c" }, [
      "--data-dir=/d",
      "--grace-ms=2m",
    ]);
    expect(config.verbose).toBe(true);
    expect(config.graceMs).toBe(120_000);
    expect(config.corsOrigins).toEqual(["a", "b", "c"]);
    expect(load({ TREADMILL_IMAGE_STORE_VERBOSE: "true" }, ["--data-dir=/d", "--no-verbose"]).verbose).toBe(false);
    expect(load({}, ["--data-dir=/d", "--verbose"]).verbose).toBe(true);
    expect(load({}, ["--data-dir=/d", "--cors-origins=x", "--cors-origins", "y,z"]).corsOrigins).toEqual(["x", "y", "z"]);
  });

  it("reads a urls field as a list of http(s) URLs from a flag or the environment, and refuses any other", () => {
    const replicas = { coordinatorUrl: { type: "urls", default: ["http://127.0.0.1:7700"], description: "the coordinator's replicas" } } as const;
    const loadUrls = (env: Record<string, string>, argv: string[]) => loadConfig("supervisor", replicas, { env, argv });
    expect(loadUrls({}, []).coordinatorUrl).toEqual(["http://127.0.0.1:7700"]);
    expect(loadUrls({}, ["--coordinator-url", "http://a:7700, https://b.lab:443/,"]).coordinatorUrl).toEqual(["http://a:7700", "https://b.lab:443/"]);
    expect(loadUrls({ TREADMILL_SUPERVISOR_COORDINATOR_URL: "http://a:1,http://b:2" }, []).coordinatorUrl).toEqual(["http://a:1", "http://b:2"]);
    expect(problemsOf(() => loadUrls({}, ["--coordinator-url=http://a:1,ftp://b", "--coordinator-url=http://c:3"]))).toEqual([
      '--coordinator-url: "ftp://b" is not an http(s) url',
    ]);
    expect(problemsOf(() => loadUrls({ TREADMILL_SUPERVISOR_COORDINATOR_URL: "a:7700" }, []))).toEqual([
      'TREADMILL_SUPERVISOR_COORDINATOR_URL: "a:7700" is not an http(s) url',
    ]);
  });

  it("accepts durations as plain milliseconds or with units", () => {
    expect(parseDuration("1500")).toBe(1500);
    expect(parseDuration("250ms")).toBe(250);
    expect(parseDuration("5s")).toBe(5000);
    expect(parseDuration("1m30s")).toBe(90_000);
    expect(parseDuration("1.5h")).toBe(5_400_000);
    expect(parseDuration("5 s")).toBeUndefined();
    expect(parseDuration("-1")).toBeUndefined();
    expect(parseDuration("s")).toBeUndefined();
  });

  it("reports every problem at once, one per line", () => {
    const problems = problemsOf(() =>
      load({ TREADMILL_IMAGE_STORE_PORT: "eighty", TREADMILL_IMAGE_STORE_PROT: "1", DATABASE_URL: "not a url" }, [
        "--log-level=loud",
        "--grace-ms=soon",
        "--verbose=maybe",
        "--hots=x",
        "--frobnicate",
        "stray",
      ]),
    );
    expect(problems).toEqual([
      'unknown flag --hots (did you mean --host?)',
      "unknown flag --frobnicate",
      'unexpected argument "stray"',
      "unknown environment variable TREADMILL_IMAGE_STORE_PROT",
      'TREADMILL_IMAGE_STORE_PORT: "eighty" is not an integer',
      '--grace-ms: "soon" is not a duration (milliseconds, or like 250ms, 5s, 2m, 1h)',
      '--verbose: "maybe" is not a boolean (true or false)',
      '--log-level: "loud" is not one of debug, info, warn',
      "DATABASE_URL: value is not a url",
      "missing required setting --data-dir (or TREADMILL_IMAGE_STORE_DATA_DIR): state directory",
    ]);
    const again = ['flag --host needs a value', '--port: "-1" is below the minimum 0', "missing required setting --data-dir (or TREADMILL_IMAGE_STORE_DATA_DIR): state directory"];
    expect(problemsOf(() => load({}, ["--port=-1", "--host"]))).toEqual(again);
    expect(() => load({}, ["--port=-1", "--host"])).toThrow(again.join("\n"));
  });

  it("never echoes a secret value", () => {
    const problems = problemsOf(() => load({ DATABASE_URL: "hunter2" }, ["--data-dir=/d"]));
    expect(problems.join("\n")).not.toContain("hunter2");
    const config = load({ DATABASE_URL: "postgres://u:hunter2@db/x" }, ["--data-dir=/d"]);
    expect(JSON.stringify(redactConfig(schema, config))).not.toContain("hunter2");
    expect(usage("image-store", schema)).not.toContain("hunter2");
  });

  it("reads only what it is given", () => {
    process.env.TREADMILL_IMAGE_STORE_PORT = "1234";
    try {
      expect(load({}, ["--data-dir=/d"]).port).toBe(7700);
    } finally {
      delete process.env.TREADMILL_IMAGE_STORE_PORT;
    }
  });

  it("ignores --help, which main.ts handles with usage()", () => {
    expect(wantsHelp(["--port=1", "--help"])).toBe(true);
    expect(wantsHelp(["-h"])).toBe(true);
    expect(wantsHelp(["--", "--help"])).toBe(false);
    expect(load({}, ["--help", "--data-dir=/d"]).dataDir).toBe("/d");
  });
});

describe("usage", () => {
  it("lists every flag with its description, variable and default", () => {
    const text = usage("image-store", schema);
    expect(text).toContain("Usage: treadmill-image-store [flags]");
    expect(text).toMatch(/--port=INT\s+port to listen on \(default 7700\)/);
    expect(text).toMatch(/--\[no-\]verbose\s+log more/);
    expect(text).toMatch(/--log-level=debug\|info\|warn\s+log level \(default "info"\)/);
    expect(text).toMatch(/--grace-ms=DURATION\s+drain time \(default 5000 ms\)/);
    expect(text).toMatch(/--data-dir=PATH\s+state directory \(required\)/);
    expect(text).toContain("env TREADMILL_IMAGE_STORE_GRACE_MS");
    expect(text).toContain("env DATABASE_URL");
  });
});

describe("readArgv, the one command-line reader", () => {
  const cli = {
    output: { type: "string", short: "o", description: "format" },
    detach: { type: "bool", short: "d", description: "detach" },
    tag: { type: "list", description: "tags" },
  } as const;

  it("reads the CLI's short flags, values that look like flags, and arguments after --", () => {
    const items = readArgv(["-ojson", "-d", "--tag", "--x", "job", "-q", "--", "-o"], cli, { shortFlags: true, anyWordIsValue: true });
    expect(items).toEqual([
      { kind: "flag", key: "output", name: "o", value: "json" },
      { kind: "switch", key: "detach", name: "d" },
      { kind: "flag", key: "tag", name: "tag", value: "--x" },
      { kind: "argument", value: "job", index: 4, afterDashes: false },
      { kind: "unknown flag", name: "q", short: true },
      { kind: "argument", value: "-o", index: 7, afterDashes: true },
    ]);
  });

  it("reads the components' --no-x and takes no flag as a value, by default", () => {
    expect(readArgv(["--no-verbose", "--host", "--port", "-h", "1", "--help"], schema, { negation: true, skip: ["--help"] })).toEqual([
      { kind: "flag", key: "verbose", name: "verbose", value: "false" },
      { kind: "missing value", key: "host", name: "host" },
      { kind: "flag", key: "port", name: "port", value: "-h" },
      { kind: "argument", value: "1", index: 4, afterDashes: false },
    ]);
  });

  it("suggests the nearest flag, counting a transposition as one edit", () => {
    expect(closest("hsot", ["port", "host"], 1)).toBe("host");
    expect(closest("zzzz", ["port", "host"], 2)).toBeUndefined();
  });
});
