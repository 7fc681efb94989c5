import { describe, expect, it } from "@jest/globals";
import { parseArgv, parseDuration, type CommandSpec } from "../../cli/args.js";
import { UsageError } from "../../cli/errors.js";
import { toYaml } from "../../cli/output.js";

const run = async () => 0;
const commands: CommandSpec<unknown>[] = [
  {
    path: ["job", "run"],
    summary: "run",
    args: [{ name: "IMAGE", required: true }],
    flags: { tag: { type: "list", description: "" }, detach: { type: "bool", short: "d", description: "" }, hosts: { type: "string", description: "" } },
    run,
  },
  { path: ["job", "list"], summary: "list", run },
];

describe("the tml argument parser", () => {
  it("finds the command among global flags and parses --flag value, --flag=value, repeats and shorts", () => {
    const { command, input } = parseArgv(commands, ["-o", "json", "job", "run", "img:1", "--tag", "a=1", "--tag=b=2", "-d", "--hosts=3"]);
    expect(command?.path).toEqual(["job", "run"]);
    expect(input.args.IMAGE).toBe("img:1");
    expect(input.flags).toMatchObject({ output: "json", tag: ["a=1", "b=2"], detach: true, hosts: "3" });
  });

  it("rejects unknown flags, missing values and extra arguments with a usage error naming them", () => {
    expect(() => parseArgv(commands, ["job", "run", "x", "--tga", "a=1"])).toThrow(new UsageError("unknown flag --tga for `tml job run` (did you mean --tag?); see `tml job run --help`"));
    expect(() => parseArgv(commands, ["job", "run", "x", "--hosts"])).toThrow("flag --hosts needs a value");
    expect(() => parseArgv(commands, ["job", "run", "x", "y"])).toThrow('unexpected argument "y"');
    expect(() => parseArgv(commands, ["job", "run"])).toThrow("needs IMAGE");
    expect(() => parseArgv(commands, ["job", "lst"])).toThrow('did you mean "list"');
  });

  it("takes everything after -- as arguments", () => {
    const { input } = parseArgv(commands, ["job", "run", "--", "--weird"]);
    expect(input.args.IMAGE).toBe("--weird");
  });

  it("reads durations", () => {
    expect(parseDuration("timeout", "90s")).toBe(90_000);
    expect(parseDuration("timeout", "2h")).toBe(7_200_000);
    expect(() => parseDuration("timeout", "soon")).toThrow("flag --timeout takes a duration");
  });
});

describe("the YAML emitter", () => {
  it("writes nested data and quotes what YAML 1.1 would misread (on, n, yes, colons)", () => {
    expect(toYaml({ name: "a", on: "yes", n: 3, list: [{ k: "v", x: [] }, "s: t"], empty: {} })).toBe(
      ["name: a", '"on": "yes"', '"n": 3', "list:", "- k: v", "  x: []", '- "s: t"', "empty: {}", ""].join("\n"),
    );
  });
});
