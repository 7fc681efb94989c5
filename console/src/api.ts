/**
 * The console's clients: the coordinator at this page's own origin, and log
 * servers and image stores at theirs (which must admit this origin in their
 * CORS allow-list: docs/console.md). Every call uses gRPC-Web with binary
 * messages: errors arrive in trailers of an HTTP 200, so that an expected
 * refusal (a validation error, an expired token) is an answer and not a
 * failed resource in the browser's console.
 */
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import type { User } from "../../gen/treadmill/coordinator/v1/user_pb.js";
import { Role } from "../../gen/treadmill/coordinator/v1/user_pb.js";
import { keepStreaming } from "../../lib/retry.js";

const STORAGE_KEY = "treadmill.console.session";

export interface StoredSession {
  token: string;
  tokenId: string;
  userId: string;
  userName: string;
  admin: boolean;
}

/** The logged-in user, kept in localStorage so that a reload stays logged in. */
export class Session {
  #current: StoredSession | undefined;
  /** Called when the coordinator refuses the token (expired or revoked). */
  onExpired: () => void = () => undefined;

  constructor(private readonly storage: Storage) {
    try {
      const raw = storage.getItem(STORAGE_KEY);
      const parsed = raw === null ? undefined : (JSON.parse(raw) as StoredSession);
      if (parsed && typeof parsed.token === "string" && parsed.token !== "") this.#current = parsed;
    } catch {
      storage.removeItem(STORAGE_KEY);
    }
  }

  get current(): StoredSession | undefined {
    return this.#current;
  }

  get token(): string {
    return this.#current?.token ?? "";
  }

  save(token: string, tokenId: string, user: User): void {
    this.#current = { token, tokenId, userId: user.id, userName: user.name, admin: user.role === Role.ADMIN };
    this.storage.setItem(STORAGE_KEY, JSON.stringify(this.#current));
  }

  clear(): void {
    this.#current = undefined;
    this.storage.removeItem(STORAGE_KEY);
  }
}

/** `authorization: Bearer` on every call that has a token (lib/coordinator-client.ts is Node-only). */
function withToken(token: () => string): Interceptor {
  return (next) => (req) => {
    const value = token();
    if (value !== "") req.header.set("authorization", `Bearer ${value}`);
    return next(req);
  };
}

/** Sees Unauthenticated from the coordinator, in unary answers and mid-stream. */
function expiryInterceptor(session: Session): Interceptor {
  const check = (err: unknown) => {
    if (err instanceof ConnectError && err.code === Code.Unauthenticated && session.token !== "") session.onExpired();
  };
  async function* watched<T>(messages: AsyncIterable<T>): AsyncIterable<T> {
    try {
      yield* messages;
    } catch (err) {
      check(err);
      throw err;
    }
  }
  return (next) => async (req) => {
    try {
      const res = await next(req);
      return res.stream ? { ...res, message: watched(res.message) } : res;
    } catch (err) {
      check(err);
      throw err;
    }
  };
}

export class Api {
  readonly coordinator: Transport;
  readonly #clients = new Map<DescService, unknown>();

  constructor(readonly session: Session, baseUrl: string) {
    this.coordinator = createGrpcWebTransport({
      baseUrl,
      useBinaryFormat: true,
      interceptors: [expiryInterceptor(session), withToken(() => session.token)],
    });
  }

  /** A coordinator client with the session's token. */
  client<S extends DescService>(service: S): Client<S> {
    let client = this.#clients.get(service) as Client<S> | undefined;
    if (client === undefined) {
      client = createClient(service, this.coordinator);
      this.#clients.set(service, client);
    }
    return client;
  }

  /** A client of another server (log server, image store) with a capability token. */
  remote<S extends DescService>(service: S, baseUrl: string, token: () => string): Client<S> {
    return createClient(service, createGrpcWebTransport({ baseUrl, useBinaryFormat: true, interceptors: [withToken(token)] }));
  }
}

/** The message to show for a failed call (the server's message names the field). */
export function errorText(err: unknown): string {
  if (err instanceof ConnectError) {
    if (err.code === Code.Unknown && /fetch|network/i.test(err.rawMessage)) return "the server cannot be reached";
    return err.rawMessage;
  }
  return err instanceof Error ? err.message : String(err);
}

export function isAbort(err: unknown, signal: AbortSignal): boolean {
  return signal.aborted || ConnectError.from(err).code === Code.Canceled;
}

/**
 * Keeps a server stream open: reopens it with backoff after a retryable
 * failure (a coordinator restart), until the signal aborts. `open` is called
 * for each connection; `onStatus` tells the page whether it is live.
 */
export async function keepWatching<T>(
  signal: AbortSignal,
  open: (signal: AbortSignal) => AsyncIterable<T>,
  onMessage: (message: T, fresh: boolean) => void,
  onStatus: (live: boolean, detail?: string) => void,
): Promise<void> {
  let fresh = true;
  await keepStreaming<T>({
    open: () => {
      fresh = true;
      return open(signal);
    },
    onMessage(message, attempt) {
      if (fresh) {
        onStatus(true);
        attempt.healthy();
      }
      onMessage(message, fresh);
      fresh = false;
    },
    backoff: { initialMs: 500, maxMs: 10_000 },
    signal,
    onEnd: () => onStatus(false, "the stream ended; reconnecting"),
    onError(err, { verdict }) {
      if (isAbort(err, signal)) return "stop";
      onStatus(false, verdict === "retryable" ? `${errorText(err)}; reconnecting` : errorText(err));
    },
  }).catch(() => undefined); // stopped: the status line says why
}
