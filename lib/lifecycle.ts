import type { Logger } from "./logger.js";

/** Anything with an idempotent, graceful stop. */
export interface Stoppable {
  stop(): Promise<void>;
}

/**
 * The process side of a component's life, for `main.ts` only: the first
 * SIGINT or SIGTERM stops the component gracefully and lets the process end by
 * itself; a second one exits at once (an operator who presses Ctrl-C twice
 * means it). Returns a promise that resolves once the graceful stop is done.
 */
export function stopOnSignals(
  proc: NodeJS.Process,
  target: Stoppable,
  logger: Logger,
): Promise<void> {
  return new Promise((resolve) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals) => {
      if (stopping) {
        logger.warn({ signal }, "second signal, exiting now");
        proc.exit(130);
      }
      stopping = true;
      logger.info({ signal }, "stopping");
      target.stop().then(
        () => {
          logger.info("stopped");
          resolve();
        },
        (err: unknown) => {
          logger.error({ err }, "stop failed");
          proc.exitCode = 1;
          resolve();
        },
      );
    };
    proc.on("SIGINT", onSignal);
    proc.on("SIGTERM", onSignal);
  });
}
