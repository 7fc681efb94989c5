import { hostname } from "node:os";
import { pino, type Logger, type LoggerOptions } from "pino";

export type { Logger };

/**
 * Paths never written to a log: tokens, passwords, credentials and secret job
 * parameters. Components log fields, never payloads; this is the safety net.
 */
export const REDACT_PATHS = [
  "token",
  "*.token",
  "password",
  "*.password",
  "authorization",
  "*.authorization",
  "headers.authorization",
  "credential",
  "*.credential",
  "secret",
  "*.secret",
  "secrets",
  "*.secrets",
  "params[*].value",
];

export interface LoggerConfig {
  /** pino level: trace, debug, info, warn, error, fatal, silent. */
  level?: string;
  /** The component's name, on every line as `component` (the all-in-one
   * testbed leaves it out and gives each component's child logger its own). */
  component?: string;
  /** Where lines go (default: standard output). */
  destination?: pino.DestinationStream;
}

/** The one root logger of a process; subsystems take children of it. */
export function createLogger(config: LoggerConfig): Logger {
  const options: LoggerOptions = {
    level: config.level ?? "info",
    base: {
      pid: process.pid,
      hostname: hostname(),
      ...(config.component === undefined ? {} : { component: config.component }),
    },
    redact: { paths: REDACT_PATHS, censor: "[redacted]" },
  };
  return config.destination ? pino(options, config.destination) : pino(options);
}

/** A logger that drops everything, for tests that do not read logs. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
