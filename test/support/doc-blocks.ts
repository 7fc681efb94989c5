/**
 * Fenced blocks of a guide that a test runs as they are written: a block's
 * info string is its language and a tag, as in "```sh step=credentials" or
 * "```python client=python" (GitHub shows only the language). Keeping the
 * commands in the doc and reading them here keeps the two in step.
 * `runBash` runs such a block.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, openSync, writeSync } from "node:fs";
import { readFile } from "node:fs/promises";

export interface DocBlock {
  /** The language: sh, python... */
  lang: string;
  /** The tag's key ("vars" for a tag without a value). */
  kind: string;
  /** The tag's value ("vars" for a tag without a value). */
  name: string;
  text: string;
}

/** Every tagged block of `path`, in order. */
export async function docBlocks(path: string): Promise<DocBlock[]> {
  const markdown = await readFile(path, "utf8");
  const blocks: DocBlock[] = [];
  for (const m of markdown.matchAll(/^```([a-z]+) ([a-z]+)(?:=([a-z0-9-]+))?\n([\s\S]*?)^```$/gm)) {
    blocks.push({ lang: m[1], kind: m[2], name: m[3] ?? m[2], text: m[4] });
  }
  return blocks;
}

/** The one block tagged `kind=name` (or `kind`), failing clearly when the doc lost it. */
export function docBlock(blocks: DocBlock[], path: string, kind: string, name = kind): DocBlock {
  const found = blocks.filter((b) => b.kind === kind && b.name === name);
  if (found.length !== 1) throw new Error(`${path} has ${found.length} blocks tagged ${kind === name ? kind : `${kind}=${name}`}, not one`);
  return found[0];
}

export interface ShellResult {
  code: number | string;
  stdout: string;
  stderr: string;
}

/** Runs `script` with bash to its end, `input` on its standard input, collecting what it prints. */
export function runBash(script: string, options: { cwd: string; env: NodeJS.ProcessEnv; input?: string }): Promise<ShellResult> {
  return new Promise((resolve, reject) => {
    const child = spawn("bash", ["-c", script], { cwd: options.cwd, env: options.env, stdio: ["pipe", "pipe", "pipe"] });
    // A script that ends before reading its input closes the pipe: its outcome, not EPIPE, is the answer.
    child.stdin.on("error", () => undefined);
    child.stdin.end(options.input ?? "");
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.once("error", reject);
    child.once("close", (code, signal) => resolve({ code: code ?? signal ?? "unknown", stdout, stderr }));
  });
}

/** A `process=` block running as a child: the shell exec'd its last command, in a process group of its own. */
export interface DocProcess {
  child: ChildProcess;
  exited: Promise<void>;
  startedAt: Date;
}

/**
 * The `process=` blocks of a guide run as children (test/support/site.ts,
 * ha.ts): each in a process group of its own, so that a stop also ends what
 * a killed one left behind, its output appended to its log file.
 */
export class DocProcesses {
  readonly running = new Map<string, DocProcess>();
  readonly #groups = new Set<number>();
  readonly #blocks: Map<string, DocBlock>;

  constructor(
    private readonly options: {
      /** The guide's path, for errors; and who starts them, for the log. */
      doc: string;
      harness: string;
      blocks: DocBlock[];
      /** The whole script of a block's text (its variables set first). */
      script: (body: string) => string;
      cwd: string;
      env: NodeJS.ProcessEnv;
      logFile: (name: string) => string;
    },
  ) {
    this.#blocks = new Map(options.blocks.filter((b) => b.kind === "process").map((b) => [b.name, b]));
  }

  /** The process blocks' names, in the guide's order. */
  get names(): string[] {
    return [...this.#blocks.keys()];
  }

  block(name: string): DocBlock {
    const block = this.#blocks.get(name);
    if (block === undefined) throw new Error(`${this.options.doc} has no process block named ${name}`);
    return block;
  }

  /** Starts a block that is not running; returns once spawned. */
  start(name: string): void {
    const block = this.block(name);
    if (this.running.has(name)) return;
    const fd = openSync(this.options.logFile(name), "a");
    const startedAt = new Date();
    writeSync(fd, `--- started by the ${this.options.harness} at ${startedAt.toISOString()}\n`);
    const child = spawn("bash", ["-c", this.options.script(execLast(block.text))], {
      cwd: this.options.cwd,
      env: this.options.env,
      stdio: ["ignore", fd, fd],
      detached: true,
    });
    closeSync(fd);
    if (child.pid !== undefined) this.#groups.add(child.pid);
    const exited = new Promise<void>((resolve) =>
      child.once("exit", () => {
        if (this.running.get(name)?.child === child) this.running.delete(name);
        resolve();
      }),
    );
    this.running.set(name, { child, exited, startedAt });
  }

  /** Stops every block in the reverse of the guide's order (SIGTERM, SIGKILL after 15 s), then what their groups left. */
  async stopAll(): Promise<void> {
    for (const name of this.names.reverse()) {
      const proc = this.running.get(name);
      if (proc === undefined) continue;
      proc.child.kill("SIGTERM");
      const timer = setTimeout(() => proc.child.kill("SIGKILL"), 15_000);
      await proc.exited;
      clearTimeout(timer);
    }
    for (const group of this.#groups) {
      try {
        process.kill(-group, "SIGKILL");
      } catch {
        // none of it left
      }
    }
  }
}

/** A process block's script with its last command exec'd, so that the bin replaces the shell. */
export function execLast(script: string): string {
  // Logical lines: a line ending in a backslash goes on in the next.
  const lines = script.split(/(?<!\\)\n/);
  let last = lines.length - 1;
  while (last >= 0 && lines[last].trim() === "") last--;
  lines[last] = `exec ${lines[last]}`;
  return lines.join("\n");
}
