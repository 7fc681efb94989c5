/**
 * A coordinator replica whose machine vanishes sends no reset: its clients'
 * connections go silent. The coordinator transport pings a silent
 * connection (lib/replicas.ts REPLICA_PING), so a stream on it
 * fails as Unavailable and moves to the next replica (issue #20 item 4).
 * Replica A is an echo server behind a TCP relay that stops relaying
 * (dropping bytes both ways, closing nothing); replica B answers.
 */
import { afterAll, describe, expect, it } from "@jest/globals";
import net from "node:net";
import { once } from "node:events";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { EchoService } from "../../gen/treadmill/testing/v1/echo_service_pb.js";
import { coordinatorTransport } from "../../lib/coordinator-client.js";
import { startEchoServer } from "../support/echo-service.js";
import type { Server } from "../../lib/server.js";

/** A TCP relay to `target` that can go silent: from then on every byte either way is dropped and no socket closes. */
async function silenceableRelay(target: URL) {
  let silent = false;
  const sockets = new Set<net.Socket>();
  const relay = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("error", () => undefined);
    }
    client.on("data", (d) => void (silent || upstream.write(d)));
    upstream.on("data", (d) => void (silent || client.write(d)));
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  relay.listen(0, "127.0.0.1");
  await once(relay, "listening");
  return {
    url: `http://127.0.0.1:${(relay.address() as net.AddressInfo).port}`,
    silence: () => void (silent = true),
    close: async () => {
      for (const s of sockets) s.destroy();
      relay.close();
      await once(relay, "close");
    },
  };
}

describe("a coordinator transport over a replica that goes silent", () => {
  const cleanup: (() => Promise<unknown>)[] = [];
  afterAll(async () => {
    for (const fn of cleanup.reverse()) await fn();
  });

  it("fails the stream on it as Unavailable once a ping goes unanswered, and the next call goes to the other replica", async () => {
    const a: Server = await startEchoServer();
    const b: Server = await startEchoServer();
    cleanup.push(() => a.stop(), () => b.stop());
    const relay = await silenceableRelay(new URL(a.address().url));
    cleanup.push(() => relay.close());
    const client = createClient(EchoService, coordinatorTransport([relay.url, b.address().url], "", undefined, { ping: { intervalMs: 200, timeoutMs: 1000 } }));

    let received = 0;
    let silencedAt = 0;
    const failure = await (async () => {
      for await (const _ of client.echoServerStream({ text: "tick", count: 100_000, intervalMs: 50 })) {
        if (++received === 3) {
          relay.silence();
          silencedAt = Date.now();
        }
      }
    })().catch((e: unknown) => ConnectError.from(e));
    expect(failure).toBeInstanceOf(ConnectError);
    expect((failure as ConnectError).code).toBe(Code.Unavailable);
    expect(received).toBeGreaterThanOrEqual(3);
    // Within a few ping periods, not a TCP timeout's minutes.
    expect(Date.now() - silencedAt).toBeLessThan(5_000);

    // The silent replica would let this call hang to its deadline.
    const answer = await client.echo({ text: "after" }, { timeoutMs: 5_000 });
    expect(answer.text).toBe("after");
  }, 20_000);
});
