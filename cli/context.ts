/**
 * What every command gets: the output, the contexts file, the selected
 * context, and coordinator clients authenticated with its token. `TML_SERVER`
 * and `TML_TOKEN` override the saved context (for CI, where nothing is
 * saved), with `TML_CA_FILE` as their `--ca-file`.
 */
import { readFileSync } from "node:fs";
import { rootCertificates } from "node:tls";
import type { Readable, Writable } from "node:stream";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import { Http2SessionManager } from "@connectrpc/connect-node";
import type { DescService } from "@bufbuild/protobuf";
import { clientTransport } from "../lib/grpc/transport.js";
import type { GlobalFlags } from "./args.js";
import { ConfigStore, type ConfigFile, type SavedContext } from "./config.js";
import { CliError, ExitCode, type ErrorContext } from "./errors.js";
import type { Output } from "./output.js";

/**
 * Everything a run of `tml` reads from or does to its process comes through
 * here (cli/main.ts passes the real ones; the tests pass their own), so that
 * runs can share a process without sharing state.
 */
export interface CliIo {
  stdin: Readable & { isTTY?: boolean; setRawMode?: (raw: boolean) => unknown };
  stdout: Writable & { isTTY?: boolean; columns?: number };
  stderr: Writable & { isTTY?: boolean; columns?: number };
  env: Record<string, string | undefined>;
  /** Calls `handler` on each Ctrl-C (SIGINT) until the returned function is called. */
  onInterrupt?: (handler: () => void) => () => void;
}

export interface Target {
  /** The context's name; "" when TML_SERVER/TML_TOKEN define it. */
  name: string;
  server: string;
  user: string;
  token: string;
  /** The CA certificate file to verify an https server with, if the context names one. */
  caFile?: string;
}

export class CliContext {
  /** Filled as calls are made, to word errors. */
  readonly errorContext: ErrorContext = {};
  /** Aborted on a second Ctrl-C (or when a command wants to stop its streams). */
  readonly abort = new AbortController();

  constructor(
    readonly io: CliIo,
    readonly out: Output,
    readonly config: ConfigStore,
    readonly flags: GlobalFlags,
  ) {}

  get verbose(): boolean {
    return this.flags.verbose;
  }

  /** The context named by --context, else the current one. */
  async selected(file?: ConfigFile): Promise<{ name: string; context: SavedContext } | undefined> {
    const config = file ?? (await this.config.load());
    const name = this.flags.context ?? config.current;
    if (name === undefined) return undefined;
    const context = config.contexts[name];
    if (context === undefined) {
      throw new CliError(`there is no context "${name}"; see \`tml context list\``, ExitCode.USAGE);
    }
    return { name, context };
  }

  /** Server and token to use; CliError (exit 4) when not logged in. */
  async target(): Promise<Target> {
    const env = this.io.env;
    if (env.TML_SERVER && env.TML_TOKEN && this.flags.context === undefined) {
      this.errorContext.server = env.TML_SERVER;
      this.errorContext.hadToken = true;
      return { name: "", server: env.TML_SERVER, user: "", token: env.TML_TOKEN, caFile: env.TML_CA_FILE || undefined };
    }
    const selected = await this.selected();
    if (selected === undefined) {
      throw new CliError("you are not logged in: run `tml login SERVER` first", ExitCode.AUTH);
    }
    const { name, context } = selected;
    this.errorContext.server = context.server;
    this.errorContext.context = name;
    if (!context.token) {
      throw new CliError(`you are logged out of context "${name}": run \`tml login\` again`, ExitCode.AUTH);
    }
    this.errorContext.hadToken = true;
    return { name, server: context.server, user: context.user, token: context.token, caFile: context.caFile };
  }

  /**
   * A gRPC transport to `server` with `token` (none when empty), verifying an
   * https server with the CA in `caFile` as well as the system's; its
   * connection closes when the command ends.
   */
  transport(server: string, token: string, caFile?: string): Transport {
    const sessionManager = new Http2SessionManager(server, undefined, tlsOptions(caFile));
    this.onClose(() => sessionManager.abort());
    return clientTransport({ baseUrl: server, sessionManager, token: () => token });
  }

  readonly #closers: (() => void)[] = [];

  /** Calls `handler` on each Ctrl-C until the returned function is called or the command ends. */
  onInterrupt(handler: () => void): () => void {
    const off = this.io.onInterrupt?.(handler) ?? (() => undefined);
    this.onClose(off);
    return off;
  }

  /** Calls `close` when the command ends, however it ends. */
  onClose(close: () => void): void {
    this.#closers.push(close);
  }

  /**
   * Ends what the command left open: its streams (through `abort`) and its
   * connections. runCli calls it once the command has returned, so that a run
   * inside a longer-lived process (the tests) leaves nothing behind.
   */
  close(): void {
    this.abort.abort();
    for (const close of this.#closers.splice(0)) close();
  }

  #coordinator: Transport | undefined;
  /** The CA file of the coordinator's context (set by `client()`), for the log servers it names. */
  caFile: string | undefined;

  /** A client of a coordinator service, with the selected context's token. */
  async client<S extends DescService>(service: S): Promise<Client<S>> {
    if (this.#coordinator === undefined) {
      const target = await this.target();
      this.#coordinator = this.transport(target.server, target.token, target.caFile);
      this.caFile = target.caFile;
    }
    return createClient(service, this.#coordinator);
  }
}

/**
 * TLS options that add the CA in `caFile` (PEM) to the system's; a file that
 * cannot be read is a usage error naming it.
 */
export function tlsOptions(caFile: string | undefined): { ca: (string | Buffer)[] } | undefined {
  if (caFile === undefined) return undefined;
  try {
    return { ca: [...rootCertificates, readFileSync(caFile)] };
  } catch (err) {
    throw new CliError(`cannot read the CA file ${caFile}: ${(err as Error).message}`, ExitCode.USAGE);
  }
}
