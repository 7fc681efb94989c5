/**
 * The processes of `npm run site`: each a bin spawned inside a network
 * namespace (nsenter), with SIGTERM as its parent-death signal (setpriv) so
 * that it does not outlive a launcher killed outright, in a process group of
 * its own so that a Ctrl-C at the terminal reaches only the launcher, which
 * stops them in order. Each one's output goes to `<logs>/<name>.log`, and
 * launch() resolves once that output shows its ready line.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream } from "node:fs";
import { join } from "node:path";
import type { Logger } from "../../lib/logger.js";

export interface ProcessSpec {
  name: string;
  /** Stopped by descending stage (clients before the servers they use), one stage at a time. */
  stage: number;
  /** The network namespace to run in. */
  ns: string;
  argv: string[];
  /** Text of the output line that says it is ready. */
  ready: string;
  /** Added to the common environment (credentials, DATABASE_URL). */
  env?: NodeJS.ProcessEnv;
}

interface Running {
  spec: ProcessSpec;
  child: ChildProcess;
  exited: Promise<void>;
  done: boolean;
}

/** How long launch() waits for a ready line, and stop() for an exit before SIGKILL. */
const READY_TIMEOUT_MS = 120_000;
const STOP_GRACE_MS = 15_000;

export class NamespaceProcesses {
  readonly #running: Running[] = [];

  constructor(private readonly options: { cwd: string; logs: string; env: NodeJS.ProcessEnv; logger: Logger }) {}

  /** Where a process's output goes. */
  logFile(name: string): string {
    return join(this.options.logs, `${name}.log`);
  }

  /** Spawns `spec` and resolves once it is ready; rejects when it exits first or stays silent too long. */
  async launch(spec: ProcessSpec): Promise<void> {
    const out = createWriteStream(this.logFile(spec.name), { flags: "a" });
    const child = spawn("nsenter", [`--net=/run/netns/${spec.ns}`, "--", "setpriv", "--pdeathsig", "TERM", "--", ...spec.argv], {
      cwd: this.options.cwd,
      env: { ...this.options.env, ...spec.env },
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
    });
    const proc: Running = { spec, child, done: false, exited: Promise.resolve() };
    proc.exited = new Promise((resolve) =>
      child.once("exit", () => {
        proc.done = true;
        out.end();
        resolve();
      }),
    );
    this.#running.push(proc);
    await new Promise<void>((resolve, reject) => {
      let tail = "";
      const timer = setTimeout(() => fail(`${spec.name} not ready within ${READY_TIMEOUT_MS / 1000} s`), READY_TIMEOUT_MS);
      const fail = (why: string) => {
        clearTimeout(timer);
        reject(new Error(`${why}; see ${this.logFile(spec.name)}`));
      };
      const onData = (b: Buffer) => {
        out.write(b);
        // A ready line split across chunks joins up in the tail.
        tail = (tail + b.toString("utf8")).slice(-4096);
        if (tail.includes(spec.ready)) {
          clearTimeout(timer);
          resolve();
        }
      };
      child.stdout!.on("data", onData);
      child.stderr!.on("data", onData);
      void proc.exited.then(() => fail(`${spec.name} exited while starting`));
    });
    this.options.logger.info({ name: spec.name, ns: spec.ns, pid: child.pid }, "started");
  }

  /** SIGTERM to each stage's processes, highest stage first, SIGKILL after the grace. */
  async stop(): Promise<void> {
    const stages = [...new Set(this.#running.map((r) => r.spec.stage))].sort((a, b) => b - a);
    for (const stage of stages) {
      await Promise.all(
        this.#running
          .filter((r) => r.spec.stage === stage && !r.done)
          .map(async (r) => {
            r.child.kill("SIGTERM");
            const timer = setTimeout(() => r.child.kill("SIGKILL"), STOP_GRACE_MS);
            await r.exited;
            clearTimeout(timer);
          }),
      );
    }
  }
}
