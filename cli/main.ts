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
  onInterrupt(handler) {
    process.on("SIGINT", handler);
    return () => process.off("SIGINT", handler);
  },
}).then((code) => {
  // Open HTTP/2 sessions would keep the process alive: exit once output is flushed.
  process.stdout.write("", () => process.stderr.write("", () => process.exit(code)));
});
