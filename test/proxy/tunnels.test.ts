import { createHash, randomBytes } from "node:crypto";
import net from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "@jest/globals";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { DialRequestSchema, TunnelService } from "../../gen/treadmill/proxy/v1/tunnel_service_pb.js";
import { bearerInterceptor } from "../../lib/grpc/transport.js";
import { CloseReason } from "../../gen/treadmill/proxy/v1/tunnel_pb.js";
import { TokenSigner, generateSigningKey } from "../../lib/tokens.js";
import { dialTunnel, type TunnelStream } from "../../lib/tunnel/client.js";
import type { Proxy } from "../../proxy/proxy.js";
import type { Exposer } from "../../supervisor/exposer.js";
import { dialToken, exposeJob, makeKeys, readAll, startEchoServer, startProxy, within, type Keys } from "./helpers.js";
import { waitUntil } from "../support/wait.js";

const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

let keys: Keys;
let proxy: Proxy;
let echo: Awaited<ReturnType<typeof startEchoServer>>;
let exposerA: Exposer;
let exposerB: Exposer;
let url: string;
/** A server that answers, after the client's FIN, with the sha256 of what it got, then ends. */
let digestServer: net.Server;
/** A server that sends without end to whoever connects. */
let firehose: net.Server;
const resizes: { exposure: string; cols: number; rows: number }[] = [];

const portOf = (s: net.Server) => (s.address() as net.AddressInfo).port;

beforeAll(async () => {
  keys = await makeKeys();
  proxy = await startProxy(keys, { maxTunnelsPerJob: 250 });
  url = proxy.address().url;
  echo = await startEchoServer();
  digestServer = net.createServer({ allowHalfOpen: true }, (socket) => {
    const hash = createHash("sha256");
    socket.on("data", (d) => hash.update(d));
    socket.on("end", () => socket.end(hash.digest("hex")));
    socket.on("error", () => socket.destroy());
  });
  firehose = net.createServer((socket) => {
    const chunk = randomBytes(64 * 1024);
    const pump = () => {
      while (socket.write(chunk));
    };
    socket.on("drain", pump);
    socket.on("error", () => socket.destroy());
    pump();
  });
  await Promise.all([
    new Promise<void>((r) => digestServer.listen({ host: "127.0.0.1", port: 0 }, r)),
    new Promise<void>((r) => firehose.listen({ host: "127.0.0.1", port: 0 }, r)),
  ]);
  exposerA = await exposeJob(
    url,
    keys,
    "job-a",
    [
      { name: "echo", host: "127.0.0.1", port: echo.port, kind: "tcp" },
      { name: "digest", host: "127.0.0.1", port: portOf(digestServer), kind: "tcp" },
      { name: "firehose", host: "127.0.0.1", port: portOf(firehose), kind: "tcp" },
      { name: "console", host: "127.0.0.1", port: echo.port, kind: "console" },
      { name: "refused", host: "127.0.0.1", port: 1, kind: "tcp" },
    ],
    { resize: (exposure, size) => resizes.push({ exposure, ...size }) },
  );
  exposerB = await exposeJob(url, keys, "job-b", [{ name: "echo", host: "127.0.0.1", port: echo.port, kind: "tcp" }]);
  await waitUntil(() => exposerA.connected() && exposerB.connected() && proxy.sessionCount() === 2, "both exposers connected");
});

afterAll(async () => {
  await exposerA.stop();
  await exposerB.stop();
  await proxy.stop();
  await echo.close();
  await new Promise((r) => digestServer.close(r));
  await new Promise((r) => firehose.close(r));
});

async function dial(job: string, exposure: string, extra: { token?: string; windowSize?: { cols: number; rows: number } } = {}): Promise<TunnelStream> {
  // Announcements race the first dial: retry NotFound briefly.
  const token = extra.token ?? (await dialToken(keys, job, exposure));
  for (let attempt = 0; ; attempt++) {
    try {
      return await dialTunnel({ proxyUrl: url, token, jobId: job, port: exposure, windowSize: extra.windowSize });
    } catch (err) {
      if (ConnectError.from(err).code !== Code.NotFound || attempt > 100) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

async function dialError(job: string, exposure: string, token: string): Promise<ConnectError> {
  const err = await dialTunnel({ proxyUrl: url, token, jobId: job, port: exposure }).then(
    (t) => {
      t.destroy();
      throw new Error("dial succeeded");
    },
    (e: unknown) => ConnectError.from(e),
  );
  return err;
}

describe("tunnels through the proxy", () => {
  it("carries several MiB of random bytes both ways byte-exact, then closes normally", async () => {
    const data = randomBytes(6 * 1024 * 1024 + 13);
    const tunnel = await dial("job-a", "echo");
    expect(tunnel.exposure.name).toBe("echo");
    const received = readAll(tunnel);
    tunnel.end(data);
    const got = await within(received, "echo of 6 MiB");
    expect(got.length).toBe(data.length);
    expect(sha(got)).toBe(sha(data));
    expect((await tunnel.closeReason).reason).toBe(CloseReason.NORMAL);
  });

  it("keeps the bytes of many small writes in order", async () => {
    const tunnel = await dial("job-a", "digest");
    const parts: Buffer[] = [];
    for (let i = 0; i < 3000; i++) parts.push(randomBytes(1 + (i % 97)));
    const received = readAll(tunnel);
    for (const p of parts) tunnel.write(p);
    tunnel.end();
    expect((await within(received, "digest")).toString()).toBe(sha(Buffer.concat(parts)));
  });

  it("serves Dial to stock gRPC and Connect clients too, with the same bytes", async () => {
    // Plain gRPC reaches the hand-written procedures, the Connect protocol
    // the Connect adapter: both must speak the same messages.
    const token = await dialToken(keys, "job-a", "digest");
    const data = randomBytes(300 * 1024 + 7);
    for (const transport of [
      createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => token)] }),
      createConnectTransport({ baseUrl: url, httpVersion: "2", interceptors: [bearerInterceptor(() => token)] }),
    ]) {
      const requests = (async function* () {
        yield create(DialRequestSchema, { payload: { case: "open", value: { protocolVersion: { major: 1 }, jobId: "job-a", portName: "digest" } } });
        for (let at = 0; at < data.length; at += 64 * 1024) {
          yield create(DialRequestSchema, { payload: { case: "data", value: data.subarray(at, at + 64 * 1024) } });
        }
        yield create(DialRequestSchema, { payload: { case: "halfClose", value: {} } });
      })();
      const cases: string[] = [];
      const received: Uint8Array[] = [];
      let closed: CloseReason | undefined;
      for await (const response of createClient(TunnelService, transport).dial(requests)) {
        cases.push(response.payload.case ?? "");
        if (response.payload.case === "data") received.push(response.payload.value);
        if (response.payload.case === "closed") closed = response.payload.value.reason;
      }
      expect(cases[0]).toBe("opened");
      expect(Buffer.concat(received).toString()).toBe(sha(data));
      expect(closed).toBe(CloseReason.NORMAL);
    }
  });

  it("lets data flow back after the client half-closes", async () => {
    const tunnel = await dial("job-a", "digest");
    const received = readAll(tunnel);
    tunnel.end(Buffer.from("hello"));
    expect((await within(received, "reply after half-close")).toString()).toBe(sha(Buffer.from("hello")));
    expect((await tunnel.closeReason).reason).toBe(CloseReason.NORMAL);
  });

  it("serves 200 concurrent tunnels", async () => {
    const token = await dialToken(keys, "job-a", "echo");
    const results = await within(
      Promise.all(
        Array.from({ length: 200 }, async (_, i) => {
          const tunnel = await dial("job-a", "echo", { token });
          const data = randomBytes(16 * 1024 + i);
          const received = readAll(tunnel);
          tunnel.end(data);
          return sha(await received) === sha(data);
        }),
      ),
      "200 tunnels",
      60_000,
    );
    expect(results.filter(Boolean)).toHaveLength(200);
    await waitUntil(() => proxy.tunnelCount() === 0, "every tunnel released");
  }, 90_000);

  it("does not let a client that never reads stall other tunnels", async () => {
    const stuck = await dial("job-a", "firehose");
    // Never read `stuck`: the firehose fills every buffer up to the proxy.
    stuck.pause();
    const data = randomBytes(2 * 1024 * 1024);
    for (let i = 0; i < 3; i++) {
      const tunnel = await dial("job-a", "echo");
      const received = readAll(tunnel);
      tunnel.end(data);
      expect(sha(await within(received, "echo beside a stuck tunnel"))).toBe(sha(data));
    }
    // A half-open abuser: a connection to the proxy's port that never finishes its preface.
    const abuser = net.connect(proxy.address().port, "127.0.0.1");
    await new Promise((r) => abuser.once("connect", r));
    abuser.write("PRI * HTTP/2.0\r\n");
    const other = await dial("job-b", "echo");
    const received = readAll(other);
    other.end(data);
    expect(sha(await within(received, "echo beside an abuser"))).toBe(sha(data));
    abuser.destroy();
    stuck.destroy();
  });

  it("refuses a token for another job, another exposure, an unexposed port and an expired token", async () => {
    const tokenA = await dialToken(keys, "job-a", "echo");
    expect((await dialError("job-b", "echo", tokenA)).code).toBe(Code.PermissionDenied);
    expect((await dialError("job-a", "digest", tokenA)).code).toBe(Code.PermissionDenied);
    expect((await dialError("job-a", "ssh", await dialToken(keys, "job-a", "ssh"))).code).toBe(Code.NotFound);
    expect((await dialError("job-c", "echo", await dialToken(keys, "job-c", "echo"))).code).toBe(Code.Unavailable);
    // Signed two minutes ago for one minute: past the verifier's clock tolerance.
    const past = await TokenSigner.create(
      { kid: keys.signer.kid, privateJwk: (await generateSigningKey({ kid: keys.signer.kid })).privateJwk },
      { issuer: "test-coordinator", clock: () => Date.now() - 120_000 },
    );
    const expiredWrongKey = await past.sign({ scope: "tunnel:dial", job: "job-a", exposure: "echo" }, 60_000, { subject: "t" });
    expect((await dialError("job-a", "echo", expiredWrongKey)).code).toBe(Code.Unauthenticated);
    expect((await dialError("job-a", "echo", "not-a-token")).code).toBe(Code.Unauthenticated);
    const expose = await keys.token({ scope: "tunnel:expose", job: "job-a" });
    expect((await dialError("job-a", "echo", expose)).code).toBe(Code.PermissionDenied);
  });

  it("refuses a token signed with the right key once it has expired", async () => {
    // TokenSigner with a clock in the past, same key as the proxy trusts.
    const signer = keys.signer as unknown as { clock: () => number };
    const realClock = signer.clock;
    signer.clock = () => Date.now() - 120_000;
    let expired: string;
    try {
      expired = await dialToken(keys, "job-a", "echo", 60_000);
    } finally {
      signer.clock = realClock;
    }
    const err = await dialError("job-a", "echo", expired);
    expect(err.code).toBe(Code.Unauthenticated);
    expect(err.rawMessage).toMatch(/expired/);
  });

  it("ends an open tunnel when its dial token expires", async () => {
    const tunnel = await dial("job-a", "echo", { token: await dialToken(keys, "job-a", "echo", 2000) });
    tunnel.resume();
    const closed = await within(tunnel.closeReason, "token expiry");
    expect(closed.reason).toBe(CloseReason.TOKEN_EXPIRED);
  });

  it("reports a port the supervisor cannot reach as unavailable with the reason", async () => {
    const err = await dialError("job-a", "refused", await dialToken(keys, "job-a", "refused"));
    expect(err.code).toBe(Code.Unavailable);
    expect(err.rawMessage).toMatch(/cannot connect to 127.0.0.1:1/);
  });

  it("passes the window size and resizes of a console to the supervisor", async () => {
    const tunnel = await dial("job-a", "console", { windowSize: { cols: 100, rows: 30 } });
    expect(tunnel.exposure.resizable).toBe(true);
    tunnel.resize(132, 43);
    await waitUntil(() => resizes.some((r) => r.cols === 132 && r.rows === 43), "resize at the supervisor");
    expect(resizes[0]).toEqual({ exposure: "console", cols: 100, rows: 30 });
    tunnel.destroy();
  });
});

describe("limits and timeouts", () => {
  it("refuses a tunnel over the per-job limit and closes idle tunnels", async () => {
    const limited = await startProxy(keys, { maxTunnelsPerJob: 2, idleTimeoutMs: 500 });
    const exposer = await exposeJob(limited.address().url, keys, "job-l", [{ name: "echo", host: "127.0.0.1", port: echo.port, kind: "tcp" }]);
    try {
      await waitUntil(() => exposer.connected() && limited.sessionCount() === 1, "exposer connected");
      const token = await dialToken(keys, "job-l", "echo");
      const open = async () => {
        for (let attempt = 0; ; attempt++) {
          try {
            return await dialTunnel({ proxyUrl: limited.address().url, token, jobId: "job-l", port: "echo" });
          } catch (err) {
            if (ConnectError.from(err).code !== Code.NotFound || attempt > 100) throw err;
            await new Promise((r) => setTimeout(r, 50));
          }
        }
      };
      const first = await open();
      const second = await open();
      const third = await open().catch((e: unknown) => ConnectError.from(e));
      expect(third).toBeInstanceOf(ConnectError);
      expect((third as ConnectError).code).toBe(Code.ResourceExhausted);
      first.resume();
      second.resume();
      expect((await within(first.closeReason, "idle timeout")).reason).toBe(CloseReason.IDLE_TIMEOUT);
      expect((await within(second.closeReason, "idle timeout")).reason).toBe(CloseReason.IDLE_TIMEOUT);
    } finally {
      await exposer.stop();
      await limited.stop();
    }
  });

  it("closes the tunnels of withdrawn exposures with that reason", async () => {
    const exposer = await exposeJob(url, keys, "job-w", [{ name: "echo", host: "127.0.0.1", port: echo.port, kind: "tcp" }]);
    await waitUntil(() => exposer.connected(), "exposer connected");
    const tunnel = await dial("job-w", "echo");
    tunnel.resume();
    await exposer.stop();
    expect((await within(tunnel.closeReason, "withdrawal")).reason).toBe(CloseReason.EXPOSURE_WITHDRAWN);
  });
});
