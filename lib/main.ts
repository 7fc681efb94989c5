import { ConfigError, usage, wantsHelp } from "./config.js";
import type { Component } from "./component.js";
import { stopOnSignals } from "./lifecycle.js";
import { createLogger, type Logger } from "./logger.js";

/**
 * The body of every `main.ts`: argv/env -> config -> logger -> create ->
 * start -> signals. `--help` prints the options; a bad config prints every
 * problem at once and exits 2; a failed start exits 1. `main.ts` passes its
 * `process` in, so this module reads nothing global by itself.
 */
export async function runMain<C extends { logLevel: string }, T extends Component>(options: {
  component: string;
  summary: string;
  schema: Parameters<typeof usage>[1];
  proc: NodeJS.Process;
  load: (source: { env: NodeJS.ProcessEnv; argv: string[] }) => C;
  create: (config: C, logger: Logger) => T;
  /** Called once started, e.g. to log or print addresses. */
  ready: (component: T, logger: Logger) => void;
  /** The logger's `component` field; the testbed leaves it out. */
  logComponent?: string | null;
}): Promise<void> {
  const { proc } = options;
  const argv = proc.argv.slice(2);
  if (wantsHelp(argv)) {
    proc.stdout.write(`${options.summary}\n\n${usage(options.component, options.schema)}\n`);
    return;
  }
  let config: C;
  try {
    config = options.load({ env: proc.env, argv });
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    proc.stderr.write(`${err.message}\nRun with --help to see every option.\n`);
    proc.exit(2);
    return;
  }
  const logger = createLogger({
    component: options.logComponent === null ? undefined : (options.logComponent ?? options.component),
    level: config.logLevel,
  });
  let component: T;
  try {
    component = options.create(config, logger);
  } catch (err) {
    // What create() reads from the config's files (--ca-file) is part of the config.
    if (!(err instanceof ConfigError)) throw err;
    proc.stderr.write(`${err.message}\n`);
    proc.exit(2);
    return;
  }
  const stopped = stopOnSignals(proc, component, logger);
  try {
    await component.start();
  } catch (err) {
    logger.fatal({ err }, "start failed");
    await component.stop().catch(() => undefined);
    proc.exit(1);
    return;
  }
  options.ready(component, logger);
  await stopped;
  // Everything was closed gracefully; exit rather than wait on a stray handle.
  proc.exit();
}
