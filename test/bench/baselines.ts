// Baselines every benchmark measures in the same run, on the same machine, so
// its figures are read as ratios (these machines are shared and noisy).
import { execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { open, rm, stat } from "node:fs/promises";
import { connect } from "node:net";
import { promisify } from "node:util";

const run = promisify(execFile);

// A sink in its own process (as a real server would be): listens, counts the
// bytes of one connection (hashing them with sha256 when told), prints the
// port first and "done" at the end.
const SINK = `
const net = require("node:net");
const want = Number(process.argv[1]);
const hash = process.argv[2] === "sha256" ? require("node:crypto").createHash("sha256") : undefined;
const server = net.createServer((s) => {
  let got = 0;
  s.on("data", (b) => { hash?.update(b); got += b.length; if (got >= want) { hash?.digest(); process.stdout.write("done\\n"); s.end(); server.close(); } });
});
server.listen(0, "127.0.0.1", () => process.stdout.write(server.address().port + "\\n"));
`;

/**
 * Raw loopback TCP throughput in MB/s (10^6 bytes), client to a sink process;
 * with `receiverSha256` the sink hashes what it receives (the best any
 * transfer whose receiver verifies a digest can do).
 */
export async function rawTcpMBps(totalBytes: number, chunkBytes = 1 << 20, receiverSha256 = false): Promise<number> {
  const args = ["-e", SINK, String(totalBytes), ...(receiverSha256 ? ["sha256"] : [])];
  const sink = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "inherit"] });
  const lines = lineReader(sink.stdout!);
  const port = Number(await lines.next());
  const chunk = randomBytes(chunkBytes);
  const started = performance.now();
  const socket = connect(port, "127.0.0.1");
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve).once("error", reject);
  });
  let sent = 0;
  while (sent < totalBytes) {
    const piece = totalBytes - sent >= chunk.length ? chunk : chunk.subarray(0, totalBytes - sent);
    sent += piece.length;
    if (!socket.write(piece)) await new Promise((resolve) => socket.once("drain", resolve));
  }
  await lines.next(); // "done"
  const seconds = (performance.now() - started) / 1000;
  socket.destroy();
  sink.kill();
  return totalBytes / 1e6 / seconds;
}

/** `sha256sum FILE` throughput in MB/s. */
export async function sha256sumMBps(file: string): Promise<number> {
  const { size } = await stat(file);
  const started = performance.now();
  await run("sha256sum", [file]);
  return size / 1e6 / ((performance.now() - started) / 1000);
}

/**
 * Plain sequential appends to one file in MB/s: `chunkBytes` writes, with an
 * fsync after every `fsyncEvery` writes (0: only at the end).
 */
export async function fileAppendMBps(path: string, totalBytes: number, chunkBytes: number, fsyncEvery: number): Promise<number> {
  const chunk = randomBytes(chunkBytes);
  const file = await open(path, "a");
  const started = performance.now();
  let writes = 0;
  for (let written = 0; written < totalBytes; written += chunkBytes) {
    await file.write(chunk);
    if (fsyncEvery > 0 && ++writes % fsyncEvery === 0) await file.datasync();
  }
  await file.datasync();
  const seconds = (performance.now() - started) / 1000;
  await file.close();
  await rm(path, { force: true });
  return totalBytes / 1e6 / seconds;
}

/** Writes `bytes` random bytes to `path` (incompressible, like disk images). */
export async function writeRandomFile(path: string, bytes: number): Promise<void> {
  const file = await open(path, "w");
  const chunk = randomBytes(8 << 20);
  for (let written = 0; written < bytes; written += chunk.length) {
    await file.write(chunk, 0, Math.min(chunk.length, bytes - written));
  }
  await file.close();
}

function lineReader(stream: NodeJS.ReadableStream) {
  let buffered = "";
  const waiting: ((line: string) => void)[] = [];
  const ready: string[] = [];
  stream.setEncoding("utf8");
  stream.on("data", (text: string) => {
    buffered += text;
    let nl: number;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      const w = waiting.shift();
      if (w) w(line);
      else ready.push(line);
    }
  });
  return {
    next: () => new Promise<string>((resolve) => (ready.length > 0 ? resolve(ready.shift()!) : waiting.push(resolve))),
  };
}
