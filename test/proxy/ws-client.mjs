// A real WebSocket client (Node's built-in one, `node --experimental-websocket`):
// `ws-client.mjs <ws-url> <token> <bytes>` sends <bytes> random bytes, reads
// the echo, half-closes, and prints one JSON line of what happened.
import { createHash, randomBytes } from "node:crypto";

const [url, token, size] = process.argv.slice(2);
const data = randomBytes(Number(size));
const result = { opened: null, protocol: null, echoed: false, close: null, error: null };
const ws = new WebSocket(url, ["treadmill.tunnel.v1", `bearer.${token}`]);
ws.binaryType = "arraybuffer";
const received = [];
let receivedBytes = 0;
ws.onopen = () => (result.protocol = ws.protocol);
ws.onmessage = (event) => {
  if (typeof event.data === "string") {
    const control = JSON.parse(event.data);
    if (control.type === "opened") {
      result.opened = control;
      for (let at = 0; at < data.length; at += 100_000) ws.send(data.subarray(at, at + 100_000));
      ws.send(JSON.stringify({ type: "half-close" }));
    }
    return;
  }
  received.push(Buffer.from(event.data));
  receivedBytes += event.data.byteLength;
  if (receivedBytes === data.length) {
    const sha = (b) => createHash("sha256").update(b).digest("hex");
    result.echoed = sha(Buffer.concat(received)) === sha(data);
  }
};
ws.onerror = () => (result.error = "error");
let printed = false;
const print = () => {
  if (printed) return;
  printed = true;
  process.stdout.write(`${JSON.stringify(result)}\n`);
};
ws.onclose = (event) => {
  result.close = { code: event.code, reason: event.reason };
  print();
};
// A refused handshake may end the process without a close event.
process.on("beforeExit", print);
