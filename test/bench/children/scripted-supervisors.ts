// Many scripted supervisors (test/support/scripted-supervisor.ts) in one
// process of their own, for the scale benchmark: one process cannot hold
// 10,000 streams and also measure. Forked with an IPC channel
// (`fork(this file, { execArgv: ["--import", "tsx"] })`), it obeys messages:
//
//   { kind: "attach", hosts: [{ credential, url }] }  attaches one supervisor
//       per host ("exit" mode, raw wire) 50 at a time; answers
//       { kind: "attached", failed: [messages] }
//   { kind: "bare", url, count, heartbeatMs }  the baseline instead: `count`
//       HTTP/2 connections to a bare echo server (children/http2-echo.ts),
//       each with one open stream sending a heartbeat-sized message every
//       `heartbeatMs`, as a supervisor does; answers { kind: "attached", failed }
//   { kind: "watch", on }  while on, sends { kind: "started", jobId, at } as
//       each StartJob arrives (`at`: performance.timeOrigin + now(), which
//       the parent compares with its own)
//   { kind: "close" }  closes everything; answers { kind: "closed" }
import type http2 from "node:http2";
import { create, toBinary } from "@bufbuild/protobuf";
import { timestampNow } from "@bufbuild/protobuf/wkt";
import { AttachRequestSchema } from "../../../gen/treadmill/coordinator/v1/supervisor_service_pb.js";
import { connectHttp2, openRawCall } from "../../../lib/grpc/client.js";
import { frame } from "../../../lib/grpc/wire.js";
import { ScriptedSupervisor } from "../../support/scripted-supervisor.js";

export type WorkerCommand =
  | { kind: "attach"; hosts: { credential: string; url: string }[] }
  | { kind: "bare"; url: string; count: number; heartbeatMs: number }
  | { kind: "watch"; on: boolean }
  | { kind: "close" };

export type WorkerEvent = { kind: "attached"; failed: string[] } | { kind: "started"; jobId: string; at: number } | { kind: "closed" };

const send = (e: WorkerEvent) => process.send!(e);
const supervisors: ScriptedSupervisor[] = [];
const bare: { session: http2.ClientHttp2Session; timer: NodeJS.Timeout }[] = [];
let watching = false;

async function inBatches<T>(items: T[], size: number, fn: (item: T) => Promise<void>): Promise<string[]> {
  const failed: string[] = [];
  for (let i = 0; i < items.length; i += size) {
    const results = await Promise.allSettled(items.slice(i, i + size).map(fn));
    for (const r of results) if (r.status === "rejected") failed.push(String(r.reason));
  }
  return failed;
}

async function attach(hosts: { credential: string; url: string }[]): Promise<string[]> {
  return inBatches(hosts, 50, async (h) => {
    const s = new ScriptedSupervisor({
      urls: [h.url],
      credential: h.credential,
      mode: "exit",
      noHistory: true,
      wire: "raw",
      onStartJob: (start) => {
        if (watching) send({ kind: "started", jobId: start.jobId, at: performance.timeOrigin + performance.now() });
      },
    });
    supervisors.push(s);
    await s.connect();
  });
}

/** One bare stream: a connection, a call, a heartbeat-sized message every `heartbeatMs`. */
async function openBare(url: string, heartbeatMs: number): Promise<void> {
  const session = connectHttp2(url);
  const call = openRawCall(session, "/bench.Echo/Stream", {}, { maxMessageBytes: 1 << 20 });
  const beat = () => frame(toBinary(AttachRequestSchema, create(AttachRequestSchema, { payload: { case: "heartbeat", value: { time: timestampNow() } } })));
  call.write(beat());
  // The first echo: the stream is open end to end.
  const messages = call.messages();
  await messages.next();
  void (async () => {
    for await (const _ of messages);
  })().catch(() => undefined);
  const timer = setInterval(() => call.write(beat()), heartbeatMs);
  bare.push({ session, timer });
}

process.on("message", (command: WorkerCommand) => {
  void (async () => {
    switch (command.kind) {
      case "attach":
        send({ kind: "attached", failed: await attach(command.hosts) });
        return;
      case "bare":
        send({
          kind: "attached",
          failed: await inBatches(Array.from({ length: command.count }), 50, () => openBare(command.url, command.heartbeatMs)),
        });
        return;
      case "watch":
        watching = command.on;
        return;
      case "close":
        await Promise.all(supervisors.splice(0).map((s) => s.close()));
        for (const b of bare.splice(0)) {
          clearInterval(b.timer);
          b.session.destroy();
        }
        send({ kind: "closed" });
        return;
    }
  })();
});
process.on("disconnect", () => process.exit(0));
