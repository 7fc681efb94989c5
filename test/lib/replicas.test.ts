/**
 * The replica choice of clients that know several coordinator replicas
 * (lib/replicas.ts, issue #20 item 4): which replica a call goes to, when it
 * moves, that a stream's reopening waits for the caller's backoff, and that
 * no application error moves it. In-memory replicas (EchoService through
 * createRouterTransport) that can refuse connections or reset their streams
 * the way connect-node reports a dead server; fake timers.
 */
import { afterEach, describe, expect, it, jest } from "@jest/globals";
import { Writable } from "node:stream";
import { Code, ConnectError, createClient, createRouterTransport, type Transport } from "@connectrpc/connect";
import { EchoService, type EchoBidiStreamRequest } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import { AsyncQueue } from "../../lib/async/queue.js";
import { createLogger } from "../../lib/logger.js";
import { ReplicaSet, replicaTransport } from "../../lib/replicas.js";
import { keepStreaming } from "../../lib/retry.js";
import { EchoServiceImpl } from "../support/echo-service.js";

/** A Node network error as connect-node wraps it: an errno on the cause, the code in the message. */
function networkError(errno: string, text: string, code: Code): ConnectError {
  return new ConnectError(text, code, undefined, undefined, Object.assign(new Error(text), { code: errno }));
}

/** One in-memory replica: it serves EchoService while up; down, it refuses connections; kill() also resets its open streams. */
class FakeReplica {
  up = true;
  /** Calls that reached it (unary, and streams opened). */
  unary = 0;
  streams = 0;
  readonly transport: Transport;
  #reset!: (err: Error) => void;
  #resets!: Promise<never>;

  constructor(readonly url: string) {
    this.#arm();
    const inner = createRouterTransport((router) => router.service(EchoService, new EchoServiceImpl()));
    const refused = () => networkError("ECONNREFUSED", `connect ECONNREFUSED ${new URL(url).host}`, Code.Unavailable);
    const resets = () => this.#resets;
    this.transport = {
      unary: async (...args) => {
        if (!this.up) throw refused();
        this.unary++;
        return inner.unary(...args);
      },
      stream: async (...args) => {
        if (!this.up) throw refused();
        this.streams++;
        const response = await inner.stream(...args);
        const messages = response.message[Symbol.asyncIterator]();
        return {
          ...response,
          message: (async function* () {
            while (true) {
              const next = await Promise.race([messages.next(), resets()]);
              if (next.done) return;
              yield next.value;
            }
          })(),
        };
      },
    };
  }

  /** Like a SIGKILL: open streams reset, new connections refused. */
  kill(): void {
    this.up = false;
    this.#reset(networkError("ECONNRESET", "read ECONNRESET", Code.Aborted));
    this.#arm();
  }

  #arm(): void {
    this.#resets = new Promise<never>((_, reject) => (this.#reset = reject));
    this.#resets.catch(() => undefined);
  }
}

function replicaPair(options: { logger?: ReturnType<typeof createLogger> } = {}) {
  const a = new FakeReplica("http://replica-a:7700");
  const b = new FakeReplica("http://replica-b:7700");
  const byUrl = new Map([a, b].map((r) => [r.url, r]));
  const set = new ReplicaSet({ urls: [a.url, b.url], logger: options.logger });
  const client = createClient(EchoService, replicaTransport(set, (url) => byUrl.get(url)!.transport));
  return { a, b, set, client };
}

/** Log lines as objects, from a logger writing into memory. */
function memoryLogger() {
  const lines: Record<string, unknown>[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split("\n")) if (line !== "") lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { lines, logger: createLogger({ level: "info", destination }) };
}

afterEach(() => {
  jest.useRealTimers();
});

describe("a replica set's unary calls", () => {
  it("go to the first replica while it answers", async () => {
    const { a, b, client } = replicaPair();
    for (let i = 0; i < 3; i++) expect((await client.echo({ text: `hi ${i}` })).text).toBe(`hi ${i}`);
    expect([a.unary, b.unary]).toEqual([3, 0]);
  });

  it("go to the next replica at once when the current one refuses the connection, and stay there", async () => {
    const { a, b, set, client } = replicaPair();
    a.up = false;
    expect((await client.echo({ text: "one" })).text).toBe("one");
    expect(set.current).toBe(b.url);
    a.up = true; // back, but the client keeps to the replica that answers
    await client.echo({ text: "two" });
    expect([a.unary, b.unary]).toEqual([0, 2]);
  });

  it("never move on an application error, which the caller gets as it is", async () => {
    const { a, b, set, client } = replicaPair();
    for (const code of [Code.PermissionDenied, Code.InvalidArgument, Code.NotFound, Code.Unauthenticated, Code.FailedPrecondition]) {
      const err = await client.echo({ text: "no", failCode: code }).catch((e: unknown) => ConnectError.from(e));
      expect(err).toBeInstanceOf(ConnectError);
      expect((err as ConnectError).code).toBe(code);
    }
    expect(set.current).toBe(a.url);
    expect([a.unary, b.unary]).toEqual([5, 0]);
  });

  it("move on Unavailable (a replica shutting down) without sending the call again", async () => {
    const { a, b, set, client } = replicaPair();
    await expect(client.echo({ text: "x", failCode: Code.Unavailable })).rejects.toMatchObject({ code: Code.Unavailable });
    expect(set.current).toBe(b.url);
    expect([a.unary, b.unary]).toEqual([1, 0]);
  });

  it("try each replica once per call when none can be reached, and fail with the last refusal", async () => {
    const { a, b, set, client } = replicaPair();
    a.up = false;
    b.up = false;
    const err = ConnectError.from(await client.echo({ text: "x" }).catch((e: unknown) => e));
    expect(err.code).toBe(Code.Unavailable);
    expect(err.rawMessage).toContain("replica-b");
    // The ring turned once: the next call starts again at the first replica.
    expect(set.current).toBe(a.url);
  });
});

describe("a replica set's streams", () => {
  /** Keeps an echo stream open as a supervisor keeps its Attach: a hello each time, healthy at the first answer. */
  function keepEchoing(client: ReturnType<typeof replicaPair>["client"], backoffMs: number) {
    const controller = new AbortController();
    const answers: string[] = [];
    const failures: Code[] = [];
    const done = keepStreaming({
      open: (attempt) => {
        const input = new AsyncQueue<EchoBidiStreamRequest>();
        input.push({ $typeName: "treadmill.testing.v1.EchoBidiStreamRequest", text: `hello ${attempt.number}` });
        controller.signal.addEventListener("abort", () => input.end(), { once: true });
        return client.echoBidiStream(input, { signal: attempt.signal });
      },
      onMessage: (message, attempt) => {
        attempt.healthy();
        answers.push(message.text);
      },
      onError: (err) => void failures.push(ConnectError.from(err).code),
      backoff: { initialMs: backoffMs, maxMs: backoffMs * 8, jitter: "none" },
      signal: controller.signal,
    });
    return { answers, failures, done, stop: () => controller.abort() };
  }

  it("send a server-streaming call that could not connect to the next replica at once, but never a stream of requests", async () => {
    const { a, b, set, client } = replicaPair();
    a.up = false;
    const texts: string[] = [];
    for await (const m of client.echoServerStream({ text: "w", count: 2 })) texts.push(`${m.text}${m.index}`);
    expect(texts).toEqual(["w0", "w1"]);
    expect([a.streams, b.streams, set.current]).toEqual([0, 1, b.url]);

    // A bidi stream's requests cannot be sent again: the caller gets the refusal, and its next stream goes to the new replica.
    b.up = false;
    const input = new AsyncQueue<EchoBidiStreamRequest>();
    input.end();
    const refused = await (async () => {
      for await (const _ of client.echoBidiStream(input)) return undefined;
    })().catch((e: unknown) => ConnectError.from(e));
    expect(refused?.code).toBe(Code.Unavailable);
    expect([a.streams, b.streams, set.current]).toEqual([0, 1, a.url]);
  });

  it("reopen on the next replica after the caller's backoff when their replica dies, and only then", async () => {
    jest.useFakeTimers({ now: 0 });
    const { a, b, set, client } = replicaPair();
    const stream = keepEchoing(client, 1000);
    await jest.advanceTimersByTimeAsync(0);
    expect(stream.answers).toEqual(["hello 1"]);
    expect([a.streams, b.streams]).toEqual([1, 0]);

    a.kill();
    await jest.advanceTimersByTimeAsync(0);
    expect(stream.failures).toEqual([Code.Aborted]);
    expect(set.current).toBe(b.url);
    await jest.advanceTimersByTimeAsync(999);
    expect(b.streams).toBe(0); // the backoff holds the reopening back
    await jest.advanceTimersByTimeAsync(1);
    expect([a.streams, b.streams]).toEqual([1, 1]);
    expect(stream.answers).toEqual(["hello 1", "hello 2"]);

    // The ring goes on: the first replica is back when the second dies.
    a.up = true;
    b.kill();
    await jest.advanceTimersByTimeAsync(1000);
    expect([a.streams, b.streams]).toEqual([2, 1]);
    expect(stream.answers).toEqual(["hello 1", "hello 2", "hello 3"]);
    stream.stop();
    await stream.done;
  });

  it("alternate between replicas that are both down, backing off further each round, until one answers", async () => {
    jest.useFakeTimers({ now: 0 });
    const { a, b, client } = replicaPair();
    a.up = false;
    b.up = false;
    const tries: string[] = [];
    for (const r of [a, b]) {
      const stream = r.transport.stream.bind(r.transport);
      r.transport.stream = (...args) => {
        tries.push(`${r === a ? "a" : "b"}@${Date.now()}`);
        return stream(...args);
      };
    }
    const stream = keepEchoing(client, 100);
    await jest.advanceTimersByTimeAsync(100 + 200 + 400);
    expect(tries).toEqual(["a@0", "b@100", "a@300", "b@700"]);
    expect(stream.failures.every((code) => code === Code.Unavailable)).toBe(true);
    b.up = true;
    await jest.advanceTimersByTimeAsync(800 + 800);
    expect(tries).toEqual(["a@0", "b@100", "a@300", "b@700", "a@1500", "b@2300"]);
    expect(stream.answers).toEqual(["hello 6"]);
    stream.stop();
    await stream.done;
  });

  it("stay on their replica when it ends them with an application error", async () => {
    jest.useFakeTimers({ now: 0 });
    const { a, b, set, client } = replicaPair();
    a.transport.stream = async () => {
      throw new ConnectError("host credential refused", Code.PermissionDenied);
    };
    const stream = keepEchoing(client, 100);
    const ended = stream.done.then(() => undefined, (e: unknown) => ConnectError.from(e).code);
    await jest.advanceTimersByTimeAsync(0);
    expect(await ended).toBe(Code.PermissionDenied);
    expect(stream.failures).toEqual([Code.PermissionDenied]);
    expect(set.current).toBe(a.url);
    expect(b.streams).toBe(0);
  });
});

describe("a replica set's log", () => {
  it("says which replica is in use and each move, without the URLs' passwords", async () => {
    const { lines, logger } = memoryLogger();
    const a = new FakeReplica("http://ops:hunter2@replica-a:7700");
    const b = new FakeReplica("http://replica-b:7700");
    const set = new ReplicaSet({ urls: [a.url, b.url], logger });
    const client = createClient(EchoService, replicaTransport(set, (url) => (url === a.url ? a.transport : b.transport)));
    await client.echo({ text: "x" });
    await client.echo({ text: "y" });
    a.up = false;
    await client.echo({ text: "z" }); // refused, then answered by b
    expect(lines.map((l) => [l.msg, l.url ?? null, l.from ?? null, l.to ?? null])).toEqual([
      ["using coordinator replica", "http://replica-a:7700", null, null],
      ["coordinator replica unreachable; moving to the next", null, "http://replica-a:7700", "http://replica-b:7700"],
      ["using coordinator replica", "http://replica-b:7700", null, null],
    ]);
    expect(lines.every((l) => l.level === 30)).toBe(true);
    expect(JSON.stringify(lines)).not.toContain("hunter2");
  });
});
