/**
 * `runCli(argv, io)`: parses the command line, runs the command and turns
 * every outcome into an exit code (see ExitCode). Errors are printed as one
 * sentence on stderr; a stack trace only with --verbose for unexpected ones.
 */
import { commandHelp, groupHelp, inputOf, parseArgv } from "./args.js";
import { allCommands, groupSummaries } from "./commands/index.js";
import { ConfigStore, configPath } from "./config.js";
import { CliContext, type CliIo } from "./context.js";
import { CliError, ExitCode, explain } from "./errors.js";
import { colourWanted, Output } from "./output.js";

export const VERSION = "0.1.0";

export async function runCli(argv: string[], io: CliIo): Promise<number> {
  const noColor = argv.includes("--no-color");
  const errColour = colourWanted(io.stderr, io.env, noColor);
  const fail = (message: string, code: number) => {
    io.stderr.write(`${errColour ? "\u001b[31mError:\u001b[39m" : "Error:"} ${message}\n`);
    return code;
  };
  if (argv.length === 1 && (argv[0] === "--version" || argv[0] === "version")) {
    io.stdout.write(`tml ${VERSION}\n`);
    return ExitCode.OK;
  }
  let resolution;
  try {
    resolution = parseArgv(allCommands, argv);
  } catch (err) {
    const { message, exitCode } = explain(err);
    return fail(message, exitCode);
  }
  const { command, path, input } = resolution;
  const { flags } = inputOf(input);
  if (flags.help || command === undefined) {
    if (command) io.stdout.write(commandHelp(command));
    else io.stdout.write(groupHelp(allCommands, path, groupSummaries));
    // `tml job` alone is a usage error (help on stdout, exit 2); `tml job --help` is not.
    return flags.help || (path.length === 0 && argv.length === 0) ? ExitCode.OK : ExitCode.USAGE;
  }
  const out = new Output(io.stdout, io.stderr, flags.output ?? "table", {
    stdout: colourWanted(io.stdout, io.env, flags["no-color"]),
    stderr: colourWanted(io.stderr, io.env, flags["no-color"]),
  });
  const ctx = new CliContext(io, out, new ConfigStore(configPath(io.env)), flags);
  try {
    return await command.run(ctx, input);
  } catch (err) {
    const { message, exitCode } = explain(err, ctx.errorContext);
    if (ctx.verbose && !(err instanceof CliError)) io.stderr.write(`${(err as Error)?.stack ?? String(err)}\n`);
    return fail(message, exitCode);
  } finally {
    ctx.close();
  }
}
