/**
 * Fenced blocks of a guide that a test runs as they are written: a block's
 * info string is its language and a tag, as in "```sh step=credentials" or
 * "```python client=python" (GitHub shows only the language). Keeping the
 * commands in the doc and reading them here keeps the two in step.
 * `runBash` runs such a block.
 */
import { spawn } from "node:child_process";
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
