/**
 * Clients of a service that runs as several replicas (the coordinator: N
 * replicas over one PostgreSQL, DESIGN.md §5, §10). A client uses one replica
 * at a time, the first of its list to begin with, and moves to the next (the
 * list is a ring) when a call fails to reach the one it uses.
 *
 * What moves it: a connection failure (refused, reset, a name that does not
 * resolve, no route: `isNetworkError`) or `Unavailable` (the replica is
 * shutting down, or cannot reach its database, or a connection went silent
 * past an unanswered ping: `REPLICA_PING`).
 * An application error (`PermissionDenied`, `InvalidArgument`, `NotFound`,
 * ...) would be the same on every replica: it moves nothing.
 *
 * Who retries: `replicaTransport` sends a unary or server-streaming call
 * again, at once, to each other replica only when the failure proves the call
 * never reached a server (the connection could not be opened:
 * `isConnectFailure`), so that nothing runs twice; a call cut in the middle,
 * and every stream of requests (which cannot be replayed), fail to the
 * caller, whose loop retries with its backoff (`keepStreaming`, `retry` in
 * lib/retry.ts), and its next call goes to the replica the failure moved to.
 *
 * It logs (info) the replica it uses, once it answered, and each move, with
 * URLs stripped of any user and password.
 */
import { ConnectError, Code, type Transport } from "@connectrpc/connect";
import type { Logger } from "./logger.js";
import { isConnectFailure, isNetworkError } from "./retry.js";

/**
 * How often a connection to a replica that carries no data is pinged, and
 * how long an answer may take: a replica whose machine vanished (no reset
 * ever comes) fails its calls as Unavailable within the sum, and its clients
 * move on (the coordinator's heartbeats on a supervisor's stream reset the
 * interval, so a live stream is hardly ever pinged).
 */
export const REPLICA_PING = { intervalMs: 10_000, timeoutMs: 10_000 };

/** Whether `err` says the replica could not be reached (or is going away): the next one may answer. */
export function isReplicaFailure(err: unknown): boolean {
  return isNetworkError(err) || ConnectError.from(err).code === Code.Unavailable;
}

/** `url` as it may be logged or shown: without user and password. */
export function displayUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.username === "" && parsed.password === "") return url;
    parsed.username = "";
    parsed.password = "";
    const shown = parsed.toString();
    return url.endsWith("/") ? shown : shown.replace(/\/$/, "");
  } catch {
    return url;
  }
}

export interface ReplicaSetOptions {
  /** The replicas' base URLs, in order of preference; at least one. */
  urls: readonly string[];
  /** What they are, in log lines; default "coordinator". */
  service?: string;
  /** Gets the replica in use and each move, at info. */
  logger?: Logger;
  /** Called at each move (e.g. a note of the CLI's). */
  onMove?: (move: { from: string; to: string; reason: string }) => void;
}

/** Which replica a client uses, and the rule that moves it. Pure state: no I/O, no clock. */
export class ReplicaSet {
  readonly urls: readonly string[];
  readonly #service: string;
  readonly #logger: Logger | undefined;
  readonly #onMove: ReplicaSetOptions["onMove"];
  #index = 0;
  /** Whether the current replica has answered since it became current (logged once). */
  #answered = false;

  constructor(options: ReplicaSetOptions) {
    if (options.urls.length === 0) throw new Error("a replica set needs at least one url");
    this.urls = [...options.urls];
    this.#service = options.service ?? "coordinator";
    this.#logger = options.logger;
    this.#onMove = options.onMove;
  }

  /** The replica calls go to now. */
  get current(): string {
    return this.urls[this.#index];
  }

  /**
   * A call to `url` failed with `err`. Moves to the next replica when `err`
   * is a replica failure and `url` is still the current one (calls that
   * failed together move it once); returns whether it moved.
   */
  failed(url: string, err: unknown): boolean {
    if (this.urls.length < 2 || url !== this.current || !isReplicaFailure(err)) return false;
    this.#index = (this.#index + 1) % this.urls.length;
    this.#answered = false;
    const reason = ConnectError.from(err).rawMessage;
    const move = { from: displayUrl(url), to: displayUrl(this.current), reason };
    this.#logger?.info(move, `${this.#service} replica unreachable; moving to the next`);
    this.#onMove?.(move);
    return true;
  }

  /** A call to `url` got an answer: the first since it became current logs which replica is in use. */
  answered(url: string): void {
    if (url !== this.current || this.#answered) return;
    this.#answered = true;
    this.#logger?.info({ url: displayUrl(url), replicas: this.urls.length }, `using ${this.#service} replica`);
  }
}

/**
 * One Connect transport over the replicas of `replicas`: each call goes to
 * the current replica, through the transport `transportFor` makes for its URL
 * (made once per URL). Failures move the set; a unary or server-streaming
 * call that never reached a server is sent to the next replica at once, each
 * replica at most once per call.
 */
export function replicaTransport(replicas: ReplicaSet, transportFor: (url: string) => Transport): Transport {
  const transports = new Map<string, Transport>();
  const transportOf = (url: string) => {
    let transport = transports.get(url);
    if (transport === undefined) {
      transport = transportFor(url);
      transports.set(url, transport);
    }
    return transport;
  };
  /** Runs `call` on the current replica; a `replayable` call that never reached a server goes on to the next. */
  async function onReplicas<R>(signal: AbortSignal | undefined, replayable: boolean, call: (url: string) => Promise<R>): Promise<R> {
    for (let tried = 1; ; tried++) {
      const url = replicas.current;
      try {
        return await call(url);
      } catch (err) {
        replicas.failed(url, err);
        if (!replayable || signal?.aborted || tried >= replicas.urls.length || !isConnectFailure(err)) throw err;
      }
    }
  }

  return {
    unary(method, signal, timeoutMs, header, input, contextValues) {
      return onReplicas(signal, true, async (url) => {
        const response = await transportOf(url).unary(method, signal, timeoutMs, header, input, contextValues);
        replicas.answered(url);
        return response;
      });
    },
    async stream(method, signal, timeoutMs, header, input, contextValues) {
      // A server-streaming call's one request may be sent again; a client's stream of requests cannot be replayed.
      const requests = method.methodKind === "server_streaming" ? await gather(input) : undefined;
      return onReplicas(signal, requests !== undefined, async (url) => {
        const response = await transportOf(url).stream(method, signal, timeoutMs, header, requests ? replay(requests) : input, contextValues);
        return { ...response, message: watched(response.message, url) };
      });
    },
  };

  async function gather<T>(input: AsyncIterable<T>): Promise<T[]> {
    const items: T[] = [];
    for await (const item of input) items.push(item);
    return items;
  }

  async function* replay<T>(items: T[]): AsyncIterable<T> {
    yield* items;
  }

  /** The stream's messages; the first is the replica's answer, an error on the way is its failure. */
  async function* watched<T>(messages: AsyncIterable<T>, url: string): AsyncIterable<T> {
    try {
      for await (const message of messages) {
        replicas.answered(url);
        yield message;
      }
    } catch (err) {
      replicas.failed(url, err);
      throw err;
    }
  }
}
