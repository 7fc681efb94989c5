import { spawn, type ChildProcess } from "node:child_process";
import { createInterface } from "node:readline";

/** A child process of the test whose output lines can be awaited. */
export interface RunningProcess {
  child: ChildProcess;
  /** Every line printed so far, standard output and error together. */
  lines: string[];
  /** Resolves with the first line (past or future, from line number `from`, default 0) matching `pattern`. */
  waitForLine(pattern: RegExp, timeoutMs?: number, from?: number): Promise<string>;
  /** Resolves with the exit code (or the signal's name) once it has exited. */
  exited: Promise<number | string>;
}

/** The lines a child prints on stdout and stderr, and a way to wait for one. */
export interface LineWatcher {
  /** Every line printed so far, standard output and error together. */
  lines: string[];
  /** Resolves with the first line (past or future, from line number `from`) matching `pattern`; rejects at the deadline or once `ended` settles. */
  waitForLine(pattern: RegExp, timeoutMs: number, from?: number): Promise<string>;
}

/** Watches the output lines of `child` (a process, or anything with its two output streams); `ended` settles when no more can come. */
export function watchLines(child: Pick<ChildProcess, "stdout" | "stderr">, ended: Promise<unknown>): LineWatcher {
  const lines: string[] = [];
  const waiters: { pattern: RegExp; resolve: (line: string) => void }[] = [];
  const onLine = (line: string) => {
    lines.push(line);
    for (const w of [...waiters]) {
      if (w.pattern.test(line)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(line);
      }
    }
  };
  createInterface({ input: child.stdout! }).on("line", onLine);
  createInterface({ input: child.stderr! }).on("line", onLine);
  return {
    lines,
    waitForLine(pattern, timeoutMs, from = 0) {
      const seen = lines.slice(from).find((l) => pattern.test(l));
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          reject(new Error(`no line matching ${pattern} within ${timeoutMs} ms; output:\n${lines.join("\n")}`));
        }, timeoutMs);
        waiters.push({
          pattern,
          resolve: (line) => {
            clearTimeout(timer);
            resolve(line);
          },
        });
        void ended.then(() => {
          clearTimeout(timer);
          reject(new Error(`process exited before printing ${pattern}; output:\n${lines.join("\n")}`));
        });
      });
    },
  };
}

/** Starts one of the package's bins (or any node script) with `args`. */
export function startProcess(script: string, args: string[], env: Record<string, string> = {}): RunningProcess {
  const child = spawn(process.execPath, [script, ...args], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const exited = new Promise<number | string>((resolve) =>
    child.once("exit", (code, signal) => resolve(code ?? signal ?? "unknown")),
  );
  const watcher = watchLines(child, exited);
  return {
    child,
    lines: watcher.lines,
    exited,
    waitForLine: (pattern, timeoutMs = 20000, from = 0) => watcher.waitForLine(pattern, timeoutMs, from),
  };
}
