/**
 * Reading from the user: a line (user name, a yes/no), a secret without echo
 * (the terminal in raw mode, one character at a time), or a secret from
 * standard input when it is not a terminal (`--password-stdin`).
 */
import { createInterface } from "node:readline";
import { CliError, ExitCode } from "./errors.js";
import type { CliIo } from "./context.js";

const lineReaders = new WeakMap<object, AsyncIterator<string>>();

/** The next line of standard input (without its newline); "" at its end. */
export async function readStdinLine(io: CliIo): Promise<string> {
  let lines = lineReaders.get(io.stdin);
  if (lines === undefined) {
    lines = createInterface({ input: io.stdin, crlfDelay: Infinity, terminal: false })[Symbol.asyncIterator]();
    lineReaders.set(io.stdin, lines);
  }
  const next = await lines.next();
  return next.done ? "" : next.value;
}

/** Asks `question` on the terminal and reads a line, echoing it. */
export async function askLine(io: CliIo, question: string): Promise<string> {
  if (!io.stdin.isTTY) throw new CliError(`cannot ask "${question.trim()}": standard input is not a terminal`, ExitCode.USAGE);
  io.stderr.write(question);
  return readTerminal(io, true);
}

/** Asks for a secret on the terminal without echoing it. */
export async function askSecret(io: CliIo, question: string): Promise<string> {
  if (!io.stdin.isTTY || !io.stdin.setRawMode) {
    throw new CliError("cannot prompt for a password: standard input is not a terminal (use --password-stdin)", ExitCode.USAGE);
  }
  io.stderr.write(question);
  try {
    return await readTerminal(io, false);
  } finally {
    io.stderr.write("\n");
  }
}

/** Reads one line from a terminal in raw mode; Ctrl-C aborts (exit 130), backspace edits. */
function readTerminal(io: CliIo, echo: boolean): Promise<string> {
  const stdin = io.stdin;
  return new Promise((resolve, reject) => {
    let value = "";
    stdin.setRawMode?.(true);
    stdin.resume();
    const finish = (error?: Error) => {
      stdin.off("data", onData);
      stdin.setRawMode?.(false);
      stdin.pause();
      if (error) reject(error);
      else resolve(value);
    };
    const onData = (data: Buffer | string) => {
      for (const ch of typeof data === "string" ? data : data.toString("utf8")) {
        if (ch === "\r" || ch === "\n") {
          if (echo) io.stderr.write("\n");
          finish();
          return;
        }
        if (ch === "\u0003") {
          if (echo) io.stderr.write("\n");
          finish(new CliError("interrupted", ExitCode.INTERRUPTED));
          return;
        }
        if (ch === "\u0004" && value === "") {
          finish(new CliError("no input given", ExitCode.USAGE));
          return;
        }
        if (ch === "\u007f" || ch === "\b") {
          if (value.length > 0) {
            value = value.slice(0, -1);
            if (echo) io.stderr.write("\b \b");
          }
          continue;
        }
        if (ch >= " ") {
          value += ch;
          if (echo) io.stderr.write(ch);
        }
      }
    };
    stdin.on("data", onData);
  });
}

/** Asks `question` on the terminal and returns the first key pressed (lower case). */
export async function askKey(io: CliIo, question: string): Promise<string> {
  const stdin = io.stdin;
  if (!stdin.isTTY || !stdin.setRawMode) throw new CliError("standard input is not a terminal", ExitCode.USAGE);
  io.stderr.write(question);
  return new Promise((resolve) => {
    stdin.setRawMode!(true);
    stdin.resume();
    stdin.once("data", (data: Buffer | string) => {
      stdin.setRawMode!(false);
      stdin.pause();
      const key = (typeof data === "string" ? data : data.toString("utf8")).slice(0, 1).toLowerCase();
      io.stderr.write("\n");
      resolve(key === "\u0003" ? "d" : key);
    });
  });
}
