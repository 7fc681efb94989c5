/**
 * The `tml` entry point (bin/tml.js): the only place that reads process.argv
 * and process.env and exits the process.
 */
import { runCli } from "./cli.js";

// No top-level await: the bundle is CommonJS (scripts/build.mjs says why).
void runCli(process.argv.slice(2), {
  stdin: process.stdin,
  stdout: process.stdout,
  stderr: process.stderr,
  env: process.env,
  // SIGTERM as Ctrl-C while a command listens (a CI runner cancelling a step sends it); else its default, exiting.
  onInterrupt(handler) {
    process.on("SIGINT", handler);
    process.on("SIGTERM", handler);
    return () => {
      process.off("SIGINT", handler);
      process.off("SIGTERM", handler);
    };
  },
}).then((code) => {
  // Open HTTP/2 sessions would keep the process alive: exit once output is flushed.
  process.stdout.write("", () => process.stderr.write("", () => process.exit(code)));
});
