// The events benchmark's follower, in its own process (the bench's process
// also runs the scripted supervisors, whose work would delay what it
// receives): follows EventService.WatchEvents from the head with no filter
// and prints `<cursor> <wall-clock ms at receipt>` for each event, after a
// first line `ready`. With a database URL, it also LISTENs on `bench_probe`
// and prints `probe <payload> <wall-clock ms at receipt>` for each
// notification: the bench's measure of how soon a process on this machine,
// under the same load, can learn of a commit at all.
// `node --import tsx event-follower.ts <url> <token> [<database url>]`.
import postgres from "postgres";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { EventService } from "../../../gen/treadmill/coordinator/v1/event_service_pb.js";
import { bearerInterceptor } from "../../../lib/grpc/transport.js";

const [url, token, databaseUrl] = process.argv.slice(2);
const now = () => performance.timeOrigin + performance.now();
if (databaseUrl) {
  const listener = postgres(databaseUrl, { max: 1, onnotice: () => undefined });
  await listener.listen("bench_probe", (payload) => process.stdout.write(`probe ${payload} ${now().toFixed(3)}\n`));
}
const events = createClient(EventService, createGrpcTransport({ baseUrl: url, interceptors: [bearerInterceptor(() => token)] }));
let first = true;
for await (const r of events.watchEvents({})) {
  const at = now();
  if (first) process.stdout.write("ready\n");
  first = false;
  if (r.events.length > 0) process.stdout.write(r.events.map((e) => `${e.cursor} ${at.toFixed(3)}\n`).join(""));
}
