/**
 * What every command gets: the output, the contexts file, the selected
 * context, and coordinator clients authenticated with its token. `TML_SERVER`
 * and `TML_TOKEN` override the saved context (for CI, where nothing is
 * saved), with `TML_CA_FILE` as their `--ca-file`. A coordinator may be
 * several replicas (`tml login A,B`, `TML_SERVER=A,B`): calls go to one at
 * a time and move to the next when it cannot be reached (lib/replicas.ts).
 */
import type { Readable, Writable } from "node:stream";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import { Http2SessionManager } from "@connectrpc/connect-node";
import type { DescService } from "@bufbuild/protobuf";
import { ConfigError, splitList } from "../lib/config.js";
import { loadClientTls, type ClientTls } from "../lib/grpc/trust.js";
import { clientTransport } from "../lib/grpc/transport.js";
import { REPLICA_PING, ReplicaSet, replicaTransport } from "../lib/replicas.js";
import type { GlobalFlags } from "./args.js";
import { ConfigStore, contextServers, type ConfigFile, type SavedContext } from "./config.js";
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
  /** Calls `handler` on each SIGINT (Ctrl-C) and SIGTERM, with its name, until the returned function is called. */
  onInterrupt?: (handler: (signal: NodeJS.Signals) => void) => () => void;
}

export interface Target {
  /** The context's name; "" when TML_SERVER/TML_TOKEN define it. */
  name: string;
  /** The coordinator's replicas, in the order tried (one, mostly). */
  servers: readonly string[];
  /** The same, as `tml login` and `--coordinator-url` take them: comma-separated. */
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
      const servers = splitList(env.TML_SERVER);
      this.errorContext.server = servers.join(",");
      this.errorContext.hadToken = true;
      return { name: "", servers, server: servers.join(","), user: "", token: env.TML_TOKEN, caFile: env.TML_CA_FILE || undefined };
    }
    const selected = await this.selected();
    if (selected === undefined) {
      throw new CliError("you are not logged in: run `tml login SERVER` first", ExitCode.AUTH);
    }
    const { name, context } = selected;
    const servers = contextServers(context);
    this.errorContext.server = servers.join(",");
    this.errorContext.context = name;
    if (!context.token) {
      throw new CliError(`you are logged out of context "${name}": run \`tml login\` again`, ExitCode.AUTH);
    }
    this.errorContext.hadToken = true;
    return { name, servers, server: servers.join(","), user: context.user, token: context.token, caFile: context.caFile };
  }

  /**
   * A gRPC transport to `server` with `token` (none when empty), verifying an
   * https server with the CA in `caFile` as well as the system's; its
   * connection closes when the command ends. Given several replicas, a call
   * goes to the next when one cannot be reached (said with --verbose).
   */
  transport(server: string | readonly string[], token: string, caFile?: string): Transport {
    const transportFor = (url: string) => {
      // Pinged when silent, as every coordinator client is: a follow on a vanished replica moves on.
      const ping = { pingIntervalMs: REPLICA_PING.intervalMs, pingTimeoutMs: REPLICA_PING.timeoutMs };
      const sessionManager = new Http2SessionManager(url, ping, tlsOptions(caFile));
      this.onClose(() => sessionManager.abort());
      return clientTransport({ baseUrl: url, sessionManager, token: () => token });
    };
    const urls = typeof server === "string" ? [server] : server;
    if (urls.length === 1) return transportFor(urls[0]);
    const onMove = ({ from, to, reason }: { from: string; to: string; reason: string }) => {
      if (this.verbose) this.out.note(`${from} cannot be reached (${reason}); trying ${to}`);
    };
    return replicaTransport(new ReplicaSet({ urls, onMove }), transportFor);
  }

  readonly #closers: (() => void)[] = [];

  /** Calls `handler` on each Ctrl-C (SIGINT) or SIGTERM until the returned function is called or the command ends. */
  onInterrupt(handler: (signal: NodeJS.Signals) => void): () => void {
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
      this.#coordinator = this.transport(target.servers, target.token, target.caFile);
      this.caFile = target.caFile;
    }
    return createClient(service, this.#coordinator);
  }
}

const trustByCaFile = new Map<string, ClientTls>();

/**
 * The trust of the context's CA file (`loadClientTls`, once per file and
 * process); a file that cannot be read or holds no certificate is a usage
 * error naming it.
 */
export function tlsOptions(caFile: string | undefined): ClientTls | undefined {
  if (caFile === undefined) return undefined;
  let trust = trustByCaFile.get(caFile);
  if (trust === undefined) {
    try {
      trust = loadClientTls(caFile);
    } catch (err) {
      const detail = err instanceof ConfigError ? err.problems.join("; ").replace(`--ca-file ${caFile} `, "") : (err as Error).message;
      throw new CliError(`cannot read the CA file ${caFile}: ${detail}`, ExitCode.USAGE);
    }
    trustByCaFile.set(caFile, trust);
  }
  return trust;
}
