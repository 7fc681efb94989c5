// The scale benchmark's memory and CPU baseline: node's own HTTP/2 server
// (defaults, cleartext), echoing every byte of every stream back, nothing
// else. What it costs per idle connection with one open stream is the floor
// of what a coordinator costs per attached supervisor.
// `node --import tsx http2-echo.ts`; prints `port <n>`.
import http2 from "node:http2";

const server = http2.createServer();
server.on("stream", (stream) => {
  stream.respond({ ":status": 200, "content-type": "application/grpc" });
  stream.on("data", (chunk: Buffer) => stream.write(chunk));
  stream.on("error", () => undefined);
});
server.on("session", (session) => session.on("error", () => undefined));
server.listen(0, "127.0.0.1", () => {
  const address = server.address();
  process.stdout.write(`port ${typeof address === "object" && address ? address.port : 0}\n`);
});
